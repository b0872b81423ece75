"""Row conditions from the hotel rules, evaluated by a real PostgreSQL against the sample data.

Each filter is compared with an independently written predicate; time windows
are checked at fixed instants by putting a literal in place of
statement_timestamp() (the only clock the filters read).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest
import sqlglot
from sqlglot import exp

from rules.principal import Principal
from proxy.demo.pgcluster import PgCluster
from rules.model import grants_for, load_rules

HOTEL = Path(__file__).resolve().parents[2] / "deploy" / "rules" / "hotel.yaml"
RULES = load_rules(HOTEL)


def filter_sql(user: str, role: str, dept: str | None, table: str, at: datetime | None = None, **attrs: object) -> str:
    grants, why = grants_for(RULES, Principal(user=user, role=role, department=dept, attributes=dict(attrs)))
    assert grants is not None, why
    f = grants.tables[table].row_filter
    assert f is not None
    if at is not None:
        lit = sqlglot.parse_one(f"CAST('{at.isoformat()}' AS timestamptz)", read="postgres")
        f = f.transform(lambda n: lit.copy() if isinstance(n, exp.Anonymous) and n.name.lower() == "statement_timestamp"
                        or (isinstance(n, exp.Dot) and "statement_timestamp" in n.sql().lower()) else n)
        assert "statement_timestamp" not in f.sql(dialect="postgres")
    return f.sql(dialect="postgres")


def count(c: PgCluster, table: str, where: str) -> int:
    with psycopg.connect(c.dsn(c.superuser, c.superuser_password)) as conn:
        return conn.execute(f"SELECT count(*) FROM {table} WHERE {where}").fetchone()[0]


def test_supervisor_72_hours_own_department(cluster: PgCluster) -> None:
    at = datetime.now(timezone.utc)
    got = count(cluster, "public.cs_records", filter_sql("bob", "supervisor", "FO", "public.cs_records", at))
    want = count(cluster, "public.cs_records", f"created_at >= '{(at - timedelta(hours=72)).isoformat()}' "
                 "AND department = 'FO' AND NOT legal_hold")
    assert got == want > 0


def test_account_manager_own_guests(cluster: PgCluster) -> None:
    got = count(cluster, "public.cs_records", filter_sql("erin", "account_manager", "SALES", "public.cs_records"))
    want = count(cluster, "public.cs_records",
                 "guest_id IN (SELECT id FROM guests WHERE account_manager = 'erin') AND NOT legal_hold")
    assert got == want > 0
    assert count(cluster, "public.guests", filter_sql("erin", "account_manager", "SALES", "public.guests")) == \
        count(cluster, "public.guests", "account_manager = 'erin'")


def test_sales_consultations_only(cluster: PgCluster) -> None:
    where = filter_sql("gina", "sales", "SALES", "public.cs_records")
    assert count(cluster, "public.cs_records", where) == count(
        cluster, "public.cs_records", "category = 'consultation' AND NOT legal_hold")
    assert count(cluster, "public.cs_records", f"({where}) AND category = 'complaint'") == 0


# Asia/Shanghai is UTC+8 all year.
@pytest.mark.parametrize("local_now,first_in,first_out", [
    ("2026-11-29 10:30", "2026-11-29 07:00", "2026-11-29 06:59"),   # early shift 07-15
    ("2026-11-29 15:00", "2026-11-29 15:00", "2026-11-29 14:59"),   # late shift begins
    ("2026-11-29 23:30", "2026-11-29 23:00", "2026-11-29 22:59"),   # night shift, before midnight
    ("2026-11-30 02:00", "2026-11-29 23:00", "2026-11-29 22:59"),   # night shift, after midnight
])
def test_current_shift_window(cluster: PgCluster, local_now: str, first_in: str, first_out: str) -> None:
    tz = timezone(timedelta(hours=8))
    at = datetime.fromisoformat(local_now).replace(tzinfo=tz)
    where = filter_sql("alice", "front_desk", "FO", "public.cs_records", at, training_completed=True)
    rows = " UNION ALL ".join(
        f"SELECT CAST('{t}+08' AS timestamptz) AS created_at, 'FO'::text AS department, false AS legal_hold, '{n}' AS n"
        for n, t in (("in", first_in), ("out", first_out), ("now", local_now),
                     ("future", (datetime.fromisoformat(local_now) + timedelta(minutes=1)).isoformat(" "))))
    with psycopg.connect(cluster.dsn(cluster.superuser, cluster.superuser_password)) as conn:
        got = {r[0] for r in conn.execute(f"SELECT n FROM ({rows}) s WHERE {where}").fetchall()}
    assert got == {"in", "now"}


def test_seconded_staff_see_only_their_original_department_during_the_window(cluster: PgCluster) -> None:
    # bob is seconded from FO to HK (his department now says HK) for November: he still sees FO then.
    sec = {"home_department": "FO", "from": "2026-11-01T00:00:00+08:00", "until": "2026-12-01T00:00:00+08:00"}
    during = datetime(2026, 11, 15, tzinfo=timezone.utc)
    after = datetime(2026, 12, 15, tzinfo=timezone.utc)
    for at, dept in ((during, "FO"), (after, "HK")):
        where = filter_sql("bob", "supervisor", "HK", "public.cs_records", at, secondment=sec)
        got = count(cluster, "public.cs_records", f"({where}) AND department <> '{dept}'")
        assert got == 0, (at, where)
        # the same filter with his department's name put in plainly selects the same rows
        plain = filter_sql("bob", "supervisor", dept, "public.cs_records", at)
        n = count(cluster, "public.cs_records", plain)
        assert count(cluster, "public.cs_records", where) == n and (n > 0 or at is after)
