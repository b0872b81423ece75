"""``pgwarden serve --workers N``: N processes on one port, one supervisor.

Python runs one core per process, so several processes share the listening
port with SO_REUSEPORT and the kernel spreads new connections over them. The
supervisor only starts, watches and signals its workers (SIGHUP and SIGTERM are
passed on; a worker that dies is started again); it serves no client itself.

A CancelRequest arrives on a fresh connection that the kernel may give to any
worker. Each worker listens on a unix socket in the supervisor's private
runtime directory; a worker that did not issue the key passes the (pid, secret)
to the others, and only the issuer acts on it (``Server.cancel``). Keys keep
their full 32 random bits.

Each worker writes its own audit file (``audit.jsonl`` -> ``audit-w1.jsonl``),
so every hash chain stays in one process and one file, and serves its metrics
on the configured port plus its number minus one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from proxy.audit.log import default_replica
from proxy.config import Config

RESTART_BACKOFF_MAX = 10.0
START_TIMEOUT = 60.0


def audit_path_for(path: str, index: int) -> str:
    """audit.jsonl -> audit-w2.jsonl (stdout stays stdout: one line per write, whole)."""
    if path == "-":
        return path
    p = Path(path)
    suffix = "".join(p.suffixes[-1:])
    stem = p.name[: len(p.name) - len(suffix)] if suffix else p.name
    return str(p.with_name(f"{stem}-w{index}{suffix}"))


def worker_config(cfg: Config, worker: tuple[int, int]) -> Config:
    """The configuration one worker runs with: its own audit file and metrics port."""
    index, _ = worker
    metrics = cfg.metrics_listen
    if metrics is not None and metrics[1]:
        metrics = (metrics[0], metrics[1] + index - 1)
    # Its own hash chain too: a replica name per worker (audit verify checks each chain on its own).
    replica = f"{cfg.audit_replica or default_replica(cfg.listen_port)}/w{index}"
    return replace(cfg, audit_path=audit_path_for(cfg.audit_path, index), audit_replica=replica,
                   metrics_listen=metrics)


def socket_path(runtime_dir: str, index: int) -> str:
    return os.path.join(runtime_dir, f"w{index}.sock")


def wire_worker(server: Any, worker: tuple[int, int], runtime_dir: str | None) -> None:
    """Share the port and reach the other workers for cancel requests."""
    index, count = worker
    server.reuse_port = True
    if runtime_dir:
        server.cancel_socket = socket_path(runtime_dir, index)
        server.peers = [socket_path(runtime_dir, j) for j in range(1, count + 1) if j != index]


def _reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) a SO_REUSEPORT socket: learns port 0's number and keeps it for the workers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host, port))
    return s


class Supervisor:
    """Starts N workers, passes signals on, restarts the ones that die."""

    def __init__(self, config_path: str, cfg: Config, count: int) -> None:
        self.config_path = config_path
        self.cfg = cfg
        self.count = count
        self.runtime_dir = tempfile.mkdtemp(prefix="pgwarden-workers-")
        os.chmod(self.runtime_dir, 0o700)
        self.port = cfg.listen_port
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.started: dict[int, float] = {}
        self.backoff: dict[int, float] = {}
        self.terms = 0
        self.hups = 0
        self.interrupted = False

    def spawn(self, index: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path(self.runtime_dir, index))
        argv = [sys.executable, "-m", "proxy.cli", "serve", "--config", self.config_path, "--port", str(self.port),
                "--worker", f"{index}/{self.count}", "--runtime-dir", self.runtime_dir]
        self.procs[index] = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        self.started[index] = time.monotonic()

    def wait_started(self, index: int) -> bool:
        """Until the worker's cancel socket exists: it is then listening on the shared port too."""
        deadline = time.monotonic() + START_TIMEOUT
        path = socket_path(self.runtime_dir, index)
        while time.monotonic() < deadline:
            if os.path.exists(path):
                return True
            if self.procs[index].poll() is not None:
                return False
            time.sleep(0.02)
        return False

    def signal_all(self, sig: int) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(sig)

    def run(self) -> int:
        holder = _reserve_port(self.cfg.listen_host, self.cfg.listen_port)
        self.port = holder.getsockname()[1]

        def on_term(_s: int, _f: Any) -> None:
            self.terms += 1

        def on_hup(_s: int, _f: Any) -> None:
            self.hups += 1

        def on_int(_s: int, _f: Any) -> None:
            self.interrupted = True

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGHUP, on_hup)
        signal.signal(signal.SIGINT, on_int)
        try:
            for i in range(1, self.count + 1):
                self.spawn(i)
            for i in range(1, self.count + 1):
                if not self.wait_started(i):
                    print(f"pgwarden: worker {i} did not start", file=sys.stderr, flush=True)
                    self.signal_all(signal.SIGINT)
                    return 1
            print(f"listening {self.port}", flush=True)
            print("workers " + " ".join(str(self.procs[i].pid) for i in sorted(self.procs)), flush=True)
            return self._watch()
        finally:
            for p in self.procs.values():
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(10)
            holder.close()
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def _watch(self) -> int:
        terms_sent = hups_sent = 0
        while True:
            if self.hups > hups_sent:
                hups_sent = self.hups
                self.signal_all(signal.SIGHUP)
            if self.interrupted:
                self.signal_all(signal.SIGINT)
                self.interrupted = False
                terms_sent = max(terms_sent, 1)
            if self.terms > terms_sent:
                self.signal_all(signal.SIGTERM)  # the first drains, a second stops at once
                terms_sent = self.terms
            stopping = terms_sent > 0
            for i, p in list(self.procs.items()):
                code = p.poll()
                if code is None or stopping:
                    continue
                lived = time.monotonic() - self.started[i]
                delay = 0.0 if lived > RESTART_BACKOFF_MAX else min(RESTART_BACKOFF_MAX,
                                                                     max(0.5, 2 * self.backoff.get(i, 0.25)))
                self.backoff[i] = delay
                print(f"pgwarden: worker {i} (pid {p.pid}) exited with code {code}; restarting"
                      + (f" in {delay:.1f}s" if delay else ""), file=sys.stderr, flush=True)
                time.sleep(delay)
                self.spawn(i)
                if self.wait_started(i):
                    print(f"worker {i} restarted pid {self.procs[i].pid}", flush=True)
            if stopping and all(p.poll() is not None for p in self.procs.values()):
                return 0
            time.sleep(0.05)


def supervise(config_path: str, cfg: Config, count: int) -> int:
    return Supervisor(config_path, cfg, count).run()
