"""Apply -> approve x2 -> use -> close, and break-glass (R4), through the CLI and real clients.

Two replicas share one state store (a schema of this test's own). The people are the demo
users (password "demo"): bob (supervisor, FO), judy (department_head), frank
(security_director), ivy (legal), gina (sales).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from proxy.demo.pgcluster import PgCluster
from tests.conftest import Proxy
from tests.integration.fix_wire import login_refusal
from tests.integration.test_guards import as_state_owner, replicas, schema, write_config  # noqa: F401 - fixture
from tests.integration.test_policy_e2e import direct

BOB_SEES = ("department = 'FO' AND NOT legal_hold AND created_at >= statement_timestamp() - interval '72 hours'")


@pytest.fixture
def env(cluster: PgCluster, schema: str, tmp_path: Path) -> Iterator[tuple[Proxy, Proxy, Path]]:  # noqa: F811
    a, b = replicas(cluster, schema, tmp_path)
    cfg = tmp_path / "pgwarden.yaml"
    write_config(cfg, cluster, schema, audit=tmp_path / "a" / "audit.jsonl")  # the CLI reads replica a's log
    try:
        yield a, b, cfg
    finally:
        a.thread.stop()
        b.thread.stop()


def cli(cfg: Path, who: str, *args: str, password: str = "demo") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PGWARDEN_PASSWORD=password)
    return subprocess.run([sys.executable, "-m", "proxy.cli", "ticket", *args, "--config", str(cfg), "--as", who],
                          env=env, capture_output=True, text=True, timeout=60)


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return r.stdout.strip()


def refused_with(r: subprocess.CompletedProcess[str], text: str) -> None:
    assert r.returncode != 0 and text in r.stderr, (r.returncode, r.stdout, r.stderr)


def old_guest(cluster: PgCluster, *, legal: bool = False) -> int:
    """An FO guest with records older than 72 hours (outside bob's window), some under legal hold if asked."""
    hold = "bool_or(legal_hold)" if legal else "NOT bool_or(legal_hold)"
    (g,), = direct(cluster, "SELECT guest_id FROM cs_records WHERE department = 'FO' GROUP BY guest_id "
                            "HAVING min(created_at) < now() - interval '10 days' AND " + hold + " ORDER BY guest_id LIMIT 1")
    return g


def rows(p: Proxy, sql: str, *setup: str, user: str = "bob", **dsn: str) -> list[tuple] | psycopg.Error:
    extra = "".join(f" {k}={v}" for k, v in dsn.items())
    try:
        with psycopg.connect(p.dsn(user) + extra, autocommit=True) as c:
            for s in setup:
                c.execute(s)
            return c.execute(sql).fetchall()
    except psycopg.Error as e:
        return e


def refused_42501(r: list[tuple] | psycopg.Error, message: str) -> None:
    """A statement refused by pgwarden: SQLSTATE 42501 and the message that says why."""
    assert isinstance(r, psycopg.Error), f"not refused: {r!r:.300}"
    assert (r.sqlstate, r.diag.message_primary) == ("42501", message), (r.sqlstate, str(r))


def masked_phones(cluster: PgCluster, where: str) -> list[tuple[str]]:
    """The phones of cs_records matching ``where`` (ordered by id), masked as every role here sees them."""
    from masking import mask_value

    return [(mask_value("mobile", p),) for (p,) in direct(cluster, f"SELECT phone FROM cs_records WHERE {where} "
                                                                   "ORDER BY id")]


def request(cfg: Path, guest: int, *extra: str, who: str = "bob") -> str:
    tid = ok(cli(cfg, who, "request", "--table", "cs_records", "--scope", f"guest {guest}", "--from", "2020-01-01",
                 "--reason", "VIP complaint #123", *extra))
    assert tid.startswith("T-") and len(tid) == len("T-2026-000001"), tid
    return tid


def test_lifecycle_two_approvers_then_use_on_either_replica_then_close(env: tuple[Proxy, Proxy, Path],
                                                                       cluster: PgCluster) -> None:
    a, b, cfg = env
    g = old_guest(cluster)
    q = f"SELECT id FROM cs_records WHERE guest_id = {g} ORDER BY id"
    before = rows(a, q)  # one of bob's three lookups of this guest this month (the ticket's are exempt)
    assert before == direct(cluster, f"SELECT id FROM cs_records WHERE guest_id = {g} AND {BOB_SEES} ORDER BY id")
    tid = request(cfg, g)
    use = f"SET pgwarden.ticket = '{tid}'"

    # Pending: not usable; the requester cannot approve; a role that does not approve cannot either.
    refused_42501(rows(a, q, use), f"pgwarden: ticket {tid} is pending, not approved")
    refused_with(cli(cfg, "bob", "approve", tid), "never approve or reject their own ticket")
    refused_with(cli(cfg, "gina", "approve", tid), "role sales does not approve tickets")
    assert ok(cli(cfg, "judy", "approve", tid, "--comment", "ok")) == \
        f"{tid}: pending (still needs 1 more approval(s) from department_head, security_director)"
    refused_with(cli(cfg, "judy", "approve", tid), "already decided")
    assert ok(cli(cfg, "frank", "approve", tid)) == f"{tid}: approved"

    # Approved: the scope's rows are added to what bob sees, on either replica; masks stay.
    want = direct(cluster, f"SELECT id FROM cs_records WHERE guest_id = {g} AND ({BOB_SEES} OR "
                           "(created_at >= '2020-01-01' AND NOT legal_hold)) ORDER BY id")
    assert len(want) > len(before), "the guest must have records outside bob's window"
    a.take_events()
    for p in (a, b):
        assert rows(p, q, use) == want
    # ... only that guest's: everything else stays as before
    every = "SELECT count(*) FROM cs_records"
    assert rows(a, every, use)[0][0] == rows(a, every)[0][0] + len(want) - len(before)  # type: ignore[index]
    # ... and phones stay masked
    phones = rows(a, f"SELECT phone FROM cs_records WHERE guest_id = {g} ORDER BY id", use)
    assert phones == masked_phones(cluster, f"guest_id = {g} AND ({BOB_SEES} OR (created_at >= '2020-01-01' "
                                            "AND NOT legal_hold))")
    # ... and in the connection string, for BI tools
    assert rows(b, q, options=f"-cpgwarden.ticket={tid}") == want
    err = login_refusal(b.port, "bob", options="-cpgwarden.ticket=T-1999-000009")
    assert (err.sqlstate, err.message) == ("42501", "pgwarden: there is no ticket T-1999-000009")
    # ... every statement under it names it in the audit log, and no other does
    ev = [(e["statement"], e.get("ticket")) for e in a.take_events()]
    assert ev == [(use, tid), (q, tid), (use, tid), (every, tid), (every, None), (use, tid),
                  (f"SELECT phone FROM cs_records WHERE guest_id = {g} ORDER BY id", tid)]

    # Someone else cannot use it.
    refused_42501(rows(a, q, use, user="alice"), f"pgwarden: ticket {tid} is not yours; a ticket is used only by "
                                                 "the person who requested it")

    # Close (on the command line) ends it for a session using it on another replica.
    wide, narrow = rows(a, every, use), rows(a, every)
    with psycopg.connect(b.dsn("bob"), autocommit=True) as c:
        c.execute(use)
        assert c.execute(every).fetchall() == wide != narrow
        out = ok(cli(cfg, "bob", "close", tid))
        assert out.startswith(f"{tid}: closed;") and "statements" in out
        import time
        deadline = time.monotonic() + 10
        while c.execute(every).fetchall() != narrow:
            assert time.monotonic() < deadline, "a closed ticket still widened a session"
            time.sleep(0.2)
    shown = json.loads(ok(cli(cfg, "frank", "show", tid)))
    # the summary is read from replica a's log: every statement event there that names the ticket
    logged = [json.loads(line) for line in Path(a.audit_path).read_text(encoding="utf-8").splitlines()]
    under = [e for e in logged if e["event"] == "statement" and e.get("ticket") == tid]
    assert shown["status"] == "closed" and shown["summary"]["statements"] == len(under) == 8  # 6 above and the 2 of "wide"
    assert [(d["approver"], d["approve"]) for d in shown["decisions"]] == [("judy", True), ("frank", True)]
    refused_42501(rows(a, q, use), f"pgwarden: ticket {tid} is closed, not approved")


def test_legal_hold_needs_a_legal_coapprover(env: tuple[Proxy, Proxy, Path], cluster: PgCluster) -> None:
    a, _, cfg = env
    g = old_guest(cluster, legal=True)
    q = f"SELECT count(*) FROM cs_records WHERE guest_id = {g} AND legal_hold"
    tid = request(cfg, g, "--legal")
    ok(cli(cfg, "judy", "approve", tid))
    assert "still needs a legal approval (legal)" in ok(cli(cfg, "frank", "approve", tid))
    assert ok(cli(cfg, "ivy", "approve", tid)) == f"{tid}: approved"
    assert rows(a, q, f"SET pgwarden.ticket = '{tid}'") == \
        direct(cluster, f"SELECT count(*) FROM cs_records WHERE guest_id = {g} AND legal_hold")
    # a ticket without --legal opens no legal-hold record
    plain = request(cfg, g)
    ok(cli(cfg, "judy", "approve", plain))
    ok(cli(cfg, "frank", "approve", plain))
    assert rows(a, q, f"SET pgwarden.ticket = '{plain}'") == [(0,)]


def test_a_rejection_ends_it_and_expired_tickets_are_refused(env: tuple[Proxy, Proxy, Path], cluster: PgCluster,
                                                              schema: str) -> None:  # noqa: F811
    a, _, cfg = env
    g = old_guest(cluster)
    tid = request(cfg, g)
    assert ok(cli(cfg, "judy", "reject", tid, "--comment", "no reason given")) == f"{tid}: rejected"
    refused_with(cli(cfg, "frank", "approve", tid), "is rejected")
    t2 = request(cfg, g)
    ok(cli(cfg, "judy", "approve", t2))
    ok(cli(cfg, "frank", "approve", t2))
    assert rows(a, "SELECT 1", f"SET pgwarden.ticket = '{t2}'") == [(1,)]  # approved and in force
    (expires,), = as_state_owner(cluster, f"UPDATE {schema}.tickets SET expires_at = now() - interval '1 minute' "
                                          f"WHERE id = '{t2}' RETURNING expires_at")
    refused_42501(rows(a, "SELECT 1", f"SET pgwarden.ticket = '{t2}'"), f"pgwarden: ticket {t2} expired at {expires}")
    refused_42501(rows(a, "SELECT 1", f"SET pgwarden.ticket = '{tid}'"), f"pgwarden: ticket {tid} is rejected, "
                                                                          "not approved")
    refused_with(cli(cfg, "bob", "show", "T-1999-000001"), "no ticket")


def test_named_guests_past_the_monthly_quota(env: tuple[Proxy, Proxy, Path], cluster: PgCluster) -> None:
    a, b, cfg = env
    (g,), = direct(cluster, f"SELECT guest_id FROM cs_records WHERE {BOB_SEES} GROUP BY guest_id ORDER BY guest_id "
                            "LIMIT 1")
    q = f"SELECT count(*) FROM cs_records WHERE guest_id = {g}"
    for _ in range(3):
        assert rows(a, q) == direct(cluster, f"{q} AND {BOB_SEES}")
    refused_42501(rows(b, q), f"pgwarden: bob has looked up guest {g} 3 times this month, the limit for role "
                              "supervisor; a further lookup needs an approved ticket")  # the 4th lookup
    tid = request(cfg, g)
    ok(cli(cfg, "judy", "approve", tid))
    ok(cli(cfg, "frank", "approve", tid))
    for _ in range(2):  # past the quota, as often as needed, with the ticket's rows added
        assert rows(b, q, f"SET pgwarden.ticket = '{tid}'") == direct(
            cluster, f"{q} AND ({BOB_SEES} OR (created_at >= '2020-01-01' AND NOT legal_hold))")


def test_break_glass_at_once_flagged_and_overdue_without_a_ticket(env: tuple[Proxy, Proxy, Path],
                                                                   cluster: PgCluster, schema: str) -> None:  # noqa: F811
    a, _, cfg = env
    every = "SELECT count(*) FROM cs_records"
    assert rows(a, every) == direct(cluster, f"SELECT count(*) FROM cs_records WHERE {BOB_SEES}")
    glass = "SET pgwarden.emergency = 'guest collapsed in the lobby'"
    assert rows(a, every, glass) == direct(cluster, "SELECT count(*) FROM cs_records WHERE NOT legal_hold")
    (eid,), = direct(cluster, f"SELECT id FROM {schema}.emergencies")
    ev = [(e["statement"], e.get("emergency"), e.get("flags")) for e in a.take_events()]
    assert ev == [(every, None, None), (glass, f"E-{eid}", None), (every, f"E-{eid}", ["emergency"])]
    refused_42501(rows(a, every, glass, user="gina"), "pgwarden: role sales has no break-glass scope in the rules")
    # Not backed by a ticket within a day: overdue (the start is moved back instead of waiting).
    assert ok(cli(cfg, "frank", "overdue")) == ""
    as_state_owner(cluster, f"UPDATE {schema}.emergencies SET started_at = now() - interval '25 hours'")
    lines = ok(cli(cfg, "frank", "overdue")).splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"E-{eid}  bob") and "lobby" in lines[0]
    refused_with(cli(cfg, "judy", "request", "--table", "cs_records", "--reason", "x", "--emergency", str(eid)),
                 "is not yours")
    backing = ok(cli(cfg, "bob", "request", "--table", "cs_records", "--reason", "backing the lobby emergency",
                     "--emergency", str(eid)))
    assert ok(cli(cfg, "frank", "overdue")).startswith(f"E-{eid}")  # requested is not enough: approved backs it
    ok(cli(cfg, "judy", "approve", backing))
    ok(cli(cfg, "frank", "approve", backing))
    assert ok(cli(cfg, "frank", "overdue")) == ""


