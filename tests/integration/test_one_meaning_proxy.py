"""One meaning (issue 11) through the real proxy: 10,000 hostile statements, real data, real PostgreSQL.

The cases of tests/hostile_sql.py (the same seed as tests/unit/test_one_meaning.py), each
sent through pgwarden with the hotel rules as a restricted demo user, in the simple or the
extended protocol. The oracle is the data itself, read directly from PostgreSQL:

* no value that comes back (rows, COPY data, error messages) contains a full phone or resident
  ID number of any guest or record: every role here sees them masked, if at all;
* every ``LEAK:department:legal_hold:category:agent:...`` row a payload produces is one of the
  rows that user may see (department, legal hold, category, agent per the rules);
* a refusal is SQLSTATE 42501, and the session goes on working after it.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable, Iterator

import psycopg
import pytest

from proxy.demo.pgcluster import PgCluster
from tests.conftest import Proxy, start_proxy
from tests.hostile_sql import cases
from tests.integration.test_policy_e2e import HOTEL, direct
from tests.unit.test_one_meaning import N, SEED

#: user -> what a LEAK row of cs_records (department, legal_hold, category, agent) must satisfy
ALLOWED_ROWS: dict[str, Callable[[str, str, str, str], bool]] = {
    "alice": lambda dept, legal, cat, agent: dept == "FO" and legal == "false",
    "bob": lambda dept, legal, cat, agent: dept == "FO" and legal == "false",
    "gina": lambda dept, legal, cat, agent: cat == "consultation" and legal == "false",
    "erin": lambda dept, legal, cat, agent: legal == "false",
    "pms": lambda dept, legal, cat, agent: agent == "pms",
    "carol": lambda *_: False,
    "hank": lambda *_: False,
    "frank": lambda *_: True,
}
USERS = tuple(ALLOWED_ROWS)
_DIGITS = re.compile(r"\d{17}[\dX]|\d{11,19}")


@pytest.fixture(scope="module")
def strict(cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    p = start_proxy(cluster, str(tmp_path_factory.mktemp("one-meaning")), rules=str(HOTEL))
    try:
        yield p
    finally:
        p.thread.stop()


@pytest.fixture(scope="module")
def secrets(cluster: PgCluster) -> frozenset[str]:
    rows = direct(cluster, "SELECT phone FROM cs_records UNION SELECT id_number FROM cs_records "
                           "UNION SELECT phone FROM guests UNION SELECT id_number FROM guests "
                           "UNION SELECT bank_card FROM guests")
    found = frozenset(r[0] for r in rows if r[0])
    assert len(found) > 1000
    return found


def _texts(value: object) -> Iterator[str]:
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _texts(v)
    elif value is not None:
        yield value.decode(errors="replace") if isinstance(value, (bytes, memoryview)) else str(value)


def _violations(user: str, got: object, secrets: frozenset[str]) -> list[str]:
    out = []
    for text in _texts(got):
        for m in _DIGITS.finditer(text):
            if m.group(0) in secrets:
                out.append(f"secret value {m.group(0)}")
        if text.startswith("LEAK:"):
            parts = text.split(":")
            if len(parts) >= 6 and not ALLOWED_ROWS[user](parts[1], parts[2], parts[3], parts[4]):
                out.append(f"a row {user} may not see: {text[:80]}")
    return out


def test_hostile_statements_through_the_proxy_leak_nothing(strict: Proxy, secrets: frozenset[str]) -> None:
    conns: dict[str, psycopg.Connection] = {}
    outcomes: collections.Counter[str] = collections.Counter()
    bad: list[tuple[str, str, list[str]]] = []

    def conn(user: str) -> psycopg.Connection:
        c = conns.get(user)
        if c is None or c.closed or c.broken:
            c = conns[user] = psycopg.connect(strict.dsn(user), autocommit=True)
        return c

    try:
        for i, case in enumerate(cases(SEED, N)):
            user = USERS[i % len(USERS)]
            c = conn(user)
            try:
                cur = c.execute(case.sql, prepare=True if case.extended else None)
                got: object = []
                while True:  # every result of a multi-statement Query
                    if cur.description is not None:
                        got = [got, cur.fetchall()]
                    if not cur.nextset():
                        break
                outcomes["rows"] += 1
            except psycopg.Error as e:
                got = [str(e), getattr(e.diag, "message_detail", None)]
                state = e.sqlstate or "client"
                outcomes[state] += 1
                if e.sqlstate is None:  # not an answer of the server's: e.g. a COPY the driver did not expect
                    bad.append((user, case.sql, [f"{case.where}: {type(e).__name__}: {e}"]))
                    conns.pop(user).close()
            problems = _violations(user, got, secrets)
            if problems:
                bad.append((user, case.sql, [case.where, *problems]))
    finally:
        for c in conns.values():
            c.close()
    assert not bad, bad[:5]
    assert outcomes["42501"] > 3000 and outcomes["rows"] > 500, outcomes
    events = strict.take_events()
    assert sum(1 for e in events if str(e.get("reason", "")).startswith("parser_disagreement")) > 100
