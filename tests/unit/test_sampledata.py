"""The sample generator: check digits, row shapes and invariants, without a database.

Other tests (masking, redaction, time windows, department filters) rely on
these properties of the sample, so they are pinned here.
"""

from __future__ import annotations

import re
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

# Self-contained: import the source tree even when the project is not installed.

from proxy.demo.sampledata import (  # noqa: E402
    ACCOUNT_MANAGERS,
    CATEGORIES,
    CHANNELS,
    DEPARTMENTS,
    POST_LOAD_MARKER,
    STAFF,
    TABLES,
    iter_tables,
    luhn_check_digit,
    luhn_ok,
    partition_bounds,
    partitions_ddl,
    resident_id_check_digit,
    resident_id_ok,
    schema_sql,
)

NOW = datetime(2026, 11, 29, 4, 30, tzinfo=UTC)
_CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def sample() -> dict[str, tuple[tuple[str, ...], list[tuple]]]:
    out = {}
    for table in iter_tables(cs_records=20_000, guests=500, seed=7, now=NOW):
        out[table.name] = (table.columns, list(table.rows))
    return out


def _dicts(sample, name: str) -> list[dict]:
    columns, rows = sample[name]
    return [dict(zip(columns, row, strict=True)) for row in rows]


# -- check digits -----------------------------------------------------------


@pytest.mark.parametrize(
    "number",
    [
        "11010519491231002X",  # the example in GB 11643-1999
        "440524188001010014",  # the other example in the standard
        # Widely used sample ID; by hand: sum(digit * weight) = 189, 189 % 11 = 2 -> "X".
        "34052419800101001X",
    ],
)
def test_resident_id_check_digit_known_valid(number: str) -> None:
    assert resident_id_check_digit(number[:17]) == number[17]
    assert resident_id_ok(number)


def test_resident_id_rejects_wrong_digit_and_bad_input() -> None:
    assert not resident_id_ok("110105194912310021")
    assert not resident_id_ok("11010519491231002")  # 17 chars
    assert resident_id_ok("11010519491231002x")  # lowercase x is the same check character
    with pytest.raises(ValueError):
        resident_id_check_digit("1101051949123100")
    with pytest.raises(ValueError):
        resident_id_check_digit("1101051949123100A")


@pytest.mark.parametrize("number", ["4111111111111111", "79927398713", "5555555555554444", "6011111111111117"])
def test_luhn_known_valid(number: str) -> None:
    assert luhn_ok(number)
    assert luhn_check_digit(number[:-1]) == number[-1]


@pytest.mark.parametrize("number", ["4111111111111112", "79927398710", "", "7", "4111-1111-1111-1111", "４１１１"])
def test_luhn_rejects(number: str) -> None:
    assert not luhn_ok(number)


# -- schema -----------------------------------------------------------------


def _schema_columns() -> dict[str, list[str]]:
    tables: dict[str, list[str]] = {}
    for name, body in re.findall(r"CREATE TABLE (\w+) \((.*?)\n\)", schema_sql(), re.S):
        cols = []
        for line in body.splitlines():
            word = line.strip().split(" ", 1)[0]
            if word and word.upper() not in ("PRIMARY", "CONSTRAINT", "UNIQUE", "CHECK", "--"):
                cols.append(word)
        tables[name] = cols
    return tables


def test_schema_declares_every_table_with_generator_columns(sample) -> None:
    declared = _schema_columns()
    assert set(declared) == set(TABLES)
    for name in TABLES:
        assert list(sample[name][0]) == declared[name], name


def test_schema_has_post_load_section_and_drops_tables_not_schema() -> None:
    sql = schema_sql()
    pre, marker, post = sql.partition(POST_LOAD_MARKER)
    assert marker and "CREATE INDEX cs_records_guest_id_idx" in post
    assert "PARTITION BY RANGE (created_at)" in pre
    assert "DROP SCHEMA" not in sql.upper()


def test_partitions_cover_three_years_and_next_month() -> None:
    bounds = partition_bounds(NOW)
    names = [n for n, _, _ in bounds]
    assert names[0] == "cs_records_2023_11"
    assert names[-1] == "cs_records_2026_12"
    assert "cs_records_2026_11" in names
    assert len(names) == len(set(names)) == 38
    for (_, _, hi), (_, lo, _) in zip(bounds, bounds[1:]):
        assert hi == lo  # contiguous
    assert partitions_ddl(NOW).count("PARTITION OF cs_records") == 38


# -- generated rows -----------------------------------------------------------


def test_row_shapes(sample) -> None:
    for name in TABLES:
        columns, rows = sample[name]
        assert rows, name
        assert all(len(r) == len(columns) for r in rows), name
    assert len(sample["guests"][1]) == 500
    assert len(sample["cs_records"][1]) == 20_000


