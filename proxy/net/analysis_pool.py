"""Worker processes for the analyses that must not run on the event loop.

Theory of operation
-------------------
Deciding a statement is pure Python (sqlglot) and holds the GIL, so an uncached
analysis of a large statement (a BI tool's 30,000-item IN list) would stall every
session of the process. Such analyses go to a few worker processes instead; the
session that sent the statement waits (its messages are held, as for a guard
check), every other session goes on.

One pipe per worker, driven by one thread per worker (the pipe stays blocking:
an event loop's reader would make it non-blocking, and a large message would
break off); the parent knows which grants and catalog each worker already holds
and sends each only once. A job past its time limit kills its
worker (a running analysis cannot be interrupted otherwise) and is refused; a
worker that dies is replaced on the next job. Jobs wait in a bounded queue; past
it they are refused at once with a message saying so. Nothing here decides
anything: the workers run :func:`rules.engine.analyse`, the pure function the
event loop runs for small statements.
"""

from __future__ import annotations

import asyncio
import contextlib
import copyreg
import logging
import multiprocessing
import multiprocessing.connection
import pickle
import types
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from proxy.config import AnalysisLimits
from rules.decision import Decision, refuse
from rules.engine import Job, analyse

__all__ = ["AnalysisPool"]


def _mappingproxy(d: dict[str, Any]) -> types.MappingProxyType[str, Any]:
    return types.MappingProxyType(d)


# The catalog and the grants hold read-only mappings; they cross the pipe as dicts.
copyreg.pickle(types.MappingProxyType, lambda m: (_mappingproxy, (dict(m),)))