def test_cross_region_needs_a_headquarters_approver_and_opens_only_that_region(env: tuple[Proxy, Proxy, Path],
                                                                               cluster: PgCluster) -> None:
    a, _, cfg = env
    err = rows(a, "SELECT count(*) FROM guests")
    assert isinstance(err, psycopg.Error) and err.sqlstate == "42501"  # supervisors have no guests grant
    tid = ok(cli(cfg, "bob", "request", "--table", "guests", "--scope", "region north", "--reason", "regional audit"))
    assert ok(cli(cfg, "judy", "approve", tid)) == (
        f"{tid}: pending (still needs 1 more approval(s) from department_head, security_director; "
        "a headquarters approval (security_director))")
    assert ok(cli(cfg, "frank", "approve", tid)) == f"{tid}: approved"
    got = rows(a, "SELECT region, count(*) FROM guests GROUP BY region", f"SET pgwarden.ticket = '{tid}'")
    assert got == direct(cluster, "SELECT region, count(*) FROM guests WHERE region = 'north' GROUP BY region")
    names = rows(a, "SELECT name, phone FROM guests ORDER BY id LIMIT 5", f"SET pgwarden.ticket = '{tid}'")
    from masking import mask_value

    assert names == [(mask_value("name", n), mask_value("mobile", p)) for n, p in direct(  # masks stay
        cluster, "SELECT name, phone FROM guests WHERE region = 'north' ORDER BY id LIMIT 5")]


