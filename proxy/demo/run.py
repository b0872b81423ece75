"""``pgwarden demo``: a throwaway hotel database with pgwarden in front of it.

The demo users and their configuration are built here (not in a checked-in
YAML with password hashes) so the demo and the test harness use one
definition: the same people, roles and departments everywhere.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from proxy.verifiers import make_md5, make_scram_verifier
from proxy.config import Config, load_yaml_text, parse_config

DEMO_PASSWORD = "demo"
HOTEL_RULES = Path(__file__).resolve().parents[2] / "deploy" / "rules" / "hotel.yaml"

# name -> (role, department, attributes, method)
DEMO_USERS: dict[str, tuple[str, str | None, dict[str, Any], str]] = {
    "alice": ("front_desk", "FO", {"training_completed": True}, "scram-sha-256"),
    "anna": ("front_desk", "FO", {"training_completed": False}, "scram-sha-256"),
    "bob": ("supervisor", "FO", {}, "scram-sha-256"),
    "judy": ("department_head", "FO", {}, "scram-sha-256"),
    "carol": ("it_ops", "IT", {}, "scram-sha-256"),
    "dave": ("general_manager", None, {}, "scram-sha-256"),
    "erin": ("account_manager", "SALES", {}, "scram-sha-256"),
    "frank": ("security_director", "SEC", {}, "scram-sha-256"),
    "gina": ("sales", "SALES", {}, "scram-sha-256"),
    "hank": ("trainee", "FO", {"training_completed": False}, "scram-sha-256"),
    "ivy": ("legal", "LEGAL", {}, "scram-sha-256"),
    # A legacy property-management system: md5, plain TCP, simple protocol.
    "pms": ("pms_integration", "FO", {}, "md5"),
}


def demo_config(
    *,
    upstream_host: str,
    upstream_port: int,
    service_user: str,
    service_password: str,
    listen_port: int = 0,
    audit_path: str = "-",
    password: str = DEMO_PASSWORD,
    extra: dict[str, Any] | None = None,
    rules: str | None = None,
) -> Config:
    """The demo users (all with ``password``) in front of the given upstream."""
    users: dict[str, Any] = {}
    for name, (role, dept, attrs, method) in DEMO_USERS.items():
        entry: dict[str, Any] = {"role": role, "password": make_scram_verifier(password),
                                 "md5": make_md5(password, name), "method": method, "attributes": attrs}
        if dept is not None:
            entry["department"] = dept
        users[name] = entry
    doc: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": listen_port},
        "upstream": {"host": upstream_host, "port": upstream_port, "user": service_user,
                     "password": service_password, "sslmode": "disable"},
        "audit": {"path": audit_path},
        "users": users,
    }
    if rules:
        doc["rules"] = rules
    if extra:
        doc.update(extra)
    import json

    data, loc = load_yaml_text(json.dumps(doc), "<demo>")
    return parse_config(data, loc)


TOUR: list[tuple[str, str, str]] = [
    ("dave", "The general manager counts all customer-service records, per department.",
     "SELECT department, count(*) AS records FROM cs_records GROUP BY department ORDER BY department"),
    ("bob", "A front-office supervisor runs the same query: own department, last 72 hours.",
     "SELECT department, count(*) AS records FROM cs_records GROUP BY department ORDER BY department"),
    ("alice", "Front desk reads this shift's records: phone and ID numbers are masked.",
     "SELECT id, category, guest_name, phone, id_number, left(content, 20) AS content FROM cs_records "
     "ORDER BY created_at DESC LIMIT 5"),
    ("gina", "Sales asks for every category: only consultations exist for sales.",
     "SELECT category, count(*) FROM cs_records GROUP BY category"),
    ("erin", "An account manager lists guests: only her own.",
     "SELECT id, name, phone, account_manager FROM guests ORDER BY id LIMIT 5"),
    ("carol", "IT operations reads the system parameters ...",
     "SELECT name, value FROM sys_params ORDER BY name LIMIT 5"),
    ("carol", "... but never guests' personal data.",
     "SELECT name, id_number FROM guests LIMIT 5"),
    ("anna", "Front desk without the training: trainee scope only.",
     "SELECT count(*) FROM cs_records"),
    ("alice", "Bulk export is blocked.",
     "COPY cs_records TO STDOUT"),
]


def _print_table(columns: list[str], rows: list[tuple[Any, ...]]) -> None:
    cells = [[str(c) for c in columns]] + [["" if v is None else str(v) for v in r] for r in rows]
    widths = [max(_width(row[i]) for row in cells) for i in range(len(columns))]
    for n, row in enumerate(cells):
        print("  " + " | ".join(v + " " * (widths[i] - _width(v)) for i, v in enumerate(row)))
        if n == 0:
            print("  " + "-+-".join("-" * w for w in widths))
    print(f"  ({len(rows)} row{'s' if len(rows) != 1 else ''})")


def _width(s: str) -> int:
    # CJK characters take two columns in a terminal.
    return sum(2 if ord(ch) > 0x2E80 else 1 for ch in s)


async def _discard(_data: bytes) -> None:
    return None


async def run_tour(port: int, password: str = DEMO_PASSWORD) -> None:
    """Run the scripted queries as several users through pgwarden and print each result."""
    import asyncpg

    for user, title, sql in TOUR:
        print(f"\n== {user}: {title}\n   {sql}")
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user=user, password=password,
                                     database="hotel", ssl=False, server_settings={"application_name": "bi-report"})
        try:
            if sql.startswith("COPY"):
                await conn.copy_from_table("cs_records", output=_discard)
                print("  (exported)")
                continue
            stmt = await conn.prepare(sql)
            rows = await stmt.fetch()
            _print_table([a.name for a in stmt.get_attributes()], [tuple(r) for r in rows])
        except asyncpg.PostgresError as exc:
            print(f"  refused: SQLSTATE {exc.sqlstate}: {exc}")
        finally:
            await conn.close()


def run_demo(port: int = 6432, tour: bool = False, records: int = 200_000, workdir: str | None = None) -> int:
    """Start PostgreSQL with the hotel data and pgwarden in front; serve until Ctrl-C (or run the tour)."""
    from proxy.demo.pgcluster import PgCluster
    from proxy.demo.sampledata import load_sample_sync
    from proxy.net.server import Server, new_event_loop

    print("pgwarden demo: starting a throwaway PostgreSQL ...", flush=True)
    cluster = PgCluster(Path(workdir) if workdir else None)
    cluster.start()
    try:
        assert cluster.binaries is not None
        print(f"  {cluster.binaries.describe()}", flush=True)
        print(f"pgwarden demo: loading the hotel sample data ({records} customer-service records) ...", flush=True)
        counts = load_sample_sync(cluster.dsn(cluster.superuser, cluster.superuser_password), cs_records=records)
        print("  " + ", ".join(f"{t}={n}" for t, n in counts.items()))
        audit_dir = Path(tempfile.mkdtemp(prefix="pgwarden-demo-audit-"))
        audit_path = str(audit_dir / "audit.jsonl")
        rules = str(HOTEL_RULES) if HOTEL_RULES.is_file() else None
        os.environ.setdefault("PGWARDEN_MASK_SALT", secrets.token_hex(16))  # a throwaway secret for the demo
        if rules is None:
            print("pgwarden demo: deploy/rules/hotel.yaml not found (install with `pip install -e .` from the "
                  "repository): running without access rules")
        cfg = demo_config(upstream_host=cluster.host, upstream_port=cluster.port, service_user=cluster.service_user,
                          service_password=cluster.service_password, listen_port=0 if tour else port,
                          audit_path=audit_path, rules=rules,
                          extra={"state": {"host": cluster.host, "port": cluster.port, "database": cluster.database,
                                           "user": cluster.state_user, "password": cluster.state_password,
                                           "sslmode": "disable"}})
        loop = new_event_loop()
        asyncio.set_event_loop(loop)
        server = Server(cfg)
        loop.run_until_complete(server.start())
        try:
            if tour:
                loop.run_until_complete(run_tour(server.port))
                print(f"\nAudit log (one JSON line per statement): {audit_path}")
                return 0
            print(f"\npgwarden is listening on 127.0.0.1:{server.port}. Connect as any demo user "
                  f"(password '{DEMO_PASSWORD}'):")
            for name, (role, dept, _attrs, method) in DEMO_USERS.items():
                extra = " sslmode=disable" if method == "md5" else ""
                print(f"  {name:6} {role:18} {dept or '-':6} psql \"host=127.0.0.1 port={server.port} "
                      f"dbname=hotel user={name}{extra}\"")
            print("\nDirect connection for the DBA (bypasses pgwarden):")
            print(f"  psql \"{cluster.dsn(cluster.superuser, cluster.superuser_password)}\"")
            print(f"\nAudit log: {audit_path}\nPress Ctrl-C to stop.", flush=True)
            stop = loop.create_future()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
            loop.run_until_complete(stop)
            print("\npgwarden demo: stopping ...")
            return 0
        finally:
            loop.run_until_complete(server.close())
            loop.close()
    finally:
        cluster.stop()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_demo())
