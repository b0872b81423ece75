"""Pure parts of the audit tooling: receipt text, guests read from statements, off-shift windows."""

from __future__ import annotations

from datetime import datetime, time, timezone
from zoneinfo import ZoneInfo

import pytest

from proxy.audit.report import Window, summarise
from proxy.audit.search import Filters, decision_of, guests_of, matches, parse_when
from proxy.audit.receipts import receipt_notice, receipt_text

KEYS = {"public.cs_records": "guest_id", "public.guests": "id", "public.keycard_events": "guest_id"}


def test_receipt_text() -> None:
    assert receipt_text("R-1", 1, ["public.cs_records"], ["public.cs_records.phone"]) == (
        "pgwarden receipt R-1: 1 row from cs_records, masked: phone")
    assert receipt_text("R-2", 0, ["public.guests", "public.cs_records"], [],
                        ["public.guests.bank_card", "public.cs_records.id_number"]) == (
        "pgwarden receipt R-2: 0 rows from cs_records, guests, hidden: cs_records.id_number, guests.bank_card")
    assert receipt_text("R-3", 37, ["audit.cs_archive"]) == "pgwarden receipt R-3: 37 rows from audit.cs_archive"
    assert receipt_notice("x") == b"N\x00\x00\x00\x1fSNOTICE\x00VNOTICE\x00C00000\x00Mx\x00\x00"


@pytest.mark.parametrize("sql,tables,want", [
    ("SELECT * FROM cs_records WHERE guest_id = 42", ["public.cs_records"], ("42",)),
    ("SELECT * FROM cs_records r WHERE r.guest_id IN (1, 2, '3')", ["public.cs_records"], ("1", "2", "3")),
    ("SELECT * FROM guests WHERE id = 7 AND region = 'east'", ["public.guests"], ("7",)),
    ("SELECT * FROM guests g JOIN cs_records c ON c.guest_id = g.id WHERE g.id = 5 AND c.id = 99",
     ["public.guests", "public.cs_records"], ("5",)),
    ("SELECT * FROM cs_records WHERE id = 5", ["public.cs_records"], ()),  # a record id, not a guest
    ("SELECT * FROM cs_records WHERE guest_id = $1", ["public.cs_records"], ()),  # a bind parameter
    ("SELECT * FROM keycard_events WHERE guest_id = CAST('12' AS bigint)", ["public.keycard_events"], ("12",)),
    ("SELECT name FROM sys_params WHERE id = 3", ["public.sys_params"], ()),
])
def test_guests_read_from_statements(sql: str, tables: list[str], want: tuple[str, ...]) -> None:
    assert guests_of({"event": "statement", "statement": sql, "tables": tables}, KEYS) == want


def test_guests_named_by_the_event_win() -> None:
    assert guests_of({"event": "statement", "statement": "SELECT 1", "guests": [3, 4]}, KEYS) == ("3", "4")
    counted = {"event": "statement", "statement": "SELECT * FROM cs_records WHERE guest_id = $1",
               "tables": ["public.cs_records"], "guard": {"lookups": {"17": 2}, "rows_hour": 5}}
    assert guests_of(counted, KEYS) == ("17",)  # the quota's count names a guest bound as a parameter


def test_filters() -> None:
    ev = {"event": "statement", "user": "bob", "role": "supervisor", "outcome": "refused",
          "time": "2026-11-02T03:00:00+00:00", "tables": ["public.cs_records"]}
    assert decision_of(ev) == "refuse"
    assert matches(ev, Filters(user="bob", table="cs_records", decision="refuse"))
    assert not matches(ev, Filters(decision="allow"))
    assert matches(ev, Filters(since=parse_when("2026-11-02"), until=parse_when("2026-11-02T03:00:01")))
    assert not matches(ev, Filters(until=parse_when("2026-11-02T03:00:00Z")))  # until is exclusive
    now = datetime(2026, 11, 30, tzinfo=timezone.utc)
    assert parse_when("30d", now) == datetime(2026, 10, 31, tzinfo=timezone.utc)
    with pytest.raises(ValueError, match="not a time: 'yesterday'"):
        parse_when("yesterday")


def test_off_shift_by_the_persons_shift_or_off_hours() -> None:
    night = Window(time(23), time(7))
    assert night.contains(time(23, 30)) and night.contains(time(6, 59)) and not night.contains(time(7))
    evs = [{"event": "statement", "user": u, "time": t, "rows": 1} for u, t in [
        ("alice", "2026-11-02T08:00:00+00:00"),  # 16:00 in Shanghai: alice works early (07-15): off
        ("alice", "2026-11-02T01:00:00+00:00"),  # 09:00: on
        ("bob", "2026-11-02T08:00:00+00:00"),    # 16:00, no shift: not off hours
        ("bob", "2026-11-02T16:00:00+00:00"),    # 00:00: off hours
    ]]
    s = summarise(evs, since=datetime(2026, 11, 1, tzinfo=timezone.utc), until=datetime(2026, 12, 1, tzinfo=timezone.utc),
                  tz=ZoneInfo("Asia/Shanghai"), shifts={"early": Window(time(7), time(15))},
                  user_shifts={"alice": "early"}, off_hours=night)
    assert [(e["user"], e["time"][11:13]) for e in s.off_shift] == [("alice", "08"), ("bob", "16")]
    assert (s.users["alice"].off_shift, s.users["bob"].off_shift) == (1, 1)


def test_ticket_summary_reads_monthly_and_gzipped_audit_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from proxy.audit.log import AuditLog
    from proxy.cli.tickets import read_summary

    t = [datetime(2026, 10, 31, 23, 59, tzinfo=timezone.utc).timestamp()]
    template = str(tmp_path / "audit-%Y-%m.jsonl")
    log = AuditLog(template, replica="r", clock=lambda: t[0])
    who = {"user": "bob", "role": "supervisor"}
    log.emit_with("statement", who, {"ticket": "T-7", "rows": 3, "tables": ["public.cs_records"]})
    t[0] = datetime(2026, 11, 1, 0, 1, tzinfo=timezone.utc).timestamp()
    log.emit_with("statement", who, {"ticket": "T-7", "rows": 4, "tables": ["public.guests"]})
    log.emit_with("statement", who, {"ticket": "T-8", "rows": 50})
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit-2026-10.jsonl.gz", "audit-2026-11.jsonl"]
    assert read_summary(template, "T-7") == {"statements": 2, "rows": 7, "guests": [],
                                             "tables": ["public.cs_records", "public.guests"]}


def test_search_by_value_matches_keyed_hashes_and_clear_literals() -> None:
    from proxy.audit.search import Filters, matches
    from rules.redact import value_hash

    key = b"k" * 32
    redacted = {"event": "statement", "statement": "SELECT * FROM cs_records WHERE phone = '139****5678'",
                "value_hashes": [value_hash(key, "13912345678")]}
    clear = {"event": "statement", "statement": "SELECT * FROM cs_records WHERE agent = 'zhou' AND guest_id = 42"}
    f = Filters(value="13912345678", value_hash=value_hash(key, "13912345678"))
    assert matches(redacted, f) and not matches(clear, f)
    assert matches(clear, Filters(value="zhou")) and matches(clear, Filters(value="42"))
    assert not matches(clear, Filters(value="4")) and not matches(redacted, Filters(value="139"))