def approved(cfg: Path, who: str, *args: str) -> str:
    tid = ok(cli(cfg, who, "request", *args))
    ok(cli(cfg, "judy", "approve", tid))
    ok(cli(cfg, "frank", "approve", tid))
    return tid


def test_second_review_findings(env: tuple[Proxy, Proxy, Path], cluster: PgCluster) -> None:
    a, b, cfg = env
    g = old_guest(cluster)
    tid = approved(cfg, "bob", "--table", "cs_records", "--scope", f"guest {g}", "--from", "2020-01-01",
                   "--reason", "complaint")
    use = f"SET pgwarden.ticket = '{tid}'"
    every = "SELECT count(*) FROM cs_records"
    narrow, wide = rows(a, every), rows(a, every, use)
    assert narrow != wide
    # 1. two own settings in one Query: refused at once (each would wait for the store in turn)
    refused_42501(rows(a, "SELECT 1", f"{use}; SET pgwarden.emergency = 'x'"),
                  "pgwarden: one SET pgwarden.ticket / pgwarden.emergency per query")
    # 2. a statement prepared under the ticket does not outlive it
    with psycopg.connect(a.dsn("bob"), autocommit=True) as c:
        c.execute(use)
        assert c.execute(every, prepare=True).fetchall() == wide
        c.execute("RESET pgwarden.ticket")
        with pytest.raises(psycopg.Error) as ei:
            c.execute(every, prepare=True)
        assert ei.value.sqlstate == "42501" and "no longer in force" in str(ei.value)
        assert c.execute(every, prepare=False).fetchall() == narrow
        c.execute(use)
        with pytest.raises(psycopg.Error) as ei:
            c.execute("PREPARE p AS SELECT count(*) FROM cs_records")
        assert ei.value.sqlstate == "42501"  # (for bob, the lookup quota refuses SQL PREPARE already)
    # 3. a ticket opens rows to read, not to write
    pms_ticket = approved(cfg, "pms", "--table", "cs_records", "--scope", f"guest {g}", "--from", "2020-01-01",
                          "--reason", "reconcile")
    with psycopg.connect(a.dsn("pms"), autocommit=True) as c:
        c.execute(f"SET pgwarden.ticket = '{pms_ticket}'")
        with pytest.raises(psycopg.Error) as ei:
            c.execute(f"UPDATE cs_records SET severity = 'major' WHERE guest_id = {g}")
        assert ei.value.sqlstate == "42501" and "may not UPDATE" in str(ei.value)
    # 4. a ticket for a table with regions, without a region scope, still needs headquarters
    t = ok(cli(cfg, "bob", "request", "--table", "guests", "--reason", "all guests"))
    assert "a headquarters approval" in ok(cli(cfg, "judy", "approve", t))
    # 4b. a ticket is set or reset outside a transaction (a rollback would undo the SET, not pgwarden's view)
    with psycopg.connect(a.dsn("bob")) as c:
        c.execute("SELECT 1")
        with pytest.raises(psycopg.Error) as ei:
            c.execute(use)
        refused_42501(ei.value, "pgwarden: set or reset pgwarden.ticket / pgwarden.emergency outside a transaction "
                                "block")
        c.rollback()
    # 5. break-glass is not renewed by asking again: another session joins the one in force
    glass = "SET pgwarden.emergency = 'fire'"
    rows(a, "SELECT 1", glass)
    rows(b, "SELECT 1", "SET pgwarden.emergency = 'another fire'")
    ids = {e["ticket"] for p in (a, b) for e in p.take_events(None) if e.get("event") == "emergency_started"}
    assert len(ids) == 1, ids


