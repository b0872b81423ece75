"""`pgwarden serve` as a real subprocess with a real config file, for signal, worker and config tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.verifiers import make_md5, make_scram_verifier

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "demo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(cluster: Any, directory: Path, **extra: Any) -> Path:
    """A config file in front of the test cluster: users alice (scram), frank (scram), pms (md5)."""
    doc: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "upstream": {"host": cluster.host, "port": cluster.port, "user": cluster.service_user,
                     "password": cluster.service_password, "sslmode": "disable"},
        "audit": {"path": str(directory / "audit.jsonl")},
        "users": {
            "alice": {"role": "front_desk", "department": "FO", "password": make_scram_verifier(PASSWORD)},
            "frank": {"role": "security_director", "department": "SEC", "password": make_scram_verifier(PASSWORD)},
            "pms": {"role": "pms_integration", "method": "md5", "md5": make_md5(PASSWORD, "pms")},
        },
    }
    doc.update(extra)
    if "rules" in doc and "state" not in doc:
        doc["state"] = "off"  # guards are tested in test_guards.py
    path = directory / "pgwarden.yaml"
    path.write_text(json.dumps(doc, indent=2), encoding="utf-8")  # JSON is YAML
    return path


@dataclass
class Served:
    """A running `pgwarden serve`; its stdout lines are collected by a thread."""

    proc: subprocess.Popen[str]
    port: int = 0
    lines: list[str] = field(default_factory=list)
    _cv: threading.Condition = field(default_factory=threading.Condition)

    def dsn(self, user: str = "alice", database: str = "hotel", **params: str) -> str:
        extra = "".join(f" {k}={v}" for k, v in params.items())
        return f"host=127.0.0.1 port={self.port} dbname={database} user={user} password={PASSWORD}{extra}"

    def wait_line(self, prefix: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for line in self.lines:
                    if line.startswith(prefix):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reading):
                    raise AssertionError(f"no line {prefix!r} from pgwarden; got {self.lines!r}")
                self._cv.wait(min(left, 0.2))

    _reading: bool = True

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cv:
                self.lines.append(line.rstrip("\n"))
                self._cv.notify_all()
        with self._cv:
            self._reading = False
            self._cv.notify_all()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def serve(config: Path, *args: str, env: dict[str, str] | None = None) -> Served:
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--config", str(config), *args],
                            stdout=subprocess.PIPE, stderr=None, text=True, cwd=ROOT,
                            env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)
    s = Served(proc)
    threading.Thread(target=s._read, daemon=True).start()
    try:
        s.port = int(s.wait_line("listening ").split()[1])
    except BaseException:
        s.stop()
        raise
    return s


@contextlib.contextmanager
def served(config: Path, *args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    s = serve(config, *args, env=env)
    try:
        yield s
    finally:
        s.stop()
