#!/usr/bin/env python3
"""pgbench select-only: direct PostgreSQL vs pgbouncer vs pgwarden (without and with rules), in one run.

Why this exists
---------------
pgwarden sits on every statement's path, so its cost per statement is a product
property. The honest yardstick is pgbouncer (a C proxy doing much less work) and
PostgreSQL itself. Comparing numbers from different runs, days or machines is
noise, so this script measures all targets *in the same run*, interleaved
round by round (the target order rotates each round), and reports medians and
same-round ratios.

Targets: ``direct`` (PostgreSQL), ``pgbouncer``, ``pgwarden`` (no rules: an
audited relay) and ``rules`` (a second pgwarden with access rules, so every
statement is parsed, checked and rewritten). ``rules/pgwarden`` is the cost of
the rules themselves. Rewrite decisions are cached by exact statement text, so
``-M extended``/``prepared`` (one text with $1) hit the cache, while
``-M simple`` inlines a new literal in every statement and pays a full parse +
rewrite each time: expect ``rules`` simple to be far slower. That is a finding
to report, not a failure.

What it does
------------
* starts a throwaway PostgreSQL cluster (proxy.pgcluster.PgCluster), creates the
  ``bench`` database with ``pgbench -i -s SCALE`` and grants the pgbench tables
  to ``pgwarden_svc``: every target logs in upstream as that same role, so
  they hit the same privileges;
* installs pgbouncer with apt-get if missing (root only), runs it in session
  pool mode as an unprivileged user (pgbouncer refuses root);
* runs ``.venv/bin/pgwarden serve`` as a separate process, so its CPU time can be
  read from /proc/<pid>/stat before and after each pgbench run (same for
  pgbouncer), giving *proxy CPU per transaction*; the ``rules`` target is a
  second such process whose config names a rules file written into the temp
  dir (every pgbench table granted; pgbench_accounts filtered on
  ``bid IN (1..SCALE)``, which keeps every row, so results stay comparable);
* before timing, checks through psql that ``count(*)`` of pgbench_accounts is
  the same through ``rules`` as direct, and records ``pgwarden explain`` of
  the pgbench statement and PostgreSQL's ``EXPLAIN`` of it through ``rules``
  (does the rewritten query still use the primary key index?);
* for each round x mode x target runs
  ``pgbench -n -S -M MODE -c CLIENTS -j THREADS -T SECONDS`` and parses TPS,
  average latency, processed and failed transactions. Any failure (non-zero
  exit, failed transactions, timeout) is printed loudly with pgbench's output,
  the proxy's stderr and the last audit lines.

Everything talks to 127.0.0.1 only, every subprocess has a timeout, and every
process and temp dir is removed in ``finally`` (also on Ctrl-C / SIGTERM).

Run: ``.venv/bin/python tests/bench/bench.py [--rounds 3] [--seconds 10]
[--clients 4] [--scale 10] [--modes simple,extended,prepared] [--json out.json]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import pwd
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from proxy.verifiers import make_scram_verifier  # noqa: E402
from proxy.demo.pgcluster import PgCluster  # noqa: E402

TARGETS = ("direct", "pgbouncer", "pgwarden", "metrics", "pgwarden-w2", "rules", "rules-nowa", "guards")
MODES = ("simple", "extended", "prepared")
#: Same-round ratios; rules/pgwarden is the cost of the access rules alone.
RATIOS = (("pgbouncer", "direct"), ("pgwarden", "direct"), ("pgwarden", "pgbouncer"),
          ("metrics", "pgwarden"), ("pgwarden-w2", "pgwarden"), ("rules", "pgwarden"), ("rules", "direct"),
          ("guards", "rules"), ("rules", "rules-nowa"))
BENCH_DB = "bench"
BENCH_USER, BENCH_PASSWORD = "bench", "benchpw"
CLK_TCK = os.sysconf("SC_CLK_TCK")

#: PG* variables that would redirect pgbench/psql somewhere else than we say.
_PG_ENV = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGUSER", "PGDATABASE", "PGPASSWORD", "PGPASSFILE",
           "PGSERVICE", "PGSERVICEFILE", "PGOPTIONS", "PGSSLMODE", "PGTARGETSESSIONATTRS", "PGAPPNAME")


class BenchError(RuntimeError):
    """Setup failed; the message says what and how to fix it."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def banner(msg: str) -> None:
    """Failures must not scroll by unnoticed among the progress lines."""
    line = "!" * 78
    print(f"\n{line}\n{msg}\n{line}\n", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen[Any] | None, timeout: float, what: str) -> None:
    """Wait until 127.0.0.1:port accepts, failing fast if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what} exited with code {proc.returncode} before accepting connections")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise BenchError(f"{what} did not accept connections on 127.0.0.1:{port} within {timeout:.0f}s")


def cpu_seconds(pid: int) -> float:
    """utime+stime of a live process (all threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as fh:
        stat = fh.read()
    # Field 2 (comm) may contain spaces: split after its closing parenthesis.
    rest = stat[stat.rindex(")") + 2:].split()
    utime, stime = int(rest[11]), int(rest[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / CLK_TCK


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and of its live descendants (``--workers``: the supervisor and its workers)."""
    total = cpu_seconds(pid)
    with contextlib.suppress(OSError):
        for kid in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            with contextlib.suppress(OSError):
                total += tree_cpu_seconds(int(kid))
    return total


def children_cpu_seconds() -> float:
    """CPU of our reaped children: the delta around one pgbench run is pgbench's own CPU."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def host_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine: shows CPU taken by anything else running."""
    with open("/proc/stat") as fh:
        vals = [float(v) for v in fh.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0.0)  # idle + iowait
    total = sum(vals[:8])  # guest time is already counted in user
    return total - idle, total


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _PG_ENV}
    env.update(LC_ALL="C", PGCONNECT_TIMEOUT="10", PGSSLMODE="disable")
    env.update(extra)
    return env


def run(argv: list[str], *, timeout: float, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env or clean_env(),
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise BenchError(f"{' '.join(argv[:3])}... failed (exit {proc.returncode}):\n"
                         f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def tail(path: Path, lines: int = 20) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            text = fh.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def stop_process(proc: subprocess.Popen[Any] | None, name: str, sig: int = signal.SIGTERM) -> None:
    """Ask politely, then kill; only ever the process we started, by pid."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        log(f"{name} (pid {proc.pid}) ignored SIGTERM for 10s: killing it")
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


# --------------------------------------------------------------------------
# Machine description
# --------------------------------------------------------------------------


def machine_info(pgwarden_pid: int | None) -> dict[str, Any]:
    """What the numbers depend on; a ratio from a 2-vCPU box is not one from a 32-core one."""
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "nproc_usable": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "python_impl": platform.python_implementation(),
        "platform": platform.platform(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    try:
        import uvloop

        info["uvloop_installed"] = uvloop.__version__
    except ImportError:
        info["uvloop_installed"] = None
    if pgwarden_pid is not None:
        # The truth is in the running proxy: is uvloop's extension mapped in it?
        with contextlib.suppress(OSError):
            info["pgwarden_uses_uvloop"] = "uvloop" in Path(f"/proc/{pgwarden_pid}/maps").read_text()
    for name, argv in (("pgbench", ["pgbench", "--version"]), ("pgbouncer", [pgbouncer_path() or "pgbouncer", "--version"])):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            info[name] = run(argv, timeout=10).stdout.splitlines()[0].strip()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], timeout=10).stdout.strip()
        dirty = run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "proxy", "rules", "masking"],
                    timeout=10).stdout.strip()
        info["pgwarden_commit"] = head + ("+dirty" if dirty else "")
    return info


# --------------------------------------------------------------------------
# The targets
# --------------------------------------------------------------------------


def pgbouncer_path() -> str | None:
    found = shutil.which("pgbouncer")
    if found:
        return found
    for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"):
        if os.access(p, os.X_OK):
            return p
    return None


def ensure_pgbouncer() -> str:
    """pgbouncer's binary, apt-installing the Debian package if we may."""
    found = pgbouncer_path()
    if found:
        return found
    if os.geteuid() != 0:
        raise BenchError("pgbouncer is not installed and we are not root, so it cannot be installed here.\n"
                         "Install it (sudo apt-get install -y pgbouncer) or leave it out: --targets direct,pgwarden")
    log("pgbouncer not found: apt-get install -y pgbouncer")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    proc = subprocess.run(["apt-get", "install", "-y", "-q", "pgbouncer"], capture_output=True, text=True,
                          timeout=600, env=env, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:  # stale package lists are the usual reason: refresh once
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=600, env=env,
                       stdin=subprocess.DEVNULL)
        proc = subprocess.run(["apt-get", "install", "-y", "-q", "pgbouncer"], capture_output=True, text=True,
                              timeout=600, env=env, stdin=subprocess.DEVNULL)
    found = pgbouncer_path()
    if proc.returncode != 0 or not found:
        raise BenchError(f"apt-get install pgbouncer failed:\n{proc.stderr[-2000:] or proc.stdout[-2000:]}")
    return found


@dataclass
class Target:
    name: str
    port: int
    user: str
    password: str
    proc: subprocess.Popen[Any] | None = None  # the proxy whose CPU we measure
    stderr_path: Path | None = None
    audit_path: Path | None = None
    config_path: Path | None = None  # pgwarden targets: for `pgwarden explain`
    metrics_port: int | None = None  # target `metrics`: scraped during its runs


def setup_database(cluster: PgCluster, scale: int) -> None:
    """bench database, pgbench tables owned by the superuser, readable by pgwarden_svc."""
    cluster.psql(f"CREATE DATABASE {BENCH_DB};\nGRANT CONNECT ON DATABASE {BENCH_DB} TO {cluster.service_user};\n",
                 database="postgres")
    t0 = time.monotonic()
    run(["pgbench", "-i", "-q", "-s", str(scale), "-h", cluster.host, "-p", str(cluster.port),
         "-U", cluster.superuser, BENCH_DB],
        timeout=900, env=clean_env(PGPASSWORD=cluster.superuser_password))
    log(f"pgbench -i -s {scale}: {time.monotonic() - t0:.1f}s")
    cluster.psql(
        f"GRANT USAGE ON SCHEMA public TO {cluster.service_user};\n"
        "GRANT SELECT, INSERT, UPDATE ON pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history "
        f"TO {cluster.service_user};\n",
        database=BENCH_DB,
    )


def start_pgbouncer(cluster: PgCluster, workdir: Path) -> Target:
    """Session pooling, SCRAM on both sides, as an unprivileged user when we are root."""
    exe = ensure_pgbouncer()
    d = workdir / "pgbouncer"
    d.mkdir()
    d.chmod(0o755)
    port = free_port()
    (d / "userlist.txt").write_text(f'"{cluster.service_user}" "{cluster.service_password}"\n')
    (d / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"{BENCH_DB} = host=127.0.0.1 port={cluster.port} dbname={BENCH_DB}\n"
        "\n[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "pool_mode = session\n"
        "auth_type = scram-sha-256\n"
        f"auth_file = {d / 'userlist.txt'}\n"
        "max_client_conn = 100\n"
        "default_pool_size = 20\n"
        "ignore_startup_parameters = extra_float_digits\n"
        "server_tls_sslmode = disable\n"
        "client_tls_sslmode = disable\n"
        "syslog = 0\n"
        "log_connections = 0\n"
        "log_disconnections = 0\n"
    )
    run_user = None
    if os.geteuid() == 0:
        run_user = cluster.run_user or "nobody"  # pgbouncer refuses to run as root
        pw = pwd.getpwnam(run_user)
        for p in (d / "userlist.txt", d / "pgbouncer.ini"):
            os.chown(p, pw.pw_uid, pw.pw_gid)
            p.chmod(0o600)
    stderr_path = workdir / "pgbouncer.stderr"
    with open(stderr_path, "wb") as err:
        # Popen's user=/group= drop privileges by exec, not by fork (unlike runuser),
        # so proc.pid is pgbouncer itself and /proc/<pid>/stat is its CPU.
        kwargs: dict[str, Any] = {}
        if run_user is not None:
            pw = pwd.getpwnam(run_user)
            kwargs = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        proc = subprocess.Popen([exe, str(d / "pgbouncer.ini")], stdin=subprocess.DEVNULL,
                                stdout=err, stderr=subprocess.STDOUT, cwd=str(d), env=clean_env(), **kwargs)
    target = Target("pgbouncer", port, cluster.service_user, cluster.service_password, proc, stderr_path)
    try:
        wait_port(port, proc, 30, "pgbouncer")
    except BenchError as exc:
        stop_process(proc, "pgbouncer")
        raise BenchError(f"{exc}\n--- pgbouncer output ---\n{tail(stderr_path)}") from exc
    return target


def pgwarden_exe() -> Path:
    exe = ROOT / ".venv" / "bin" / "pgwarden"
    if not os.access(exe, os.X_OK):
        found = shutil.which("pgwarden")
        if not found:
            raise BenchError(f"{exe} not found: install the project (pip install -e .) into .venv")
        exe = Path(found)
    return exe


def write_bench_rules(path: Path, scale: int, *, guards: bool = False) -> None:
    """Rules that cost what real rules cost (parse, check, rewrite with a row filter) but keep every row.

    pgbench -S reads pgbench_accounts; pgbench itself also counts pgbench_branches at start,
    so every pgbench table is granted. The filter bid IN (1..scale) matches all rows that
    ``pgbench -i -s scale`` creates, so every target returns the same data.
    """
    rules = {
        "timezone": "UTC",
        "tables": {f"public.{t}": {} for t in
                   ("pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history")},
        "roles": {"bench": {"grants": {
            "public.pgbench_accounts": {"rows": [{"column": {"name": "bid", "in": list(range(1, scale + 1))}}]},
            "public.pgbench_branches": {},
            "public.pgbench_tellers": {},
            "public.pgbench_history": {},
        }}},
    }
    if guards:
        # Target `guards`: every pgbench -S statement (WHERE aid = $1) is a lookup of one "guest",
        # counted in the state store: the guards' round trip on every statement, the worst case.
        rules["tables"]["public.pgbench_accounts"] = {"subject_key": "aid"}
        rules["roles"]["bench"]["guest_lookups"] = 1_000_000_000
    path.write_text(json.dumps(rules, indent=2))  # JSON is YAML


def start_pgwarden(cluster: PgCluster, workdir: Path, name: str = "pgwarden",
                   rules_path: Path | None = None, *, metrics: bool = False, workers: int = 1,
                   state: dict[str, Any] | None = None, audit: dict[str, Any] | None = None) -> Target:
    """The console script in its own process: we measure its CPU, not ours.

    ``rules_path`` set: the ``rules`` target, a second, separate pgwarden, so both can be
    measured in the same rounds without one's caches or CPU mixing with the other's.
    """
    exe = pgwarden_exe()
    audit_extra = audit
    d = workdir / name
    d.mkdir()
    port = free_port()
    audit = d / "audit.jsonl"
    cfg = {
        "listen": {"host": "127.0.0.1", "port": port},
        "upstream": {"host": "127.0.0.1", "port": cluster.port, "user": cluster.service_user,
                     "password": cluster.service_password, "sslmode": "disable"},
        "audit": {"path": str(audit), **(audit_extra or {})},
        "users": {BENCH_USER: {"password": make_scram_verifier(BENCH_PASSWORD), "role": "bench"}},
    }
    if rules_path is not None:
        cfg["rules"] = str(rules_path.resolve())
        cfg["state"] = state or "off"  # `rules` measures the rules alone; `guards` adds the state store
    if metrics:  # target `metrics`: counters on and the HTTP listener up (scraped once a second below)
        cfg["metrics"] = {"listen": f"127.0.0.1:{free_port()}"}
    cfg_path = d / "pgwarden.yaml"
    cfg_path.write_text(json.dumps(cfg, indent=2))  # JSON is YAML
    stdout_path, stderr_path = d / "stdout.log", d / "stderr.log"
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen([str(exe), "serve", "--config", str(cfg_path), "--workers", str(workers)],
                                stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, cwd=str(d), env=clean_env())
    target = Target(name, port, BENCH_USER, BENCH_PASSWORD, proc, stderr_path, audit, cfg_path,
                    int(cfg["metrics"]["listen"].rsplit(":", 1)[1]) if metrics else None)
    try:
        deadline = time.monotonic() + 60
        while b"listening" not in stdout_path.read_bytes():
            if proc.poll() is not None:
                raise BenchError(f"{name} exited with code {proc.returncode} during start-up")
            if time.monotonic() > deadline:
                raise BenchError(f"{name} did not print 'listening <port>' within 60s")
            time.sleep(0.05)
        m = re.search(rb"listening (\d+)", stdout_path.read_bytes())
        if m and int(m.group(1)) != port:
            target.port = int(m.group(1))
        wait_port(target.port, proc, 30, name)
    except BenchError as exc:
        stop_process(proc, name)
        raise BenchError(f"{exc}\n--- {name} stdout ---\n{tail(stdout_path)}\n"
                         f"--- {name} stderr ---\n{tail(stderr_path)}") from exc
    return target


def smoke_test(target: Target) -> None:
    """One query per target before timing anything, so a login problem is a clear setup error."""
    proc = run(["psql", "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(target.port), "-U", target.user,
                "-d", BENCH_DB, "-c", "SELECT count(*) FROM pgbench_branches"],
               timeout=30, env=clean_env(PGPASSWORD=target.password), check=False)
    if proc.returncode != 0:
        raise BenchError(f"smoke test through {target.name} failed (exit {proc.returncode}):\n"
                         f"{proc.stderr.strip()}{diagnostics(target)}")


def psql_query(port: int, user: str, password: str, sql: str) -> subprocess.CompletedProcess[str]:
    return run(["psql", "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(port), "-U", user, "-d", BENCH_DB,
                "-c", sql], timeout=60, env=clean_env(PGPASSWORD=password), check=False)


PGBENCH_SELECT = "SELECT abalance FROM pgbench_accounts WHERE aid = 1"


def check_rules_target(target: Target, cluster: PgCluster) -> dict[str, Any]:
    """Before timing: same rows through the rules as direct, and what the rewrite does to the plan.

    A row filter that dropped rows would make ``rules`` look faster for the wrong reason, so a
    count mismatch is a setup error. The rewritten text and PostgreSQL's plan for it are only
    recorded (and printed in the report header): whether the primary key index survives the
    rewrite is what decides how ``rules`` scales with table size.
    """
    out: dict[str, Any] = {}
    sql = "SELECT count(*) FROM pgbench_accounts"
    ref = psql_query(cluster.port, cluster.service_user, cluster.service_password, sql)
    got = psql_query(target.port, target.user, target.password, sql)
    if ref.returncode != 0 or got.returncode != 0:
        raise BenchError(f"count(*) check failed: direct exit {ref.returncode} {ref.stderr.strip()}; "
                         f"{target.name} exit {got.returncode} {got.stderr.strip()}{diagnostics(target)}")
    out["count_direct"], out["count_rules"] = ref.stdout.strip(), got.stdout.strip()
    if out["count_direct"] != out["count_rules"]:
        raise BenchError(f"{target.name} returns {out['count_rules']} rows of pgbench_accounts, direct "
                         f"{out['count_direct']}: the bench rules filter rows, so TPS would not be comparable")
    log(f"{target.name}: count(*) of pgbench_accounts = {out['count_rules']} (same as direct)")
    exp_ = run([str(pgwarden_exe()), "explain", "--config", str(target.config_path), "--user", target.user,
                "--database", BENCH_DB, "--sql", PGBENCH_SELECT], timeout=60, check=False)
    out["pgwarden_explain"] = (exp_.stdout + exp_.stderr).rstrip()
    if exp_.returncode != 0:
        out["pgwarden_explain"] += f"\n(pgwarden explain exited with code {exp_.returncode})"
    plan = psql_query(target.port, target.user, target.password, f"EXPLAIN {PGBENCH_SELECT}")
    out["pg_explain"] = (plan.stdout if plan.returncode == 0 else
                         f"(EXPLAIN failed, exit {plan.returncode}) {plan.stderr}").rstrip()
    out["pg_explain_index_scan_on_pkey"] = bool(
        plan.returncode == 0 and re.search(r"Index (Only )?Scan using pgbench_accounts_pkey", plan.stdout))
    return out


def diagnostics(target: Target) -> str:
    """What the lead needs when a proxy misbehaves: its stderr and its last audit lines."""
    out = ""
    if target.proc is not None:
        state = "running" if target.proc.poll() is None else f"EXITED with code {target.proc.returncode}"
        out += f"\n--- {target.name} process (pid {target.proc.pid}): {state} ---"
    if target.stderr_path is not None:
        out += f"\n--- {target.name} stderr (tail) ---\n{tail(target.stderr_path, 40)}"
    if target.audit_path is not None:
        out += f"\n--- {target.name} audit (last lines) ---\n{tail(target.audit_path, 10)}"
    return out


# --------------------------------------------------------------------------
# One pgbench run
# --------------------------------------------------------------------------


@dataclass
class Result:
    round: int
    mode: str
    target: str
    ok: bool = False
    tps: float | None = None
    latency_ms: float | None = None
    transactions: int | None = None
    failed: int | None = None
    proxy_cpu_s: float | None = None
    proxy_cpu_us_per_txn: float | None = None
    pgbench_cpu_us_per_txn: float | None = None
    audit_lines_per_txn: float | None = None
    wall_s: float | None = None
    host_busy_pct: float | None = None  # whole machine, all CPUs: 100 = every CPU busy
    error: str | None = None
    output: str = field(default="", repr=False)


_RE = {
    "tps": re.compile(r"^tps = ([\d.]+) \(without initial connection time\)", re.M),
    "latency_ms": re.compile(r"^latency average = ([\d.]+) ms", re.M),
    "transactions": re.compile(r"^number of transactions actually processed: (\d+)", re.M),
    "failed": re.compile(r"^number of failed transactions: (\d+)", re.M),
}


def pgbench_run(target: Target, mode: str, args: argparse.Namespace, rnd: int, seconds: float) -> Result:
    res = Result(rnd, mode, target.name)
    argv = ["pgbench", "-n", "-S", "-M", mode, "-c", str(args.clients), "-j", str(min(args.threads, args.clients)),
            "-T", str(seconds), "-h", "127.0.0.1", "-p", str(target.port), "-U", target.user, BENCH_DB]
    if target.proc is not None and target.proc.poll() is not None:
        res.error = f"{target.name} is not running (exit code {target.proc.returncode})"
        return res
    audit_before = count_audit(target.audit_path)
    cpu0 = tree_cpu_seconds(target.proc.pid) if target.proc is not None else None
    scraper = Scraper(target.metrics_port) if target.metrics_port else None
    child0 = children_cpu_seconds()
    host0 = host_cpu()
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=clean_env(PGPASSWORD=target.password))
    try:
        out, _ = proc.communicate(timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=30)
        res.error = f"pgbench HUNG: no exit {seconds + 60:.0f}s after a {seconds}s run; killed"
    except BaseException:  # Ctrl-C / SIGTERM: do not leave pgbench behind
        proc.kill()
        with contextlib.suppress(Exception):
            proc.wait(timeout=10)
        raise
    res.wall_s = time.monotonic() - t0
    if scraper is not None:
        scraper.stop()
    host1 = host_cpu()
    if host1[1] > host0[1]:
        res.host_busy_pct = 100.0 * (host1[0] - host0[0]) / (host1[1] - host0[1])
    res.output = out
    pgbench_cpu = children_cpu_seconds() - child0
    if target.proc is not None:
        try:
            res.proxy_cpu_s = tree_cpu_seconds(target.proc.pid) - (cpu0 or 0.0)
        except OSError:
            res.error = (res.error or "") + f" {target.name} process died during the run"
    for key, rx in _RE.items():
        m = rx.search(out)
        if m:
            setattr(res, key, float(m.group(1)) if key in ("tps", "latency_ms") else int(m.group(1)))
    if res.transactions:
        if res.proxy_cpu_s is not None:
            res.proxy_cpu_us_per_txn = res.proxy_cpu_s / res.transactions * 1e6
        res.pgbench_cpu_us_per_txn = pgbench_cpu / res.transactions * 1e6
        if target.audit_path is not None:
            res.audit_lines_per_txn = (count_audit(target.audit_path) - audit_before) / res.transactions
    if res.error is None:
        if proc.returncode != 0:
            res.error = f"pgbench exited with code {proc.returncode}"
        elif res.tps is None or not res.transactions:
            res.error = "pgbench printed no tps / no transactions"
        elif res.failed:
            res.error = f"{res.failed} FAILED transactions"
    res.ok = res.error is None
    return res


ISOLATION_ITEMS = 30_000


def isolation_run(target: Target, workdir: Path, seconds: int) -> dict[str, Any]:
    """One client sends a 30,000-item IN list without pause (a new literal each time, so no cache
    helps); another sends SELECT 1. Returns the second one's latency percentiles (issue 11: an
    analysis never blocks other sessions) and how many large statements were answered."""
    d = workdir / f"isolation-{target.name}"
    d.mkdir(exist_ok=True)
    big = d / "big.sql"
    big.write_text("\\set r random(1, 1000000000)\n"
                   "SELECT count(*) FROM pgbench_accounts WHERE abalance IN (:r, "
                   + ", ".join(str(i) for i in range(1, ISOLATION_ITEMS)) + ");\n")
    one = d / "one.sql"
    one.write_text("SELECT 1;\n")
    base = ["-n", "-M", "simple", "-c", "1", "-h", "127.0.0.1", "-p", str(target.port), "-U", target.user]
    env = clean_env(PGPASSWORD=target.password)
    hammer = subprocess.Popen(["pgbench", *base, "-f", str(big), "-T", str(seconds + 2), BENCH_DB],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env)
    try:
        time.sleep(1)  # the first large statement is being analysed
        probe = run(["pgbench", *base, "-f", str(one), "-T", str(seconds), "-l", "--log-prefix",
                     str(d / "probe"), BENCH_DB], timeout=seconds + 60, env=env, check=False)
        out, _ = hammer.communicate(timeout=seconds + 120)
    finally:
        if hammer.poll() is None:
            hammer.kill()
            hammer.wait(timeout=10)
    lat = sorted(int(line.split()[2]) / 1000.0 for f in d.glob("probe*") for line in f.read_text().splitlines()
                 if len(line.split()) >= 3)
    m = re.search(r"number of transactions actually processed: (\d+)", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    if not lat or probe.returncode != 0:
        return {"error": f"probe failed (exit {probe.returncode}): {probe.stdout[-500:]} {probe.stderr[-500:]}"}
    return {"select1_p50_ms": lat[len(lat) // 2], "select1_p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
            "select1_max_ms": lat[-1], "select1_n": len(lat),
            "large_statements": int(m.group(1)) if m else None, "large_failed": int(failed.group(1)) if failed else None}


def count_lines(path: Path | None) -> int:
    if path is None:
        return 0
    n = 0
    with contextlib.suppress(OSError), open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            n += chunk.count(b"\n")
    return n


def audit_files(path: Path | None) -> list[Path]:
    """The audit file, or with --workers each worker's (audit-w1.jsonl, ...)."""
    if path is None:
        return []
    return [path, *sorted(path.parent.glob(f"{path.stem}-w*{path.suffix}"))]


def count_audit(path: Path | None) -> int:
    return sum(count_lines(p) for p in audit_files(path))


def trim_audit(target: Target) -> None:
    """Keep the audit file small between runs (pgwarden appends with O_APPEND, so truncation is safe)."""
    for p in audit_files(target.audit_path):
        with contextlib.suppress(OSError):
            if p.stat().st_size > 64 << 20:
                os.truncate(p, 0)


class Scraper:
    """GET /metrics once a second during a run, as Prometheus would: the scrape's cost is measured too."""

    def __init__(self, port: int) -> None:
        import threading

        self.port = port
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import urllib.request

        while not self._stop.wait(1.0):
            with contextlib.suppress(OSError), urllib.request.urlopen(
                    f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
                r.read()
                self.scrapes += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def median(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def summarize(results: list[Result], modes: list[str], targets: list[str]) -> dict[str, Any]:
    """Medians per (mode, target) and medians of same-round ratios (rounds share machine state)."""
    summary: dict[str, Any] = {}
    for mode in modes:
        per: dict[str, Any] = {}
        for t in targets:
            rs = [r for r in results if r.mode == mode and r.target == t]
            ok = [r for r in rs if r.ok]
            per[t] = {
                "runs": len(rs), "ok_runs": len(ok),
                "tps": median([r.tps for r in ok]),
                "latency_ms": median([r.latency_ms for r in ok]),
                "proxy_cpu_us_per_txn": median([r.proxy_cpu_us_per_txn for r in ok]),
                "pgbench_cpu_us_per_txn": median([r.pgbench_cpu_us_per_txn for r in ok]),
                "audit_lines_per_txn": median([r.audit_lines_per_txn for r in ok]),
                "host_busy_pct": median([r.host_busy_pct for r in ok]),
                "failed_transactions": sum(r.failed or 0 for r in rs),
            }
        ratios: dict[str, Any] = {}
        for num, den in RATIOS:
            if num not in targets or den not in targets:
                continue
            tps_r, lat_r = [], []
            for rnd in sorted({r.round for r in results}):
                a = next((r for r in results if r.round == rnd and r.mode == mode and r.target == num and r.ok), None)
                b = next((r for r in results if r.round == rnd and r.mode == mode and r.target == den and r.ok), None)
                if a and b and a.tps and b.tps and a.latency_ms and b.latency_ms:
                    tps_r.append(a.tps / b.tps)
                    lat_r.append(a.latency_ms / b.latency_ms)
            ratios[f"{num}/{den}"] = {"tps": median(tps_r), "latency": median(lat_r), "rounds": len(tps_r)}
        summary[mode] = {"targets": per, "ratios": ratios}
    return summary


def print_report(summary: dict[str, Any], results: list[Result], machine: dict[str, Any],
                 args: argparse.Namespace, targets: list[str]) -> None:
    p = print
    p("")
    p("=" * 96)
    p(f"pgbench -S (select-only): {args.rounds} round(s) x {args.seconds}s, {args.clients} clients, "
      f"{min(args.threads, args.clients)} threads, scale {args.scale}")
    p(f"machine: nproc={machine.get('nproc')} (usable {machine.get('nproc_usable')}), "
      f"cpu={machine.get('cpu_model', '?')}")
    p(f"python {machine.get('python')}, uvloop installed={machine.get('uvloop_installed')}, "
      f"pgwarden uses uvloop={machine.get('pgwarden_uses_uvloop')}; commit {machine.get('pgwarden_commit', '?')}")
    p(f"{machine.get('pgbench', '')}; {machine.get('pgbouncer', '')}")
    la = machine.get("loadavg_at_start")
    if la:
        p(f"load average before the runs: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}"
          + ("   <-- OTHER WORK WAS RUNNING: numbers are noisy" if la[0] > 0.5 * (machine.get("nproc") or 1) else ""))
    rc = machine.get("rules_checks")
    if rc:
        p("-" * 96)
        p("rules target: pgbench_accounts filtered on bid IN (1..scale); "
          f"count(*) rules={rc['count_rules']} direct={rc['count_direct']}")
        p(f"pgwarden explain --user {BENCH_USER} --sql \"{PGBENCH_SELECT}\":")
        p("    " + rc["pgwarden_explain"].replace("\n", "\n    "))
        p(f"EXPLAIN {PGBENCH_SELECT}  (through rules, as {BENCH_USER}):")
        p("    " + rc["pg_explain"].replace("\n", "\n    "))
        p("Index Scan on pgbench_accounts_pkey: "
          + ("YES" if rc["pg_explain_index_scan_on_pkey"] else
             "NO  <-- the rewrite lost the primary key lookup: each rules transaction reads the whole\n"
             "    table, so rules TPS measures PostgreSQL's scan in every mode; the proxy's own cost of the\n"
             "    rules is in 'proxy CPU us/txn' (simple: uncached parse+rewrite; extended/prepared: cached)"))
    p("=" * 96)
    hdr = (f"{'mode':<9} {'target':<10} {'ok/runs':>7} {'TPS (med)':>11} {'lat ms':>8} "
           f"{'proxy CPU us/txn':>17} {'pgbench CPU us/txn':>19} {'host busy':>9} {'failed txn':>10}")
    p(hdr)
    p("-" * len(hdr))
    for mode, s in summary.items():
        for t in targets:
            d = s["targets"][t]
            p(f"{mode:<9} {t:<10} {str(d['ok_runs']) + '/' + str(d['runs']):>7} {fmt(d['tps'], ',.0f'):>11} "
              f"{fmt(d['latency_ms'], '.3f'):>8} {fmt(d['proxy_cpu_us_per_txn'], '.1f'):>17} "
              f"{fmt(d['pgbench_cpu_us_per_txn'], '.1f'):>19} {fmt(d['host_busy_pct'], '.0f') + '%':>9} "
              f"{d['failed_transactions']:>10}")
    p("")
    p("Same-round ratios (median over rounds; TPS ratio < 1 = slower, latency ratio > 1 = slower):")
    hdr2 = f"{'mode':<9} {'ratio':<20} {'TPS':>8} {'latency':>8} {'rounds':>6}"
    p(hdr2)
    p("-" * len(hdr2))
    for mode, s in summary.items():
        for k, v in s["ratios"].items():
            p(f"{mode:<9} {k:<20} {fmt(v['tps'], '.3f'):>8} {fmt(v['latency'], '.2f'):>8} {v['rounds']:>6}")
    bad = [r for r in results if not r.ok]
    if bad:
        p("")
        p(f"!!! {len(bad)} run(s) FAILED — see the banners above; they are excluded from the medians:")
        for r in bad:
            p(f"!!!   round {r.round} {r.mode:<9} {r.target:<10} {r.error}")
    p("=" * 96)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--seconds", type=int, default=10, help="pgbench -T per run (default 10)")
    ap.add_argument("--clients", type=int, default=4, help="pgbench -c (default 4)")
    ap.add_argument("--threads", type=int, default=2, help="pgbench -j (default 2, capped at --clients)")
    ap.add_argument("--scale", type=int, default=10, help="pgbench -i -s (default 10)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma list of simple,extended,prepared")
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma list of " + ",".join(TARGETS))
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured seconds per target before round 1 (0: none)")
    ap.add_argument("--json", type=Path, help="write machine, settings, every run and the summary here")
    ap.add_argument("--isolation", type=int, default=8,
                    help="seconds of the isolation run (0: none): while one client sends 30,000-item IN lists "
                         "without pause, another's SELECT 1 latency (p50/p99/max), per target")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not modes or any(m not in MODES for m in modes):
        ap.error(f"--modes must be a comma list of {', '.join(MODES)}")
    if not targets or any(t not in TARGETS for t in targets):
        ap.error(f"--targets must be a comma list of {', '.join(TARGETS)}")
    if args.rounds < 1 or args.seconds < 1 or args.clients < 1 or args.threads < 1 or args.scale < 1:
        ap.error("--rounds, --seconds, --clients, --threads and --scale must be >= 1")
    args.mode_list = modes
    args.target_list = [t for t in TARGETS if t in targets]  # fixed order for the table
    return args


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load0 = os.getloadavg()  # before our own set-up work adds to it
    if not shutil.which("pgbench") or not shutil.which("psql"):
        log("pgbench and psql are needed (Debian: apt-get install -y postgresql-client)")
        return 2
    signal.signal(signal.SIGTERM, _sigterm)
    workdir = Path(tempfile.mkdtemp(prefix="pgwarden-bench-"))
    workdir.chmod(0o755)  # pgbouncer runs as another user and must reach its files
    cluster = PgCluster()
    targets: dict[str, Target] = {}
    results: list[Result] = []
    machine: dict[str, Any] = {}
    status = 0
    try:
        if "pgbouncer" in args.target_list:
            ensure_pgbouncer()  # before the cluster: a missing package should fail in a second
        log("starting a throwaway PostgreSQL cluster ...")
        cluster.start()
        log(f"cluster on 127.0.0.1:{cluster.port} ({cluster.bindir})")
        setup_database(cluster, args.scale)
        for name in args.target_list:
            if name == "direct":
                targets[name] = Target("direct", cluster.port, cluster.service_user, cluster.service_password)
            elif name == "pgbouncer":
                targets[name] = start_pgbouncer(cluster, workdir)
            elif name == "metrics":
                targets[name] = start_pgwarden(cluster, workdir, "metrics", metrics=True)
            elif name == "pgwarden-w2":
                targets[name] = start_pgwarden(cluster, workdir, "pgwarden-w2", workers=2)
            elif name == "rules":
                rules_path = workdir / "bench-rules.yaml"
                write_bench_rules(rules_path, args.scale)
                targets[name] = start_pgwarden(cluster, workdir, "rules", rules_path)
            elif name == "rules-nowa":
                # The rules without write-ahead: rules/rules-nowa is what the durable statement_start costs.
                rules_path = workdir / "bench-rules-nowa.yaml"
                write_bench_rules(rules_path, args.scale)
                targets[name] = start_pgwarden(cluster, workdir, "rules-nowa", rules_path,
                                               audit={"write_ahead": False})
            elif name == "guards":
                guards_path = workdir / "bench-guards.yaml"
                write_bench_rules(guards_path, args.scale, guards=True)
                targets[name] = start_pgwarden(cluster, workdir, "guards", guards_path, state={
                    "host": "127.0.0.1", "port": cluster.port, "database": cluster.database,
                    "user": cluster.state_user, "password": cluster.state_password, "sslmode": "disable"})
            else:
                targets[name] = start_pgwarden(cluster, workdir)
            log(f"{name}: 127.0.0.1:{targets[name].port}"
                + (f" pid {targets[name].proc.pid}" if targets[name].proc else ""))
        for t in targets.values():
            smoke_test(t)
        rules_checks = check_rules_target(targets["rules"], cluster) if "rules" in targets else None
        pw = targets.get("pgwarden") or targets.get("rules")
        machine = machine_info(pw.proc.pid if pw and pw.proc else None)
        if rules_checks is not None:
            machine["rules_checks"] = rules_checks
        machine["postgres_bindir"] = str(cluster.bindir)
        machine["loadavg_at_start"] = load0

        if args.warmup > 0:
            for t in targets.values():
                r = pgbench_run(t, "simple", args, 0, args.warmup)
                log(f"warm-up {t.name:<10} tps={fmt(r.tps, '.0f')}" + ("" if r.ok else f"  FAILED: {r.error}"))
                trim_audit(t)

        total = args.rounds * len(args.mode_list) * len(targets)
        n = 0
        names = list(targets)
        for rnd in range(1, args.rounds + 1):
            # Rotate the target order each round so no target always runs first (cold) or last (hot).
            k = (rnd - 1) % len(names)
            order = names[k:] + names[:k]
            for mode in args.mode_list:
                for name in order:
                    n += 1
                    t = targets[name]
                    r = pgbench_run(t, mode, args, rnd, args.seconds)
                    results.append(r)
                    log(f"[{n:>2}/{total}] round {rnd} {mode:<9} {name:<10} tps={fmt(r.tps, '9.1f')} "
                        f"lat={fmt(r.latency_ms, '.3f')}ms txn={r.transactions} failed={r.failed} "
                        f"proxyCPU={fmt(r.proxy_cpu_us_per_txn, '.1f')}us/txn host={fmt(r.host_busy_pct, '.0f')}%"
                        + (f" audit={r.audit_lines_per_txn:.2f}lines/txn" if r.audit_lines_per_txn is not None else ""))
                    if not r.ok:
                        status = 1
                        banner(f"FAILED: round {rnd}, mode {mode}, target {name}: {r.error}\n"
                               f"--- pgbench command: pgbench -n -S -M {mode} -c {args.clients} "
                               f"-j {min(args.threads, args.clients)} -T {args.seconds} -h 127.0.0.1 "
                               f"-p {t.port} -U {t.user} {BENCH_DB}\n"
                               f"--- pgbench output ---\n{r.output.strip()[-4000:]}{diagnostics(t)}")
                    trim_audit(t)

        summary = summarize(results, args.mode_list, args.target_list)
        isolation: dict[str, Any] = {}
        if args.isolation > 0:
            for name in ("direct", "pgbouncer", "pgwarden", "rules"):
                if name in targets:
                    log(f"isolation run through {name} ({args.isolation}s) ...")
                    isolation[name] = isolation_run(targets[name], workdir, args.isolation)
                    trim_audit(targets[name])
        print_report(summary, results, machine, args, args.target_list)
        if isolation:
            print(f"\nIsolation: one client sends {ISOLATION_ITEMS:,}-item IN lists without pause (a new literal "
                  f"each time); another's SELECT 1 latency:")
            print(f"{'target':<10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'SELECT 1':>9} {'large answered':>15}")
            for name, iso in isolation.items():
                if "error" in iso:
                    print(f"{name:<10} FAILED: {iso['error']}")
                    status = 1
                    continue
                print(f"{name:<10} {iso['select1_p50_ms']:>8.2f} {iso['select1_p99_ms']:>8.2f} "
                      f"{iso['select1_max_ms']:>8.2f} {iso['select1_n']:>9} {iso['large_statements'] or 0:>15}")
        if args.json:
            settings = {k: v for k, v in vars(args).items() if k != "json"}
            args.json.write_text(json.dumps(
                {"machine": machine, "settings": settings, "summary": summary, "isolation": isolation,
                 "runs": [{k: v for k, v in asdict(r).items() if k != "output" or not r.ok} for r in results]},
                indent=2, default=str))
            log(f"wrote {args.json}")
        return status
    except BenchError as exc:
        banner(f"benchmark setup failed: {exc}")
        return 2
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc}); cleaning up")
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # do not interrupt our own cleanup
        for t in targets.values():
            stop_process(t.proc, t.name)
        with contextlib.suppress(Exception):
            cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
