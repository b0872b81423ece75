"""``pgwarden audit search`` and ``audit report`` on a month of activity (R5.3), the page checked in Chromium.

The month is two real sources in one directory: statements run today through
a real pgwarden with the hotel rules, and thirty earlier days written through
AuditLog itself with its clock set to each day (what those sessions' events
carry is what proxy/session.py writes).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import psycopg
import pytest

from proxy.audit.log import AuditLog
from proxy.demo.pgcluster import PgCluster
from tests.conftest import Proxy, start_proxy
from tests.integration.fix_clients import program

ROOT = Path(__file__).resolve().parents[2]
HOTEL = ROOT / "deploy" / "rules" / "hotel.yaml"
PGWARDEN = [sys.executable, "-m", "proxy.cli"]
TODAY = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
START = TODAY - timedelta(days=30)
MASKED = ["public.cs_records.guest_name", "public.cs_records.phone", "public.cs_records.id_number",
          "public.cs_records.bank_card", "public.cs_records.content"]
PEOPLE = {
    "alice": {"session": "s-alice", "user": "alice", "role": "front_desk", "department": "FO",
              "client_addr": "10.0.0.5", "application": "psql"},
    "bob": {"session": "s-bob", "user": "bob", "role": "supervisor", "department": "FO",
            "client_addr": "10.0.0.6", "application": "Metabase"},
    "dave": {"session": "s-dave", "user": "dave", "role": "general_manager", "department": None,
             "client_addr": "10.0.0.9", "application": "DBeaver"},
    "carol": {"session": "s-carol", "user": "carol", "role": "it_ops", "department": "IT",
              "client_addr": "10.0.0.7", "application": "psql"},
}


class DayClock:
    def __init__(self) -> None:
        self.t = START.timestamp()

    def __call__(self) -> float:
        return self.t


def select(guest: int) -> dict[str, Any]:
    return {"statement_type": "SELECT", "statement": f"SELECT id, phone FROM cs_records WHERE guest_id = {guest}",
            "outcome": "ok", "rows": 2, "duration_ms": 1.5, "decision": "rewrite",
            "rewritten": "SELECT ...", "tables": ["public.cs_records"], "masked": MASKED, "receipt": "R-generated"}


def write_month(path: str) -> None:
    """30 days: alice 5 lookups a day at 10:00 Shanghai, bob 3 at 16:00, dave at 23:30 every 5th day,
    carol refused once a day; break-glass reads on day 3 (never backed) and day 10 (a ticket requested)."""
    clock = DayClock()
    log = AuditLog(path, replica="gen", clock=clock)
    for d in range(30):
        day = START + timedelta(days=d)
        clock.t = (day + timedelta(hours=2)).timestamp()  # 10:00 in Asia/Shanghai
        for _ in range(5):
            log.emit_with("statement", PEOPLE["alice"], select(d % 3 + 1))
        clock.t = (day + timedelta(hours=8)).timestamp()  # 16:00
        for _ in range(3):
            log.emit_with("statement", PEOPLE["bob"], {**select(7), "masked": MASKED[1:4]})
        clock.t = (day + timedelta(hours=9)).timestamp()
        log.emit_with("statement", PEOPLE["carol"], {
            "statement_type": "SELECT", "statement": "SELECT name, id_number FROM guests", "outcome": "refused",
            "rows": 0, "duration_ms": 0.2, "sqlstate": "42501",
            "reason": "pgwarden: role it_ops may not read table public.guests"})
        if d % 5 == 0:
            clock.t = (day + timedelta(hours=15, minutes=30)).timestamp()  # 23:30 in Shanghai: off hours
            log.emit_with("statement", PEOPLE["dave"], {**select(9), "masked": [], "flags": ["internal_audit"]})
        if d in (3, 10):  # break-glass, as the session logs it (SET pgwarden.emergency = 'why')
            use = "E-1" if d == 3 else "E-2"
            clock.t = (day + timedelta(hours=3)).timestamp()
            log.emit_with("emergency_started", PEOPLE["bob"], {"ticket": use, "tables": ["public.cs_records"]})
            log.emit_with("statement", {**PEOPLE["bob"], "emergency": use}, select(11))
            if d == 10:  # backed within the day by a ticket request (pgwarden ticket request --emergency 2)
                clock.t = (day + timedelta(hours=5)).timestamp()
                log.emit_with("ticket_requested", PEOPLE["bob"], {"ticket": "T-9", "backs_emergency": "E-2"})
    log.close()


@pytest.fixture(scope="module")
def month(cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[dict]]]:
    d = tmp_path_factory.mktemp("month")
    write_month(str(d / "gen.jsonl"))
    p: Proxy = start_proxy(cluster, str(d / "live"), rules=str(HOTEL), audit={"path": str(d / "live.jsonl")})
    try:
        with psycopg.connect(p.dsn("alice"), autocommit=True) as c:
            c.execute("SELECT id, phone FROM cs_records WHERE guest_id = 2").fetchall()
        with psycopg.connect(p.dsn("carol"), autocommit=True) as c:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute("SELECT name FROM guests").fetchall()
        for _ in range(2):
            with pytest.raises(psycopg.OperationalError):
                psycopg.connect(p.dsn("carol", password="guess")).close()
        live = p.take_events()
    finally:
        p.thread.stop()
    yield d, live


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PGWARDEN, "audit", *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_month_verifies(month: tuple[Path, list[dict]]) -> None:
    d, _ = month
    r = cli("verify", str(d))
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"replica gen: intact, 282 events, seq 1\.\.282", r.stdout), r.stdout
    assert "replica test: intact" in r.stdout


def test_search_by_receipt_guest_decision_and_time(month: tuple[Path, list[dict]]) -> None:
    d, live = month
    (alice_live,) = [e for e in live if e["user"] == "alice"]
    r = cli("search", str(d), "--receipt", alice_live["receipt"], "--json")
    assert r.returncode == 0, r.stderr
    (found,) = [orjson.loads(x) for x in r.stdout.splitlines()]
    assert (found["user"], found["rows"], found["receipt"]) == ("alice", alice_live["rows"], alice_live["receipt"])
    # Guest 2: alice's generated lookups on days 1, 4, ..., 28 (10 days x 5) and today's live one.
    r = cli("search", str(d), "--guest", "2", "--rules", str(HOTEL), "--json")
    got = [orjson.loads(x) for x in r.stdout.splitlines()]
    assert len(got) == 51 and {e["user"] for e in got} == {"alice"}
    r = cli("search", str(d), "--decision", "refuse", "--since", (TODAY - timedelta(days=5)).isoformat())
    rows = r.stdout.splitlines()
    assert rows[0].split() == ["time", "user", "role", "decision", "rows", "receipt", "statement"]
    assert len(rows) == 1 + 5 + 1  # five generated days and today's live refusal
    assert all(" carol " in x and " refuse " in x for x in rows[1:])
    assert r.stderr.strip() == "(6 events)"
    r = cli("search", str(d), "--user", "bob", "--table", "cs_records", "--until", (START + timedelta(days=2)).isoformat(),
            "--json")
    assert len(r.stdout.splitlines()) == 6
    r = cli("search", str(d), "--guest", "2", "--json")
    assert r.returncode == 2 and "--guest needs --rules" in r.stderr




def test_report_renders_in_headless_chromium(month: tuple[Path, list[dict]], tmp_path: Path) -> None:
    d, live = month
    page = tmp_path / "report.html"
    until = (datetime.now(timezone.utc) + timedelta(minutes=1)).isoformat()
    r = cli("report", str(d), "--since", START.isoformat(), "--until", until, "--html", str(page),
            "--rules", str(HOTEL))
    assert r.returncode == 0, r.stderr
    statements = 30 * (5 + 3 + 1) + 6 + 2 + len(live)
    shanghai = ZoneInfo("Asia/Shanghai")
    late = sum(1 for e in live if not 7 <= datetime.fromisoformat(e["time"]).astimezone(shanghai).hour < 23)
    off = 6 + late  # dave's 23:30 reads, and today's live statements if this runs at night in Shanghai
    assert r.stdout.strip() == (f"{page}: {statements} statements by 4 people, 31 refused, {off} off shift, "
                                "6 general-manager accesses; 2 chain(s) verified intact (NOT all chains keyed and "
                                "checked (plain SHA-256 can be recomputed by anyone with write access); no anchors "
                                "checked (a cut tail would not show))")
    text = page.read_text(encoding="utf-8")
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in text and "<script" not in text
    exe = program("chromium", "chromium-browser", "google-chrome", install="apt-get install chromium")
    profile = tmp_path / "profile"
    flags = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert f'<span class="kpi" id="kpi-statements"><b>{statements}</b>statements</span>' in html
    assert '<span class="kpi" id="kpi-refused"><b>31</b>refused</span>' in html
    assert '<p class="ok" id="verdict" data-status="verified"><b>verified</b>: 2 chain(s) verified intact' in html
    assert f'<span class="kpi" id="kpi-offshift"><b>{off}</b>off shift</span>' in html
    users = re.search(r'<svg id="chart-users".*?</svg>', html, re.S)
    assert users is not None and users.group(0).count('<rect class="bar"') == 4
    days = re.search(r'<svg id="chart-days".*?</svg>', html, re.S)
    assert days is not None and days.group(0).count('<rect class="bar"') == 31
    assert re.search(r"<tr><td>alice</td><td>front_desk</td><td class=\"n\">151</td>", html)
    assert '<tr><td>1</td><td class="n">50</td><td>alice</td></tr>' in html
    assert '<tr><td>2</td><td class="n">51</td><td>alice</td></tr>' in html
    assert '<tr><td>bob</td><td>public.cs_records.phone</td><td class="n">92</td></tr>' in html
    first_late = (START + timedelta(hours=15, minutes=30)).astimezone(shanghai)
    assert first_late.strftime("%H:%M") == "23:30"  # tables show local time
    assert f'<tr><td>{first_late:%Y-%m-%d %H:%M:%S}</td><td>dave</td><td>general_manager</td>' in html
    uses = re.search(r'<table id="emergency-uses">.*?</table>', html, re.S)
    assert uses is not None and uses.group(0).count("<tr>") == 3  # header, E-1, E-2
    day3 = (START + timedelta(days=3, hours=3)).astimezone(shanghai)
    assert (f'<tr><td>E-1</td><td>{day3:%Y-%m-%d %H:%M:%S}</td><td>bob</td><td>supervisor</td><td></td>'
            '<td class="n">1</td><td class="n">2</td><td>none</td></tr>') in uses.group(0)
    assert '<td>E-2</td>' in uses.group(0) and "<td>requested</td>" in uses.group(0)
    overdue = re.search(r'<table id="overdue">.*?</table>', html, re.S)
    assert overdue is not None and overdue.group(0).count("<tr>") == 2 and "<td>E-1</td>" in overdue.group(0)
    assert '<tr><td>carol from 127.0.0.1</td><td class="n">2</td></tr>' in html  # failed logins
    lockouts = re.search(r"<h3>Lockouts</h3>\s*<p class=\"none\">none recorded</p>", html)
    assert lockouts is not None
    shot = tmp_path / "report.png"
    r = subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,3000", page.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
