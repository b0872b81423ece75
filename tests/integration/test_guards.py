"""Guards with shared state, through two real pgwarden replicas sharing one state store (R3.4, R3.5, R6.3).

Each test gets its own state schema, so counters and lockouts never leak between tests.
The replicas are separate servers on separate ports; what one counts, the other sees.
"""

from __future__ import annotations

import contextlib
import asyncio
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from proxy.demo.pgcluster import PgCluster
from tests.conftest import Proxy, start_proxy, state_config
from tests.integration.test_policy_e2e import HOTEL, direct

LOCKED = "locked out until"


@pytest.fixture
def schema(cluster: PgCluster) -> Iterator[str]:
    name = f"pgwarden_t{secrets.token_hex(4)}"
    yield name
    cluster.psql(f"DROP SCHEMA IF EXISTS {name} CASCADE", user=cluster.superuser)


def replicas(cluster: PgCluster, schema: str, tmp_path: Path, rules: Path = HOTEL) -> tuple[Proxy, Proxy]:
    a = start_proxy(cluster, str(tmp_path / "a"), rules=str(rules), state=state_config(cluster, schema))
    b = start_proxy(cluster, str(tmp_path / "b"), rules=str(rules), state=state_config(cluster, schema))
    return a, b


def hotel_with(tmp_path: Path, *edits: tuple[str, str]) -> Path:
    """The hotel rules with some lines changed (each edit must apply exactly once)."""
    text = HOTEL.read_text(encoding="utf-8")
    for old, new in edits:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path = tmp_path / "rules.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def pair(cluster: PgCluster, schema: str, tmp_path: Path) -> Iterator[tuple[Proxy, Proxy]]:
    a, b = replicas(cluster, schema, tmp_path)
    try:
        yield a, b
    finally:
        a.thread.stop()
        b.thread.stop()


def attempt(p: Proxy, user: str, sql: str, params: tuple | None = None) -> list[tuple] | psycopg.Error:
    try:
        with psycopg.connect(p.dsn(user), autocommit=True) as c:
            return c.execute(sql, params).fetchall()
    except psycopg.Error as e:
        return e


def login_error(p: Proxy, user: str) -> tuple[str, str]:
    """(SQLSTATE, message) of a refused login (asyncpg keeps the SQLSTATE of login errors)."""
    import asyncpg

    async def go() -> tuple[str, str]:
        try:
            conn = await asyncpg.connect(host="127.0.0.1", port=p.port, user=user, password="demo",
                                         database="hotel", ssl=False)
        except asyncpg.PostgresError as e:
            return e.sqlstate, str(e)
        await conn.close()
        return "", ""

    return asyncio.run(go())


def sqlstate(r: list[tuple] | psycopg.Error) -> str | None:
    return r.sqlstate if isinstance(r, psycopg.Error) else None


def locked_out(p: Proxy, user: str) -> bool:
    """True when ``user`` is refused at login for a lockout (28000, saying until when); False if let in."""
    state, message = login_error(p, user)
    if state == "":
        return False
    assert state == "28000" and message.startswith(f"pgwarden: user {user} is locked out until "), (state, message)
    return True


BOB_SEES = "department = 'FO' AND NOT legal_hold AND created_at >= statement_timestamp() - interval '72 hours'"


def bob_count(cluster: PgCluster, where: str) -> list[tuple]:
    """What bob (supervisor, FO) counts in cs_records with ``where``, read directly."""
    return direct(cluster, f"SELECT count(*) FROM cs_records WHERE ({where}) AND {BOB_SEES}")


def wait_until(cond, timeout: float = 10.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.1)


# ---------------------------------------------------------------------------
# circuit breaker (R3.5)
# ---------------------------------------------------------------------------