# ---------------------------------------------------------------------------
# expiry and purging: time moved in the state store instead of waited for
# ---------------------------------------------------------------------------


def wait_for_rows(c: psycopg.Connection, sql: str, want: list[tuple], timeout: float = 15.0) -> float:
    """Run ``sql`` on ``c`` until it returns ``want``; the seconds that took.

    Never prepared (psycopg prepares a query it has run five times): a statement prepared under a
    ticket is refused once the ticket ends, which is not what this waits for.
    """
    import time

    t0 = time.monotonic()
    while (got := c.execute(sql, prepare=False).fetchall()) != want:
        assert time.monotonic() - t0 < timeout, f"still {got}, never {want}"
        time.sleep(0.2)
    return time.monotonic() - t0


def test_a_ticket_expiring_mid_session_stops_widening_at_the_next_statement(
        env: tuple[Proxy, Proxy, Path], cluster: PgCluster, schema: str) -> None:  # noqa: F811
    a, _, cfg = env
    g = old_guest(cluster)
    tid = approved(cfg, "bob", "--table", "cs_records", "--scope", f"guest {g}", "--from", "2020-01-01",
                   "--reason", "complaint", "--hours", "8")
    use = f"SET pgwarden.ticket = '{tid}'"
    every = "SELECT count(*) FROM cs_records"
    narrow = direct(cluster, f"{every} WHERE {BOB_SEES}")
    wide = direct(cluster, f"{every} WHERE {BOB_SEES} OR (guest_id = {g} AND created_at >= '2020-01-01' "
                           "AND NOT legal_hold)")
    assert wide != narrow
    # Its 8 hours are nearly over: the ticket is moved to expire 3 seconds from now.
    as_state_owner(cluster, f"UPDATE {schema}.tickets SET expires_at = now() + interval '3 seconds' "
                            f"WHERE id = '{tid}'")
    a.take_events(None)
    with psycopg.connect(a.dsn("bob"), autocommit=True) as c:
        c.execute(use)
        assert c.execute(every).fetchall() == wide
        q = "SELECT count(*) FROM cs_records WHERE category = %s"
        assert c.execute(q, ("complaint",), prepare=True).fetchall() == direct(
            cluster, f"SELECT count(*) FROM cs_records WHERE category = 'complaint' AND ({BOB_SEES} OR "
                     f"(guest_id = {g} AND created_at >= '2020-01-01' AND NOT legal_hold))")
        waited = wait_for_rows(c, every, narrow)  # the same session, no RESET, no reconnect
        assert waited > 1.0, "the ticket stopped widening before it expired"
        with pytest.raises(psycopg.Error) as ei:  # prepared under the ticket: it does not outlive it
            c.execute(q, ("complaint",), prepare=True)
        assert ei.value.sqlstate == "42501" and "no longer in force" in str(ei.value)
        refused_42501(rows(a, "SELECT 1", use), f"pgwarden: ticket {tid} expired at "
                      f"{as_state_owner(cluster, f'SELECT expires_at FROM {schema}.tickets')[0][0]}")
    events = a.take_events(None)
    assert [e["ticket"] for e in events if e["event"] == "ticket_released"] == [tid]
    counts = [e.get("ticket") for e in events if e["event"] == "statement" and e["statement"] == every]
    assert counts[0] == tid and counts[-1] is None


