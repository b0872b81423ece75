"""``pgwarden retention plan|apply`` on real tables (R5.5, R2.6), in a database of their own.

The sample hotel data is loaded into a dedicated database, so the shared
fixture data other tests read is never touched. Expected counts come from
independent SQL written here, not from the SQL the tool builds.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import psycopg
import pytest

from proxy.config import ConfigError
from proxy.demo.pgcluster import PgCluster
from proxy.demo.sampledata import load_sample_sync
from rules.model import load_retention

ROOT = Path(__file__).resolve().parents[2]
HOTEL = ROOT / "deploy" / "rules" / "hotel.yaml"
PGWARDEN = [sys.executable, "-m", "proxy.cli"]
DB = "retention_test"

MAJOR = "category = 'complaint' AND severity = 'major'"
COUNTS = {
    "major": f"SELECT count(*) FROM cs_records WHERE {MAJOR} AND created_at < now() - interval '2 years' "
             "AND NOT legal_hold",
    "ordinary": f"SELECT count(*) FROM cs_records WHERE NOT ({MAJOR}) AND created_at < now() - interval '6 months' "
                "AND NOT legal_hold",
    "held": f"SELECT count(*) FROM cs_records WHERE legal_hold AND ((({MAJOR}) AND created_at < now() - "
            f"interval '2 years') OR (NOT ({MAJOR}) AND created_at < now() - interval '6 months'))",
    "keycard": "SELECT count(*) FROM keycard_events WHERE event_at < now() - interval '90 days'",
    "cs_total": "SELECT count(*) FROM cs_records",
    "held_total": "SELECT count(*) FROM cs_records WHERE legal_hold",
    "keycard_total": "SELECT count(*) FROM keycard_events",
}


@pytest.fixture(scope="module")
def retention_db(cluster: PgCluster) -> Iterator[str]:
    cluster.psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)", database="postgres")
    cluster.psql(f"CREATE DATABASE {DB}", database="postgres")
    load_sample_sync(cluster.dsn(database=DB), cs_records=6000, guests=300)
    yield cluster.dsn(database=DB)
    cluster.psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)", database="postgres")


def counts(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as c:
        return {k: c.execute(q).fetchone()[0] for k, q in COUNTS.items()}  # type: ignore[index]


def retention(cluster: PgCluster, tmp_path: Path, dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "pgwarden.yaml"
    cfg.write_text(f"upstream: {{host: {cluster.host}, port: {cluster.port}, user: {cluster.service_user}, "
                   f"password: '{cluster.service_password}', sslmode: disable}}\n"
                   f"audit: {{path: '{tmp_path}/audit-%Y-%m.jsonl'}}\nusers: {{}}\n", encoding="utf-8")
    return subprocess.run([*PGWARDEN, "retention", *args, "--config", str(cfg), "--rules", str(HOTEL),
                           "--dsn", dsn, "--batch", "100"], capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_plan_then_apply(cluster: PgCluster, retention_db: str, tmp_path: Path) -> None:
    before = counts(retention_db)
    assert before["ordinary"] > 1000 and before["major"] > 0 and before["held"] > 0 and before["keycard"] > 0
    r = retention(cluster, tmp_path, retention_db)  # plan is the default
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert len(out) == 4
    assert out[0].startswith("public.cs_records  major complaints (keep 2 years, older than ")
    assert out[0].endswith(f"): {before['major']} to delete, "
                           f"{_held(retention_db, 'major')} spared by legal hold")
    assert out[1].endswith(f"): {before['ordinary']} to delete, {_held(retention_db, 'ordinary')} spared by legal hold")
    assert out[2].endswith(f"): {before['keycard']} to delete, no legal-hold column")
    assert out[3] == "dry run: nothing deleted (pgwarden retention apply deletes)"
    assert counts(retention_db) == before

    r = retention(cluster, tmp_path, retention_db, "apply")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1].endswith(f"): {before['ordinary']} deleted, "
                                             f"{_held(retention_db, 'ordinary')} spared by legal hold")
    after = counts(retention_db)
    assert after["cs_total"] == before["cs_total"] - before["major"] - before["ordinary"]
    assert after["keycard_total"] == before["keycard_total"] - before["keycard"]
    assert (after["major"], after["ordinary"], after["keycard"]) == (0, 0, 0)
    assert (after["held"], after["held_total"]) == (before["held"], before["held_total"])  # legal hold untouched

    (audit,) = tmp_path.glob("audit-*.jsonl")
    evs = [orjson.loads(x) for x in audit.read_bytes().splitlines()]
    ret = [e for e in evs if e["event"] == "retention"]
    assert [(e["mode"], e["rule"], e["rows"]) for e in ret] == [
        ("plan", "major complaints", before["major"]), ("plan", "ordinary conversations", before["ordinary"]),
        ("plan", "key-card events (R2.6)", before["keycard"]),
        ("apply", "major complaints", before["major"]), ("apply", "ordinary conversations", before["ordinary"]),
        ("apply", "key-card events (R2.6)", before["keycard"])]
    assert ret[0]["replica"].endswith(":retention") and ret[0]["legal_hold_column"] == "legal_hold"
    v = subprocess.run([*PGWARDEN, "audit", "verify", "--from-start", str(audit)], capture_output=True, text=True,
                       timeout=60)
    assert v.returncode == 0, v.stdout
    assert "intact, 8 events, seq 1..8" in v.stdout  # two runs: 3 rules and audit_closed each


def _held(dsn: str, which: str) -> int:
    cond = f"({MAJOR}) AND created_at < now() - interval '2 years'" if which == "major" else (
        f"NOT ({MAJOR}) AND created_at < now() - interval '6 months'")
    with psycopg.connect(dsn) as c:
        return c.execute(f"SELECT count(*) FROM cs_records WHERE legal_hold AND {cond}").fetchone()[0]  # type: ignore[index]


@pytest.mark.parametrize("body,error", [
    ("retention:\n  public.cs_records:\n    - {keep: 6 weeks, when: \"1; DROP TABLE guests\"}\n",
     ":6: when must be one condition on the table's own columns, without subqueries"),
    ("retention:\n  public.cs_records:\n    - {keep: soon}\n",
     ":6: keep must be like '6 months', '2 years', '90 days', not 'soon'"),
    ("retention:\n  public.cs_records:\n    - {keep: 1 year, when: \"id IN (SELECT id FROM guests)\"}\n",
     ":6: when must be one condition on the table's own columns, without subqueries"),
    ("retention:\n  public.cs_records:\n    - {keep: 1 year}\n    - {keep: 2 years, when: \"true\"}\n",
     ":7: unreachable: the rule above has no when: and takes every row left"),
    ("retention:\n  public.service_ratings:\n    - {keep: 1 year}\n", ":5: public.service_ratings has no time_column"),
])
def test_retention_rules_errors_name_the_line(tmp_path: Path, body: str, error: str) -> None:
    f = tmp_path / "rules.yaml"
    f.write_text("tables:\n  public.cs_records: {time_column: created_at}\nroles: {}\n" + body, encoding="utf-8")
    with pytest.raises(ConfigError) as ei:
        load_retention(str(f))
    assert str(ei.value).startswith(f"{f}{error}"), str(ei.value)