def _serve(conn: multiprocessing.connection.Connection) -> None:
    """A worker: jobs in, decisions out, until the parent goes."""
    logging.getLogger("sqlglot").setLevel(logging.ERROR)
    objects: dict[tuple[str, int], Any] = {}
    while True:
        try:
            msg = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            kind, sent, job = pickle.loads(msg)
            for k, blob in sent.items():  # grants and catalogs this worker has not seen yet
                objects[k] = pickle.loads(blob)
            if len(objects) > 64:
                objects = {k: v for k, v in objects.items() if k in (("g", job.grants), ("c", job.catalog))}
            job = replace(job, grants=objects[("g", job.grants)], catalog=objects[("c", job.catalog)])
            result: Decision = analyse(job)
        except Exception as exc:  # noqa: BLE001 - a job that cannot even be read is refused, the worker lives
            result = refuse(f"pgwarden: statement could not be analysed ({type(exc).__name__}); refused",
                            reason=f"analysis worker: {exc!r}"[:300])
        try:
            conn.send_bytes(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
        except (OSError, ValueError):
            return


def _roundtrip(conn: multiprocessing.connection.Connection, message: bytes) -> bytes:
    """One job and its answer, on a worker's pipe (in a thread: the pipe blocks)."""
    conn.send_bytes(message)
    return conn.recv_bytes()


@dataclass
class _Worker:
    process: Any
    conn: multiprocessing.connection.Connection
    holds: set[tuple[str, int]] = field(default_factory=set)
    busy: asyncio.Future[Decision] | None = None
    timer: asyncio.TimerHandle | None = None


class AnalysisPool:
    """Runs :class:`rules.engine.Job` s in worker processes; started lazily, at the first large statement."""

    def __init__(self, limits: AnalysisLimits) -> None:
        self.limits = limits
        self._ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads and an event loop
        self._idle: list[_Worker] = []
        self._all: list[_Worker] = []
        self._waiting: deque[tuple[Job, asyncio.Future[Decision]]] = deque()
        # id(object) -> (object, token, pickled): each grants / catalog object is pickled once, and known to
        # the workers by a token that is never reused (an id can be, once the object is gone).
        self._blobs: dict[tuple[str, int], tuple[Any, int, bytes]] = {}
        self._tokens = 0
        self._threads = ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="pgwarden-analysis")
        self.jobs = 0
        self.timeouts = 0
        self.closed = False

    async def run(self, job: Job) -> Decision:
        """The decision for ``job``; never raises (a refusal says what went wrong)."""
        if self.closed:
            return refuse("pgwarden: the proxy is shutting down; statement refused", reason="shutting down")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Decision] = loop.create_future()
        if len(self._waiting) >= self.limits.queue:
            return refuse("pgwarden: too many large statements are being analysed right now; try again in a "
                          "moment", reason="analysis queue full")
        self._waiting.append((job, fut))
        self._dispatch()
        return await fut

    def _dispatch(self) -> None:
        while self._waiting:
            worker = self._idle.pop() if self._idle else self._spawn()
            if worker is None:
                return
            job, fut = self._waiting.popleft()
            if fut.done():
                self._idle.append(worker)
                continue
            self._start(worker, job, fut)

    def _spawn(self) -> _Worker | None:
        if len(self._all) >= self.limits.workers:
            return None
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=_serve, args=(child,), name="pgwarden-analysis", daemon=True)
        process.start()
        child.close()
        worker = _Worker(process, parent)
        self._all.append(worker)
        return worker

    def _blob(self, kind: str, obj: Any) -> tuple[tuple[str, int], bytes]:
        hit = self._blobs.get((kind, id(obj)))
        if hit is None or hit[0] is not obj:
            if len(self._blobs) > 64:
                self._blobs.clear()
            self._tokens += 1
            hit = (obj, self._tokens, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
            self._blobs[(kind, id(obj))] = hit
        return (kind, hit[1]), hit[2]

    def _start(self, worker: _Worker, job: Job, fut: asyncio.Future[Decision]) -> None:
        sent: dict[tuple[str, int], bytes] = {}
        gkey, gblob = self._blob("g", job.grants)
        ckey, cblob = self._blob("c", job.catalog)
        for key, blob in ((gkey, gblob), (ckey, cblob)):
            if key not in worker.holds:
                sent[key] = blob
                worker.holds.add(key)
        if len(worker.holds) > 64:
            worker.holds = {gkey, ckey}  # the worker forgets the rest too (see _serve)
        message = pickle.dumps(("job", sent, replace(job, key=(), grants=gkey[1], catalog=ckey[1])),
                               protocol=pickle.HIGHEST_PROTOCOL)
        worker.busy = fut
        self.jobs += 1
        loop = asyncio.get_running_loop()
        worker.timer = loop.call_later(self.limits.timeout, self._timed_out, worker)
        done = loop.run_in_executor(self._threads, _roundtrip, worker.conn, message)
        done.add_done_callback(lambda f: self._on_result(worker, fut, f))

    def _on_result(self, worker: _Worker, fut: asyncio.Future[Decision], done: asyncio.Future[bytes]) -> None:
        if not done.cancelled():
            done.exception()  # retrieved, so that an EOF after a kill is not reported as unhandled
        if worker.busy is not fut:
            return  # timed out (or closed) meanwhile: the worker is gone and its job already answered
        try:
            result = pickle.loads(done.result())
        except Exception as exc:  # noqa: BLE001 - EOF, a broken pipe, a result that cannot be read
            self._lost(worker, f"the analysis worker stopped ({type(exc).__name__})")
            return
        if worker.timer is not None:
            worker.timer.cancel()
        worker.busy = None
        if not fut.done():
            fut.set_result(result)
        self._idle.append(worker)
        self._dispatch()

    def _timed_out(self, worker: _Worker) -> None:
        self.timeouts += 1
        self._lost(worker, f"its analysis took longer than {self.limits.timeout:g} s (analysis.timeout)",
                   reason="analysis timed out")

    def _lost(self, worker: _Worker, why: str, reason: str = "analysis worker lost") -> None:
        """End a worker (killed or dead) and refuse its job; the next job starts a new one."""
        fut, worker.busy = worker.busy, None
        self._discard(worker)
        if fut is not None and not fut.done():
            fut.set_result(refuse(f"pgwarden: statement refused: {why}; simplify or split it", reason=reason))
        self._dispatch()

    def _discard(self, worker: _Worker) -> None:
        if worker.timer is not None:
            worker.timer.cancel()
        with contextlib.suppress(Exception):
            worker.conn.close()
        with contextlib.suppress(Exception):
            worker.process.kill()
            worker.process.join(timeout=1)
        if worker in self._all:
            self._all.remove(worker)
        if worker in self._idle:
            self._idle.remove(worker)

    def close(self) -> None:
        """Stop every worker; waiting jobs are refused."""
        self.closed = True
        while self._waiting:
            _, fut = self._waiting.popleft()
            if not fut.done():
                fut.set_result(refuse("pgwarden: the proxy is shutting down; statement refused",
                                      reason="shutting down"))
        for worker in list(self._all):
            fut, worker.busy = worker.busy, None
            self._discard(worker)
            if fut is not None and not fut.done():
                fut.set_result(refuse("pgwarden: the proxy is shutting down; statement refused",
                                      reason="shutting down"))
        self._threads.shutdown(wait=False)