def test_break_glass_ends_when_its_hours_are_up_and_is_never_renewed(
        env: tuple[Proxy, Proxy, Path], cluster: PgCluster, schema: str) -> None:  # noqa: F811
    a, b, _ = env
    glass = "SET pgwarden.emergency = 'fire alarm, room 1204'"
    every = "SELECT count(*) FROM cs_records"
    narrow = direct(cluster, f"{every} WHERE {BOB_SEES}")
    wide = direct(cluster, f"{every} WHERE NOT legal_hold")
    assert rows(a, every, glass) == wide
    (eid, hours), = as_state_owner(cluster, f"SELECT id, extract(epoch FROM expires_at - started_at)::int / 3600 "
                                            f"FROM {schema}.emergencies")
    assert hours == 2  # the supervisor's emergency: hours in the rules
    # The two hours are nearly over: moved to end 3 seconds from now. Another session (another replica)
    # asking again joins the emergency as it is, with its end: asking does not renew it.
    as_state_owner(cluster, f"UPDATE {schema}.emergencies SET expires_at = now() + interval '3 seconds'")
    with psycopg.connect(b.dsn("bob"), autocommit=True) as c:
        c.execute(glass)
        assert c.execute(every).fetchall() == wide
        assert wait_for_rows(c, every, narrow) > 1.0
    events = b.take_events()
    assert [(e["statement"], e.get("emergency")) for e in events][:2] == [(glass, f"E-{eid}"), (every, f"E-{eid}")]
    assert (events[-1]["statement"], events[-1].get("emergency"), events[-1].get("flags")) == (every, None, None)
    # Once it has ended, break-glass again is a new emergency, on record for the overdue report.
    assert rows(a, every, glass) == wide
    assert as_state_owner(cluster, f"SELECT id, expires_at > now() FROM {schema}.emergencies ORDER BY id") == [
        (eid, False), (eid + 1, True)]