def test_guests_look_real(sample) -> None:
    guests = _dicts(sample, "guests")
    assert len({g["id_number"] for g in guests}) == len(guests)
    assert len({g["phone"] for g in guests}) == len(guests)
    for g in guests:
        assert 2 <= len(g["name"]) <= 4 and all(_CJK.match(c) for c in g["name"])
        idn = g["id_number"]
        assert len(idn) == 18 and resident_id_ok(idn), idn
        assert 1950 <= int(idn[6:10]) <= 2005
        datetime.strptime(idn[6:14], "%Y%m%d")
        assert re.fullmatch(r"1(3\d|5[0-35-9]|8\d|9[135-9])\d{8}", g["phone"]), g["phone"]
        assert re.fullmatch(r"[a-z0-9.]+@[a-z0-9.]+\.com", g["email"]), g["email"]
        if g["bank_card"] is not None:
            assert 16 <= len(g["bank_card"]) <= 19 and luhn_ok(g["bank_card"]), g["bank_card"]
        assert g["account_manager"] in ACCOUNT_MANAGERS
        assert g["region"] in ("east", "north", "south", "west")
    assert {g["account_manager"] for g in guests} == set(ACCOUNT_MANAGERS)
    assert sum(g["bank_card"] is not None for g in guests) > 400


def test_cs_records_copy_guest_values_and_respect_domains(sample) -> None:
    guests = {g["id"]: g for g in _dicts(sample, "guests")}
    records = _dicts(sample, "cs_records")
    assert [r["id"] for r in records] == list(range(1, len(records) + 1))
    for r in records:
        g = guests[r["guest_id"]]
        assert (r["guest_name"], r["phone"], r["id_number"]) == (g["name"], g["phone"], g["id_number"])
        assert r["bank_card"] in (None, g["bank_card"])
        assert r["department"] in DEPARTMENTS
        assert r["category"] in CATEGORIES
        assert r["channel"] in CHANNELS
        assert r["severity"] == "normal" or (r["severity"] == "major" and r["category"] == "complaint")
        assert r["agent"] in STAFF[r["department"]]
        assert _CJK.search(r["content"]) and r["content"].endswith("。")
        assert "{" not in r["content"]
    assert {"alice", "bob", "anna"} <= {r["agent"] for r in records}
    assert sum(r["bank_card"] is None for r in records) > 0.9 * len(records)
    hold = sum(r["legal_hold"] for r in records) / len(records)
    assert 0.004 < hold < 0.02
    dept = Counter(r["department"] for r in records)
    assert dept.most_common(1)[0][0] == "FO"
    assert Counter(r["category"] for r in records if r["department"] == "SALES")["complaint"] > 0


def test_cs_records_timestamps_dense_recently_and_inside_partitions(sample) -> None:
    records = _dicts(sample, "cs_records")
    stamps = [r["created_at"] for r in records]
    assert stamps == sorted(stamps)  # ids grow with time
    assert all(ts.tzinfo is not None and ts < NOW for ts in stamps)
    lo = datetime.combine(partition_bounds(NOW)[0][1], datetime.min.time(), UTC)
    assert stamps[0] >= lo
    assert stamps[0] < NOW - timedelta(days=3 * 365 - 30)  # really spans three years

    def within(delta: timedelta, dept: str | None = None) -> int:
        return sum(1 for r in records if r["created_at"] >= NOW - delta and (dept is None or r["department"] == dept))

    assert within(timedelta(hours=1)) >= 50
    assert within(timedelta(hours=8), "FO") >= 100  # a shift of front-office records
    last_72h, last_week = within(timedelta(hours=72)), within(timedelta(days=7))
    # The last week is far denser than the three-year average (20k/1095 ≈ 18/day).
    assert last_week > 2000 and last_72h > 1000


def test_dependent_tables_point_at_real_records(sample) -> None:
    records = {r["id"]: r for r in _dicts(sample, "cs_records")}
    disputes = _dicts(sample, "disputes")
    held = {i for i, r in records.items() if r["legal_hold"]}
    assert held <= {d["cs_record_id"] for d in disputes}  # every legal hold is disputed
    assert any(d["handling_department"] != records[d["cs_record_id"]]["department"] for d in disputes)
    assert {d["status"] for d in disputes} == {"open", "closed"}
    plans = _dicts(sample, "complaint_plans")
    assert all(p["cs_record_id"] in records for p in plans)
    assert {p["published"] for p in plans} == {True, False}
    tickets = _dicts(sample, "abnormal_tickets")
    assert all(t["cs_record_id"] in records and t["department"] == records[t["cs_record_id"]]["department"]
               for t in tickets)
    assert any(t["closed_at"] is None for t in tickets)
    assert all(1 <= s["score"] <= 5 for s in _dicts(sample, "service_ratings"))
    guest_ids = {g[0] for g in sample["guests"][1]}
    assert all(k["guest_id"] in guest_ids for k in _dicts(sample, "keycard_events"))


def test_deterministic_for_seed_and_now() -> None:
    def snapshot(seed: int) -> list[list[tuple]]:
        return [list(t.rows) for t in iter_tables(cs_records=500, guests=50, seed=seed, now=NOW)]

    assert snapshot(1) == snapshot(1)
    assert snapshot(1) != snapshot(2)


def test_cs_rows_must_be_consumed_before_next_table() -> None:
    tables = iter_tables(cs_records=10, guests=5, now=NOW)
    next(tables)
    next(tables)  # cs_records, rows not consumed
    with pytest.raises(RuntimeError, match="consume"):
        next(tables)