def test_three_refusals_lock_out_on_every_replica_until_security_unlocks(
        pair: tuple[Proxy, Proxy], cluster: PgCluster, schema: str, tmp_path: Path) -> None:
    a, b = pair
    for _ in range(3):
        assert sqlstate(attempt(a, "gina", "SELECT * FROM guests")) == "42501"
    # The other replica refuses at once, statements and logins, saying until when and what to do.
    with psycopg.connect(b.dsn("carol"), autocommit=True):
        pass  # others are not affected
    wait_until(lambda: locked_out(b, "gina"))
    state, message = login_error(b, "gina")
    assert state == "28000" and LOCKED in message and "pgwarden unlock gina" in message
    with psycopg.connect(a.dsn("frank"), autocommit=True) as sec:
        assert sec.execute("SELECT 1").fetchall() == [(1,)]
    assert [e["user"] for e in a.take_events("lockout")] == ["gina"]
    # Security sees it in the admin console of either replica (simple protocol, like pgbouncer's).
    with psycopg.connect(b.dsn("frank", database="pgwarden"), autocommit=True) as console:
        cur = console.execute("SHOW LOCKOUTS", prepare=False)
        rows = cur.fetchall()
    assert [(r[0], r[2]) for r in rows] == [("gina", "pgwarden: role sales may not read table public.guests")]
    (row,) = direct(cluster, f"SELECT user_name, locked_until > now() + interval '29 minutes' FROM {schema}.lockouts")
    assert row == ("gina", True)

    # Security lifts it from the command line, as itself (password checked, role checked).
    cfg = tmp_path / "pgwarden.yaml"
    write_config(cfg, cluster, schema)
    env = dict(os.environ, PGWARDEN_PASSWORD="demo")
    denied = subprocess.run([sys.executable, "-m", "proxy.cli", "unlock", "gina", "--config", str(cfg),
                             "--as", "bob"], env=env, capture_output=True, text=True, timeout=60)
    assert denied.returncode == 3 and "may not unlock" in denied.stderr
    wrong = subprocess.run([sys.executable, "-m", "proxy.cli", "unlock", "gina", "--config", str(cfg),
                            "--as", "frank"], env=dict(env, PGWARDEN_PASSWORD="nope"), capture_output=True,
                           text=True, timeout=60)
    assert wrong.returncode == 3
    itself = subprocess.run([sys.executable, "-m", "proxy.cli", "unlock", "frank", "--config", str(cfg), "--as", "frank"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert itself.returncode == 3 and "nobody unlocks themselves" in itself.stderr
    ok = subprocess.run([sys.executable, "-m", "proxy.cli", "unlock", "gina", "--config", str(cfg), "--as", "frank"],
                        env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "gina: unlocked" in ok.stdout, ok.stderr
    wait_until(lambda: not locked_out(b, "gina"))
    assert attempt(a, "gina", "SELECT 1") == [(1,)]
    assert direct(cluster, f"SELECT count(*) FROM {schema}.lockouts") == [(0,)]
    events = [json.loads(line) for line in (tmp_path / "cli-audit.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["unlock", "audit_closed"]  # the chain ends with a clean stop
    assert events[0]["replica"].endswith(":unlock")  # a chain of its own, apart from the proxy's
    unlocks = events[:1]
    assert [(e["event"], e["user"], e["target"], e["lifted"]) for e in unlocks] == [("unlock", "frank", "gina", True)]


def test_an_allowed_statement_breaks_the_streak(pair: tuple[Proxy, Proxy], cluster: PgCluster, schema: str) -> None:
    a, b = pair

    def streak() -> list[tuple]:
        return direct(cluster, f"SELECT streak FROM {schema}.refusal_streaks WHERE user_name = 'gina'")

    for p in (a, b):
        assert sqlstate(attempt(p, "gina", "SELECT * FROM guests")) == "42501"
    wait_until(lambda: streak() == [(2,)])
    assert attempt(a, "gina", "SELECT 1") == [(1,)]
    wait_until(lambda: streak() == [(0,)])  # the reset travels to the store without the client waiting for it
    for p in (b, a):
        assert sqlstate(attempt(p, "gina", "SELECT * FROM guests")) == "42501"
    wait_until(lambda: streak() == [(2,)])
    assert attempt(b, "gina", "SELECT 1") == [(1,)]
    assert direct(cluster, f"SELECT count(*) FROM {schema}.lockouts") == [(0,)]


# ---------------------------------------------------------------------------
# guest lookup quota (R3.4)
# ---------------------------------------------------------------------------


def visible_guests(cluster: PgCluster, n: int) -> list[int]:
    """Guests with FO records in the last 72 hours (bob, an FO supervisor, sees them)."""
    rows = direct(cluster, "SELECT guest_id FROM cs_records WHERE department = 'FO' AND NOT legal_hold "
                           "AND created_at >= statement_timestamp() - interval '70 hours' "
                           f"GROUP BY guest_id ORDER BY guest_id LIMIT {n}")
    assert len(rows) == n
    return [g for (g,) in rows]


def test_fourth_lookup_of_a_guest_is_refused_whatever_the_replica_or_shape(
        pair: tuple[Proxy, Proxy], cluster: PgCluster, schema: str) -> None:
    a, b = pair
    g, other = visible_guests(cluster, 2)
    want = direct(cluster, f"SELECT count(*) FROM cs_records WHERE guest_id = {g} AND department = 'FO' "
                           "AND NOT legal_hold AND created_at >= statement_timestamp() - interval '72 hours'")
    assert attempt(a, "bob", f"SELECT count(*) FROM cs_records WHERE guest_id = {g}") == want          # literal
    assert attempt(b, "bob", "SELECT count(*) FROM cs_records WHERE guest_id = %s", (g,)) == want      # parameter
    assert attempt(a, "bob", f"SELECT count(*) FROM cs_records WHERE guest_id IN ({g}, {other})") == bob_count(
        cluster, f"guest_id IN ({g}, {other})")                                                            # IN list
    err = attempt(b, "bob", f"SELECT count(*) FROM cs_records WHERE guest_id = '{g}'")
    assert isinstance(err, psycopg.Error) and err.sqlstate == "42501", err
    assert f"looked up guest {g} 3 times this month" in str(err) and "ticket" in str(err)
    err = attempt(a, "bob", "SELECT count(*) FROM cs_records WHERE guest_id = %s", (g,))
    assert sqlstate(err) == "42501" and f"looked up guest {g} 3 times this month" in str(err)
    # The other guest has had one lookup: two more are fine.
    assert attempt(a, "bob", f"SELECT count(*) FROM cs_records WHERE guest_id = {other}") == bob_count(
        cluster, f"guest_id = {other}")
    counts = dict(direct(cluster, f"SELECT guest, lookups FROM {schema}.guest_lookups WHERE user_name = 'bob'"))
    assert counts == {str(g): 3, str(other): 2}
    ev = a.take_events() + b.take_events()
    # each allowed statement's event carries the counts after it: lookups of g, of the other guest
    assert sorted((e["guard"]["lookups"].get(str(g), 0), e["guard"]["lookups"].get(str(other), 0))
                  for e in ev if e["outcome"] == "ok") == [(0, 2), (1, 0), (2, 0), (3, 1)]
    assert [(e["sqlstate"], e["reason"]) for e in ev if e["outcome"] == "refused"] == [
        ("42501", "guest lookup quota (R3.4)")] * 2


@pytest.mark.parametrize("sql", [
    "SELECT count(*) FROM cs_records WHERE guest_id + 0 = {g}",
    "SELECT count(*) FROM cs_records WHERE guest_id BETWEEN {g} AND {g}",
    "SELECT count(*) FROM cs_records WHERE guest_id::text = '{g}'",
])
def test_disguised_lookups_are_refused(pair: tuple[Proxy, Proxy], cluster: PgCluster, sql: str) -> None:
    a, _ = pair
    (g,) = visible_guests(cluster, 1)
    err = attempt(a, "bob", sql.format(g=g))
    assert isinstance(err, psycopg.Error) and err.sqlstate == "42501" and "cannot be counted" in str(err)


def test_concurrent_lookups_never_overshoot(cluster: PgCluster, schema: str, tmp_path: Path) -> None:
    # A row budget large enough not to refuse any of the twelve: only the quota decides here.
    rules = hotel_with(tmp_path, ("    row_budget: {hour: 20000, day: 60000}\n", ""))
    a, b = replicas(cluster, schema, tmp_path, rules)
    try:
        concurrent_lookups(a, b, cluster, schema)
    finally:
        a.thread.stop()
        b.thread.stop()


def concurrent_lookups(a: Proxy, b: Proxy, cluster: PgCluster, schema: str) -> None:
    (g,) = visible_guests(cluster, 1)
    results: list[str | None] = []
    lock = threading.Lock()
    start = threading.Barrier(12)

    def one(i: int) -> None:
        p = (a, b)[i % 2]
        with psycopg.connect(p.dsn("bob"), autocommit=True) as c:
            start.wait()
            try:
                c.execute("SELECT count(*) FROM cs_records WHERE guest_id = %s", (g,)).fetchall()
                r = None
            except psycopg.Error as e:
                r = e.sqlstate
        with lock:
            results.append(r)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results, key=str) == ["42501"] * 9 + [None] * 3
    assert direct(cluster, f"SELECT lookups FROM {schema}.guest_lookups WHERE guest = '{g}'") == [(3,)]


def test_counts_survive_a_restart(cluster: PgCluster, schema: str, tmp_path: Path) -> None:
    (g,) = visible_guests(cluster, 1)
    for n in range(4):
        p = start_proxy(cluster, str(tmp_path / f"r{n}"), rules=str(HOTEL), state=state_config(cluster, schema))
        try:
            r = attempt(p, "bob", f"SELECT count(*) FROM cs_records WHERE guest_id = {g}")
        finally:
            p.thread.stop()
        assert sqlstate(r) == (None if n < 3 else "42501"), (n, r)


# ---------------------------------------------------------------------------
# fail closed (state store unreachable) and recovery
# ---------------------------------------------------------------------------


class Relay:
    """A TCP relay to the cluster that can be cut and restored: the state store 'goes away'."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: asyncio.base_events.Server | None = None
        self.conns: set[asyncio.StreamWriter] = set()
        self.port = 0

    def _call(self, coro):  # noqa: ANN001, ANN202
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            w.close()

    async def _client(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.conns |= {w, uw}
        await asyncio.gather(self._pipe(r, uw), self._pipe(ur, w))

    def up(self) -> None:
        async def start() -> None:
            self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
            self.port = self.server.sockets[0].getsockname()[1]
        self._call(start())

    def down(self) -> None:
        async def stop() -> None:
            assert self.server is not None
            self.server.close()
            for w in list(self.conns):
                w.transport.abort()
            self.conns.clear()
        self._call(stop())


def test_unreachable_store_refuses_restricted_roles_and_recovers(cluster: PgCluster, schema: str,
                                                                 tmp_path: Path) -> None:
    relay = Relay(cluster.port)
    relay.up()
    state = dict(state_config(cluster, schema), port=relay.port)
    p = start_proxy(cluster, str(tmp_path), rules=str(HOTEL), state=state)
    try:
        (g,) = visible_guests(cluster, 1)
        want = bob_count(cluster, f"guest_id = {g}")
        assert attempt(p, "bob", f"SELECT count(*) FROM cs_records WHERE guest_id = {g}") == want
        with psycopg.connect(p.dsn("bob"), autocommit=True) as held:
            relay.down()
            wait_until(lambda: any(e["event"] == "state_store_down" for e in p.take_events(None)))
            state, message = login_error(p, "bob")
            assert state == "28000" and "state store cannot be reached" in message
            with pytest.raises(psycopg.Error) as ei:
                held.execute("SELECT count(*) FROM cs_records")
            assert ei.value.sqlstate == "42501" and "state store cannot be reached" in str(ei.value)
            relay.up()
            wait_until(lambda: attempt(p, "bob", "SELECT 1") == [(1,)], timeout=20)
            assert held.execute(f"SELECT count(*) FROM cs_records WHERE guest_id = {g}").fetchall() == want
        assert direct(cluster, f"SELECT lookups FROM {schema}.guest_lookups WHERE guest = '{g}'") == [(2,)]
    finally:
        p.thread.stop()
        relay.down()


def test_client_sessions_cannot_reach_the_counters(pair: tuple[Proxy, Proxy], cluster: PgCluster,
                                                  schema: str) -> None:
    # The state schema belongs to its own login: the service account every client session runs
    # as cannot read or reset it, whatever the rules let through.
    a, _ = pair
    for user in ("dave", "frank"):
        assert sqlstate(attempt(a, user, f"DELETE FROM {schema}.lockouts")) == "42501"
    with psycopg.connect(cluster.dsn(cluster.service_user), autocommit=True) as svc:
        for sql in (f"SELECT * FROM {schema}.lockouts", f"DELETE FROM {schema}.guest_lookups"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                svc.execute(sql)


def write_config(path: Path, cluster: PgCluster, schema: str, audit: Path | None = None) -> None:
    """A config with the demo users (password "demo") for the command line."""
    from proxy.verifiers import make_scram_verifier
    from proxy.demo.run import DEMO_USERS

    users = {u: {"role": r, "password": make_scram_verifier("demo"), "department": d or "X"}
             for u, (r, d, _, _) in DEMO_USERS.items()}
    doc = {
        "upstream": {"host": cluster.host, "port": cluster.port, "user": cluster.service_user,
                     "password": cluster.service_password, "sslmode": "disable"},
        "audit": {"path": str(audit or path.parent / "cli-audit.jsonl")},
        "rules": str(HOTEL), "state": state_config(cluster, schema), "users": users,
    }
    path.write_text(json.dumps(doc))


# ---------------------------------------------------------------------------
# designated devices (R3.6)
# ---------------------------------------------------------------------------


def test_roles_connect_only_from_their_networks(cluster: PgCluster, tmp_path: Path) -> None:
    text = HOTEL.read_text(encoding="utf-8")
    text = text.replace("  sales:                           # 销售部: consultations, never complaints\n",
                        "  sales:\n    networks: [10.99.0.0/16]\n", 1)
    text = text.replace("  it_ops:                          # IT运维: system parameters and fault logs, never personal data\n",
                        "  it_ops:\n    networks: [10.0.0.0/8, 127.0.0.0/8]\n", 1)
    assert text.count("networks:") == 2
    rules = tmp_path / "rules.yaml"
    rules.write_text(text, encoding="utf-8")
    p = start_proxy(cluster, str(tmp_path), rules=str(rules))
    try:
        state, message = login_error(p, "gina")
        assert state == "28000"
        assert message == ("pgwarden: role sales may connect only from designated devices (10.99.0.0/16), "
                           "not from 127.0.0.1")
        assert attempt(p, "carol", "SELECT 1") == [(1,)]
        assert attempt(p, "bob", "SELECT 1") == [(1,)]  # no networks: anywhere
        failed = [e for e in p.take_events(None) if e["event"] == "login_failed"]
        assert [(e["user"], e["sqlstate"]) for e in failed] == [("gina", "28000")]
    finally:
        p.thread.stop()


# ---------------------------------------------------------------------------
# row budget (R3.3)
# ---------------------------------------------------------------------------


@pytest.fixture
def budget_pair(cluster: PgCluster, schema: str, tmp_path: Path) -> Iterator[tuple[Proxy, Proxy]]:
    """Sales (gina) with a cap of 10 rows per statement and 25 rows per hour."""
    rules = hotel_with(tmp_path, ("  sales:                           # 销售部: consultations, never complaints\n",
                                  "  sales:\n    row_cap: 10\n    row_budget: {hour: 25}\n"))
    a, b = replicas(cluster, schema, tmp_path, rules)
    try:
        yield a, b
    finally:
        a.thread.stop()
        b.thread.stop()


def used_rows(cluster: PgCluster, schema: str, user: str) -> int:
    (n,), = direct(cluster, f"SELECT coalesce(sum(rows), 0)::int FROM {schema}.row_usage WHERE user_name = '{user}'")
    return n


def test_many_small_queries_on_two_replicas_run_into_the_budget(budget_pair: tuple[Proxy, Proxy],
                                                                cluster: PgCluster, schema: str) -> None:
    a, b = budget_pair
    # Each statement reserves the cap (10) and gives back what it did not send.
    for i, p in enumerate((a, b, a, b)):
        rows = attempt(p, "gina", "SELECT id FROM cs_records ORDER BY id LIMIT 5")
        assert isinstance(rows, list) and len(rows) == 5, (i, rows)
        wait_until(lambda: used_rows(cluster, schema, "gina") == 5 * (i + 1))
    # 5 rows are left, fewer than the cap: the statement is decided again with 5 as its cap.
    assert len(attempt(b, "gina", "SELECT id FROM cs_records ORDER BY id LIMIT 3")) == 3  # type: ignore[arg-type]
    wait_until(lambda: used_rows(cluster, schema, "gina") == 23)
    err = attempt(a, "gina", "SELECT id FROM cs_records ORDER BY id LIMIT 10")  # more than the 2 left
    assert isinstance(err, psycopg.Error) and err.sqlstate == "42501"
    assert "more than 10 rows, the row cap of role sales (or than is left of the row budget)" in str(err), str(err)
    wait_until(lambda: used_rows(cluster, schema, "gina") == 23)  # refused: nothing counted
    assert len(attempt(a, "gina", "SELECT id FROM cs_records ORDER BY id LIMIT 2")) == 2  # type: ignore[arg-type]
    wait_until(lambda: used_rows(cluster, schema, "gina") == 25)
    err = attempt(b, "gina", "SELECT id FROM cs_records ORDER BY id LIMIT 1")
    assert isinstance(err, psycopg.Error) and err.sqlstate == "42501"
    assert "gina has 0 rows left of role sales's row budget this hour" in str(err)
    # Statements that read nothing protected are not counted.
    assert attempt(a, "gina", "SELECT 1") == [(1,)]
    ev = [e for e in a.take_events() if e.get("guard") and e.get("outcome") == "ok"]
    assert [e["guard"]["rows_reserved"] for e in ev] == [10, 10, 2]


def test_cursor_fetches_are_counted(budget_pair: tuple[Proxy, Proxy], cluster: PgCluster, schema: str) -> None:
    a, _ = budget_pair
    with psycopg.connect(a.dsn("gina")) as c:
        c.execute("DECLARE cur CURSOR FOR SELECT id FROM cs_records ORDER BY id LIMIT 10")
        assert len(c.execute("FETCH 4 FROM cur").fetchall()) == 4
        assert len(c.execute("FETCH 4 FROM cur").fetchall()) == 4
        wait_until(lambda: used_rows(cluster, schema, "gina") == 8)
        assert len(c.execute("FETCH ALL FROM cur").fetchall()) == 2  # reserves the cap, uses 2
        wait_until(lambda: used_rows(cluster, schema, "gina") == 10)
        c.rollback()
        c.execute("DECLARE cur2 CURSOR FOR SELECT id FROM cs_records ORDER BY id LIMIT 10")
        assert len(c.execute("FETCH 10 FROM cur2").fetchall()) == 10
        wait_until(lambda: used_rows(cluster, schema, "gina") == 20)
        with pytest.raises(psycopg.Error) as ei:
            c.execute("FETCH 6 FROM cur2")
        assert ei.value.sqlstate == "42501" and "5 rows left" in str(ei.value)
        c.rollback()


def test_a_client_certificate_as_second_factor(cluster: PgCluster, tmp_path: Path) -> None:
    from proxy.verifiers import make_scram_verifier
    from tests.integration.fix_tls import make_client_cert, make_self_signed

    cert, key = make_self_signed(str(tmp_path))
    mine, mine_key, mine_fp = make_client_cert(str(tmp_path), cert, key, "bob-laptop")
    other, other_key, _ = make_client_cert(str(tmp_path), cert, key, "someone-else")
    users = {"bob": {"role": "supervisor", "department": "FO", "password": make_scram_verifier("demo"),
                     "certificates": [":".join(mine_fp[i:i + 2] for i in range(0, 64, 2)).upper()]},
             "dave": {"role": "general_manager", "password": make_scram_verifier("demo")}}
    p = start_proxy(cluster, str(tmp_path), tls={"cert": cert, "key": key, "client_ca": cert}, users=users)
    try:
        def connect(user: str, **ssl: str) -> list[tuple] | str:
            extra = " ".join(f"{k}={v}" for k, v in ssl.items())
            try:
                with psycopg.connect(p.dsn(user, sslmode="require") + " " + extra, autocommit=True) as c:
                    return c.execute("SELECT 1").fetchall()
            except psycopg.Error as e:
                return str(e)

        def refusal(user: str, cert: str | None = None, key: str | None = None) -> tuple[str, str]:
            """(SQLSTATE, message) of the login over TLS, read with asyncpg (libpq keeps no SQLSTATE)."""
            import ssl

            import asyncpg

            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            if cert is not None:
                ctx.load_cert_chain(cert, key)

            async def go() -> tuple[str, str]:
                try:
                    conn = await asyncpg.connect(host="127.0.0.1", port=p.port, user=user, password="demo",
                                                 database="hotel", ssl=ctx)
                except asyncpg.PostgresError as e:
                    return e.sqlstate, str(e)
                await conn.close()
                return "", ""

            return asyncio.run(go())

        assert connect("bob", sslcert=mine, sslkey=mine_key) == [(1,)]
        assert "must also present their client certificate (TLS), and presented none" in str(connect("bob"))
        assert "and this one is not theirs" in str(connect("bob", sslcert=other, sslkey=other_key))
        assert refusal("bob") == ("28000", "pgwarden: user bob must also present their client certificate (TLS), "
                                           "and presented none")
        assert refusal("bob", other, other_key) == (
            "28000", "pgwarden: user bob must also present their client certificate (TLS), and this one is not theirs")
        assert refusal("bob", mine, mine_key) == ("", "")
        assert connect("dave") == [(1,)]  # no certificate bound: the password alone
    finally:
        p.thread.stop()


# ---------------------------------------------------------------------------
# bypasses an adversarial review demonstrated (each closed; each asserted here)
# ---------------------------------------------------------------------------


def raw_execute(p: Proxy, user: str, setup: str, portal: str) -> list[tuple[int, bytes]]:
    """A simple-protocol setup, then Execute of a portal by name + Sync, over the raw protocol."""
    from proxy.wire import codec
    from proxy.wire.codes import B, F
    from tests.integration.fix_wire import login, simple_query

    async def go() -> list[tuple[int, bytes]]:
        conn = await login(p.port, user=user)
        try:
            await simple_query(conn, setup)
            conn.send(codec.message(F.EXECUTE, portal.encode() + b"\x00" + (0).to_bytes(4, "big"))
                      + codec.message(F.SYNC))
            return await conn.recv_until(B.READY_FOR_QUERY)
        finally:
            await conn.close()

    return asyncio.run(go())


def test_a_sql_cursor_portal_cannot_be_executed_uncounted(budget_pair: tuple[Proxy, Proxy]) -> None:
    from tests.integration.fix_wire import data_rows, errors

    a, _ = budget_pair
    msgs = raw_execute(a, "gina", "BEGIN; DECLARE cur0 CURSOR FOR SELECT id FROM cs_records LIMIT 10", "cur0")
    assert data_rows(msgs) == []
    (err,) = errors(msgs)
    assert err.sqlstate == "42501" and "may Execute only statements prepared through the protocol" in err.message


def test_a_lockout_stops_statements_prepared_before_it(pair: tuple[Proxy, Proxy], cluster: PgCluster) -> None:
    a, b = pair
    q = "SELECT count(*) FROM cs_records WHERE category = %s"
    with psycopg.connect(a.dsn("bob"), autocommit=True) as held:
        want = bob_count(cluster, "category = 'complaint'")
        assert want[0][0] > 0
        assert held.execute(q, ("complaint",), prepare=True).fetchall() == want  # Parse + Bind + Execute
        for _ in range(3):
            assert sqlstate(attempt(b, "bob", "SELECT * FROM guests")) == "42501"
        wait_until(lambda: locked_out(a, "bob"))
        with pytest.raises(psycopg.Error) as ei:
            held.execute(q, ("complaint",), prepare=True)  # Bind + Execute only, of the earlier Parse
        assert ei.value.sqlstate == "42501" and LOCKED in str(ei.value)


def test_a_forged_notify_neither_unlocks_nor_locks(pair: tuple[Proxy, Proxy], cluster: PgCluster,
                                                   schema: str) -> None:
    a, _ = pair
    for _ in range(3):
        assert sqlstate(attempt(a, "gina", "SELECT * FROM guests")) == "42501"
    wait_until(lambda: locked_out(a, "gina"))
    # Any database login may NOTIFY on any channel (here the service account clients run as).
    with psycopg.connect(cluster.dsn(cluster.service_user), autocommit=True) as svc:
        svc.execute("SELECT pg_notify(%s, %s)", (f"{schema}_guards", json.dumps({"kind": "unlock", "user": "gina"})))
        svc.execute("SELECT pg_notify(%s, %s)", (f"{schema}_guards",
                                                 json.dumps({"kind": "lock", "user": "frank", "until": 4102444800})))
    time.sleep(1.0)
    assert locked_out(a, "gina")              # still locked out
    assert attempt(a, "frank", "SELECT 1") == [(1,)]  # never locked out
    assert direct(cluster, f"SELECT user_name FROM {schema}.lockouts") == [("gina",)]


def test_one_guest_spelled_many_ways_is_one_guest(pair: tuple[Proxy, Proxy], cluster: PgCluster,
                                                  schema: str) -> None:
    a, b = pair
    (g,), = direct(cluster, "SELECT guest_id FROM cs_records WHERE department = 'FO' AND NOT legal_hold AND "
                            "created_at >= now() - interval '70 hours' GROUP BY guest_id ORDER BY guest_id LIMIT 1")
    spellings = [(a, f"SELECT count(*) FROM cs_records WHERE guest_id = {g}.0", None),
                 (b, "SELECT count(*) FROM cs_records WHERE guest_id = %s", (f" +{g}",)),
                 (a, f"SELECT count(*) FROM cs_records WHERE guest_id IN ('0{g}')", None)]
    want = bob_count(cluster, f"guest_id = {g}")
    for p, sql, params in spellings:
        assert attempt(p, "bob", sql, params) == want, sql
    err = attempt(b, "bob", "SELECT count(*) FROM cs_records WHERE guest_id = %s", (f"{g}",))
    assert sqlstate(err) == "42501" and "3 times this month" in str(err)
    assert direct(cluster, f"SELECT guest, lookups FROM {schema}.guest_lookups") == [(str(g), 3)]


def test_dml_subqueries_cannot_read_the_target_row_unmasked(pair: tuple[Proxy, Proxy]) -> None:
    a, _ = pair
    with psycopg.connect(a.dsn("pms")) as c:
        for sql in ["UPDATE cs_records SET severity = 'major' WHERE agent = 'pms' RETURNING id, (SELECT phone)",
                    "UPDATE cs_records SET severity = 'major' WHERE (SELECT id_number) LIKE '1101%'"]:
            with pytest.raises(psycopg.Error) as ei:
                c.execute(sql)
            assert ei.value.sqlstate == "42501", sql
            c.rollback()


# ---------------------------------------------------------------------------
# time moved in the state store instead of waited for
# ---------------------------------------------------------------------------


def as_state_owner(cluster: PgCluster, sql: str) -> list[tuple]:
    """SQL on the state schema as its owner (the login pgwarden's state: section names), directly."""
    with psycopg.connect(cluster.dsn(cluster.state_user, cluster.state_password), autocommit=True) as c:
        cur = c.execute(sql)
        return cur.fetchall() if cur.description else []


def test_a_lockout_ends_by_itself_when_its_time_is_up(pair: tuple[Proxy, Proxy], cluster: PgCluster,
                                                       schema: str) -> None:
    a, b = pair
    held = [psycopg.connect(p.dsn("gina"), autocommit=True) for p in (a, b)]  # sessions from before the lockout
    try:
        for _ in range(3):
            assert sqlstate(attempt(a, "gina", "SELECT * FROM guests")) == "42501"
        wait_until(lambda: locked_out(b, "gina"))
        for c in held:
            with pytest.raises(psycopg.Error) as ei:
                c.execute("SELECT 1")
            assert ei.value.sqlstate == "42501" and LOCKED in str(ei.value)
        # The 30 minutes pass: the lockout is moved to end in 5 seconds (room for a loaded machine), and the replicas told to re-read it.
        as_state_owner(cluster, f"UPDATE {schema}.lockouts SET locked_until = now() + interval '5 seconds' "
                                f"WHERE user_name = 'gina'; SELECT pg_notify('{schema}_guards', 'moved')")
        t0 = time.monotonic()
        assert locked_out(a, "gina") and locked_out(b, "gina")  # not over yet
        wait_until(lambda: not locked_out(b, "gina"))
        assert time.monotonic() - t0 > 2.0, "the lockout ended before its time"
        # ... on every replica, for logins and for the sessions that were open, with no unlock from anyone
        assert not locked_out(a, "gina")
        for c in held:
            assert c.execute("SELECT 1").fetchall() == [(1,)]
        # ... and the streak starts again from nothing: one refusal does not lock gina out again
        assert sqlstate(attempt(b, "gina", "SELECT * FROM guests")) == "42501"
        wait_until(lambda: direct(cluster, f"SELECT streak FROM {schema}.refusal_streaks") == [(1,)])
        assert not locked_out(a, "gina")
    finally:
        for c in held:
            c.close()
    assert [e["user"] for e in a.take_events("lockout") + b.take_events("lockout")] == ["gina"]


@pytest.fixture
def day_budget_pair(cluster: PgCluster, schema: str, tmp_path: Path) -> Iterator[tuple[Proxy, Proxy]]:
    """Sales (gina) with a cap of 10 rows per statement, 20 rows per hour and 30 per day."""
    rules = hotel_with(tmp_path, ("  sales:                           # 销售部: consultations, never complaints\n",
                                  "  sales:\n    row_cap: 10\n    row_budget: {hour: 20, day: 30}\n"))
    a, b = replicas(cluster, schema, tmp_path, rules)
    try:
        yield a, b
    finally:
        a.thread.stop()
        b.thread.stop()


def test_the_day_budget_outlasts_the_hour(day_budget_pair: tuple[Proxy, Proxy], cluster: PgCluster,
                                          schema: str) -> None:
    a, b = day_budget_pair
    q = "SELECT id FROM cs_records ORDER BY id LIMIT 5"
    want = direct(cluster, "SELECT id FROM cs_records WHERE category = 'consultation' AND NOT legal_hold "
                           "ORDER BY id LIMIT 5")
    for i, p in enumerate((a, b, a, b)):
        assert attempt(p, "gina", q) == want
        wait_until(lambda: used_rows(cluster, schema, "gina") == 5 * (i + 1))
    err = attempt(a, "gina", q)
    assert sqlstate(err) == "42501" and "gina has 0 rows left of role sales's row budget this hour" in str(err)
    # An hour passes (the usage is moved two hours back): the hour's budget is free, the day's is not.
    as_state_owner(cluster, f"UPDATE {schema}.row_usage SET minute = minute - interval '2 hours'")
    assert attempt(b, "gina", q) == want
    wait_until(lambda: used_rows(cluster, schema, "gina") == 25)
    assert attempt(a, "gina", q) == want  # 5 left of the day: decided again with 5 as its cap
    wait_until(lambda: used_rows(cluster, schema, "gina") == 30)
    err = attempt(b, "gina", "SELECT id FROM cs_records ORDER BY id LIMIT 1")
    assert sqlstate(err) == "42501" and "gina has 0 rows left of role sales's row budget this day" in str(err)
    # A day passes: usage older than a day no longer counts (and is deleted at the next reservation).
    as_state_owner(cluster, f"UPDATE {schema}.row_usage SET minute = minute - interval '1 day'")
    assert attempt(a, "gina", q) == want
    wait_until(lambda: used_rows(cluster, schema, "gina") == 5)
    ev = [e["guard"] for e in a.take_events() + b.take_events() if e.get("guard") and e["outcome"] == "ok"]
    # (used this hour, this day, with the reservation; reserved): the cap of 10, or what was left
    assert sorted((g["rows_hour"], g["rows_day"], g["rows_reserved"]) for g in ev) == sorted(
        [(10, 10, 10), (15, 15, 10), (20, 20, 10), (20, 20, 5), (10, 30, 10), (10, 30, 5), (10, 10, 10)])


def test_concurrent_migrate_applies_each_version_once(cluster: PgCluster, schema: str, tmp_path: Path) -> None:
    """Four `pgwarden migrate` processes on a fresh schema, released at the same moment."""
    from proxy.guards.statestore import latest_version

    cfg = tmp_path / "pgwarden.yaml"
    write_config(cfg, cluster, schema)
    run = [sys.executable, "-m", "proxy.cli", "migrate", "--config", str(cfg)]
    with psycopg.connect(cluster.dsn(cluster.state_user, cluster.state_password), autocommit=True) as gate:
        # Hold the migrations' own lock so all four are waiting for it before any of them starts.
        gate.execute("SELECT pg_advisory_lock(hashtext(%s))", (f"pgwarden-migrate:{schema}",))
        procs = [subprocess.Popen(run, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
        try:
            wait_until(lambda: direct(cluster, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                                               "AND NOT granted") == [(4,)], timeout=60)
            gate.execute("SELECT pg_advisory_unlock(hashtext(%s))", (f"pgwarden-migrate:{schema}",))
            outs = [p.communicate(timeout=60) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
    assert [p.returncode for p in procs] == [0] * 4, outs
    versions = list(range(1, latest_version(schema) + 1))
    assert sorted(out.strip() for out, _ in outs) == sorted(
        [f"state schema {schema}: applied {versions} (version {versions[-1]})"]
        + [f"state schema {schema}: up to date (version {versions[-1]})"] * 3)
    assert direct(cluster, f"SELECT version FROM {schema}.schema_migrations ORDER BY version") == [
        (v,) for v in versions]


# --- an exact lockout (issue 13, item 3) -------------------------------------------------------------


def _streak(cluster: PgCluster, schema: str, user: str) -> int:
    rows = direct(cluster, f"SELECT streak FROM {schema}.refusal_streaks WHERE user_name = '{user}'")
    return rows[0][0] if rows else 0


@pytest.mark.parametrize("attempt_no", [1, 2, 3])
def test_the_statement_right_after_the_third_refusal_does_not_run(pair: tuple[Proxy, Proxy], cluster: PgCluster,
                                                                  attempt_no: int) -> None:
    a, _ = pair
    with psycopg.connect(a.dsn("gina"), autocommit=True) as c:
        for _ in range(3):
            with pytest.raises(psycopg.Error) as ei:
                c.execute("SELECT * FROM guests").fetchall()
            assert ei.value.sqlstate == "42501" and LOCKED not in str(ei.value)
        # at once: no round trip to the store stands between the third refusal and this statement
        with pytest.raises(psycopg.Error) as ei:
            c.execute("SELECT count(*) FROM cs_records").fetchall()
        assert ei.value.sqlstate == "42501" and LOCKED in str(ei.value), str(ei.value)
    events = [e for e in a.take_events() if e.get("statement") == "SELECT count(*) FROM cs_records"]
    assert [(e["outcome"], e["reason"]) for e in events] == [("refused", "locked out")]


async def test_pipelined_statements_after_the_third_refusal_do_not_run(pair: tuple[Proxy, Proxy]) -> None:
    from proxy.wire import codec
    from proxy.wire.codes import B
    from tests.integration.fix_wire import errors, login

    a, _ = pair
    conn = await login(a.port, "gina")
    try:
        a.take_events()
        # five Queries in one write: all are in pgwarden before the server has answered the first
        statements = ["SELECT * FROM guests"] * 3 + ["SELECT count(*) FROM cs_records", "SELECT 1"]
        conn.send(b"".join(codec.query_message(s) for s in statements))
        answers = [await conn.recv_until(B.READY_FOR_QUERY) for _ in statements]
    finally:
        await conn.close()
    got = [[(e.sqlstate, "locked out" in e.message) for e in errors(msgs)] for msgs in answers]
    assert got == [[("42501", False)]] * 3 + [[("42501", True)]] * 2, got
    events = [e for e in a.take_events() if e["event"] == "statement"]
    assert [(e["statement"], e["outcome"], e.get("reason") == "locked out") for e in events] == [
        ("SELECT * FROM guests", "refused", False)] * 3 + [
        ("SELECT count(*) FROM cs_records", "refused", True), ("SELECT 1", "refused", True)], events


def test_a_success_right_after_a_refusal_resets_the_streak(pair: tuple[Proxy, Proxy], cluster: PgCluster,
                                                           schema: str) -> None:
    a, b = pair
    with psycopg.connect(a.dsn("gina"), autocommit=True) as c:
        for _ in range(5):  # refusal, success, refusal, success ...: never three in a row
            with pytest.raises(psycopg.Error):
                c.execute("SELECT * FROM guests").fetchall()
            assert c.execute("SELECT 1").fetchone() == (1,)  # no pause: the reset must not wait for anything
        with pytest.raises(psycopg.Error) as ei:
            c.execute("SELECT * FROM guests").fetchall()
        assert LOCKED not in str(ei.value)
    wait_until(lambda: _streak(cluster, schema, "gina") == 1)  # the store heard them in the same order
    assert not locked_out(a, "gina") and not locked_out(b, "gina")
    assert a.take_events("lockout") == []


def test_refusals_of_two_sessions_on_two_replicas_lock_out_within_one_notify(pair: tuple[Proxy, Proxy],
                                                                              cluster: PgCluster) -> None:
    a, b = pair
    with psycopg.connect(a.dsn("gina"), autocommit=True) as ca, psycopg.connect(b.dsn("gina"), autocommit=True) as cb:
        for c in (ca, cb, ca):
            with pytest.raises(psycopg.Error):
                c.execute("SELECT * FROM guests").fetchall()
        wait_until(lambda: locked_out(b, "gina"), timeout=2)  # the store's lockout, pushed by NOTIFY
        with pytest.raises(psycopg.Error) as ei:
            cb.execute("SELECT 1").fetchall()
        assert LOCKED in str(ei.value)