def test_closed_tickets_are_purged_after_keep_closed_days(env: tuple[Proxy, Proxy, Path], cluster: PgCluster,
                                                          schema: str) -> None:  # noqa: F811
    _, _, cfg = env
    g = old_guest(cluster)
    args = ("--table", "cs_records", "--scope", f"guest {g}", "--reason", "complaint")
    old, kept, last = (approved(cfg, "bob", *args) for _ in range(3))
    for tid in (old, kept):
        assert ok(cli(cfg, "bob", "close", tid)).startswith(f"{tid}: closed;")
    rejected = ok(cli(cfg, "bob", "request", *args))
    assert ok(cli(cfg, "judy", "reject", rejected)) == f"{rejected}: rejected"
    # keep_closed_days is 92 in the hotel rules: move two closings past it and one just inside it.
    as_state_owner(cluster, f"UPDATE {schema}.tickets SET closed_at = now() - interval '93 days' "
                            f"WHERE id IN ('{old}', '{rejected}'); "
                            f"UPDATE {schema}.tickets SET closed_at = now() - interval '91 days' WHERE id = '{kept}'")
    out = ok(cli(cfg, "bob", "close", last))  # closing a ticket purges those past their keep time
    assert out.startswith(f"{last}: closed;") and out.endswith("; 2 old tickets purged"), out
    assert as_state_owner(cluster, f"SELECT id, status FROM {schema}.tickets ORDER BY id") == [
        (kept, "closed"), (last, "closed")]
    # their approvals go with them
    assert as_state_owner(cluster, f"SELECT DISTINCT ticket FROM {schema}.ticket_decisions ORDER BY 1") == [
        (kept,), (last,)]
    refused_with(cli(cfg, "frank", "show", old), f"no ticket {old}")
