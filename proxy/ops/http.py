"""/metrics, /healthz and /readyz over a minimal HTTP/1.1 server on the proxy's own event loop.

Probes and scrapers send one small GET and read one answer, so this speaks only
that: a request line and headers (bounded), one response, then the connection
closes. Nothing here blocks the loop: rendering the metrics reads integers, and
the readiness check's upstream probe is a short async connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, generate_latest

MAX_REQUEST = 8192
READ_TIMEOUT = 5.0
UPSTREAM_PROBE_TIMEOUT = 2.0
UPSTREAM_PROBE_CACHE = 1.0  # seconds a readiness answer is reused (probes from many kubelets)

# What generate_latest writes: the classic text format (every Prometheus server reads it).
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Readiness = Callable[[], Awaitable[tuple[bool, str]]]


async def probe_postgres(host: str, port: int, timeout: float = UPSTREAM_PROBE_TIMEOUT) -> str | None:
    """None if a PostgreSQL server answers an SSLRequest at host:port, else why not.

    An SSLRequest needs no credentials and costs the server no backend, yet only a
    PostgreSQL postmaster answers it with a single 'S' or 'N'.
    """
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")
                await writer.drain()
                answer = await reader.read(1)
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
    except TimeoutError:
        return f"upstream {host}:{port} did not answer within {timeout:g}s"
    except OSError as exc:
        return f"upstream {host}:{port} unreachable: {exc.strerror or exc}"
    if answer not in (b"S", b"N"):
        return f"upstream {host}:{port} did not answer like PostgreSQL"
    return None


class HttpEndpoints:
    """Serves the three paths; ``ready`` says whether this replica should get traffic."""

    def __init__(self, registry: CollectorRegistry | None, ready: Readiness) -> None:
        self._registry = registry
        self._ready = ready
        self._server: asyncio.base_events.Server | None = None
        self._ready_cache: tuple[float, tuple[bool, str]] | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _readiness(self) -> tuple[bool, str]:
        now = time.monotonic()
        if self._ready_cache is not None and now - self._ready_cache[0] < UPSTREAM_PROBE_CACHE:
            return self._ready_cache[1]
        answer = await self._ready()
        self._ready_cache = (time.monotonic(), answer)
        return answer

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        try:
            status, ctype, body = await self._answer(head[:MAX_REQUEST])
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode("ascii") + body)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        finally:
            writer.close()

    async def _answer(self, head: bytes) -> tuple[str, str, bytes]:
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return "400 Bad Request", "text/plain", b"bad request\n"
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method != "GET":
            return "405 Method Not Allowed", "text/plain", b"only GET\n"
        if target == "/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if target == "/readyz":
            ok, why = await self._readiness()
            return ("200 OK" if ok else "503 Service Unavailable"), "text/plain", (why + "\n").encode()
        if target == "/metrics" and self._registry is not None:
            return "200 OK", METRICS_CONTENT_TYPE, generate_latest(self._registry)
        return "404 Not Found", "text/plain", b"not found\n"
