"""State that replicas share, kept in PostgreSQL: refusal streaks, lockouts, guest lookups.

Every counter changes in one atomic statement (an upsert, or one call of a function the
migrations create, which takes its row locks in a fixed order), so any number of pgwarden
processes agree without talking to each other. Lockouts are also pushed to every replica
with NOTIFY, so checking one costs no round trip; a replica that loses its listening
connection says it is unhealthy (restricted roles are refused) until it has reconnected
and reloaded them.

The schema belongs to its own login (``state:`` in the config), not to the service account
client sessions run as: no rule, and no unrestricted role, can then read or reset a counter.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any

import asyncpg

_IDENT = re.compile(r"[a-z_][a-z0-9_]{0,62}")


@dataclass(frozen=True)
class StateConfig:
    """Where the state lives (the config's ``state:`` section)."""

    host: str
    port: int
    database: str
    user: str
    password: str | None = None
    schema: str = "pgwarden"
    sslmode: str = "prefer"
    connect_timeout: float = 5.0


class StateUnavailable(Exception):
    """The state store cannot be reached: guarded statements are refused (fail closed)."""


def _migrations(schema: str) -> list[tuple[int, str, str]]:
    s = schema
    return [
        (1, "guards", f"""
CREATE TABLE {s}.refusal_streaks (
    user_name     text PRIMARY KEY,
    streak        integer NOT NULL,
    last_refusal  timestamptz NOT NULL
);
CREATE TABLE {s}.lockouts (
    user_name     text PRIMARY KEY,
    locked_at     timestamptz NOT NULL DEFAULT now(),
    locked_until  timestamptz NOT NULL,
    reason        text NOT NULL
);
-- One row per person, guest and calendar month (R3.4): lookups counted once per statement.
CREATE TABLE {s}.guest_lookups (
    user_name  text NOT NULL,
    guest      text NOT NULL,
    month      date NOT NULL,
    lookups    integer NOT NULL,
    PRIMARY KEY (user_name, guest, month)
);
-- All-or-nothing for the guests of one statement: rows locked in guest order (no deadlock
-- between two statements naming the same guests), then either every count goes up by one
-- or, if one guest is at the limit, none does.
CREATE FUNCTION {s}.take_lookups(p_user text, p_guests text[], p_month date, p_limit integer,
                                 p_exempt text[])
RETURNS TABLE (guest text, lookups integer, allowed boolean)
LANGUAGE plpgsql AS $fn$
DECLARE
    over boolean;
BEGIN
    INSERT INTO {s}.guest_lookups AS g (user_name, guest, month, lookups)
        SELECT p_user, x, p_month, 0 FROM unnest(p_guests) AS x ORDER BY x
        ON CONFLICT DO NOTHING;
    PERFORM 1 FROM {s}.guest_lookups g
        WHERE g.user_name = p_user AND g.month = p_month AND g.guest = ANY (p_guests)
        ORDER BY g.guest FOR UPDATE;
    SELECT coalesce(bool_or(g.lookups >= p_limit AND NOT g.guest = ANY (p_exempt)), false) INTO over
        FROM {s}.guest_lookups g
        WHERE g.user_name = p_user AND g.month = p_month AND g.guest = ANY (p_guests);
    IF over THEN
        RETURN QUERY SELECT g.guest, g.lookups, NOT (g.lookups >= p_limit AND NOT g.guest = ANY (p_exempt))
            FROM {s}.guest_lookups g
            WHERE g.user_name = p_user AND g.month = p_month AND g.guest = ANY (p_guests) ORDER BY g.guest;
        RETURN;
    END IF;
    RETURN QUERY UPDATE {s}.guest_lookups g SET lookups = g.lookups + 1
        WHERE g.user_name = p_user AND g.month = p_month AND g.guest = ANY (p_guests)
        RETURNING g.guest, g.lookups, true;
END
$fn$;
"""),
        (2, "row budgets", f"""
-- Rows returned to each person per minute (R3.3): a statement reserves what it may return
-- before it runs, and gives back what it did not use when it ends, so concurrent sessions
-- of one person can never together pass the hour's or the day's budget.
CREATE TABLE {s}.row_usage (
    user_name  text NOT NULL,
    minute     timestamptz NOT NULL,
    rows       bigint NOT NULL,
    PRIMARY KEY (user_name, minute)
);
CREATE FUNCTION {s}.reserve_rows(p_user text, p_want bigint, p_hour bigint, p_day bigint)
RETURNS TABLE (granted boolean, minute timestamptz, used_hour bigint, used_day bigint)
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    m timestamptz := date_trunc('minute', now());
    h bigint;
    d bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('pgwarden-rows:' || p_user));
    DELETE FROM {s}.row_usage u WHERE u.user_name = p_user AND u.minute < now() - interval '1 day';
    SELECT coalesce(sum(u.rows) FILTER (WHERE u.minute > now() - interval '1 hour'), 0), coalesce(sum(u.rows), 0)
        INTO h, d FROM {s}.row_usage u WHERE u.user_name = p_user;
    IF (p_hour IS NOT NULL AND h + p_want > p_hour) OR (p_day IS NOT NULL AND d + p_want > p_day) THEN
        RETURN QUERY SELECT false, m, h, d;
        RETURN;
    END IF;
    INSERT INTO {s}.row_usage AS u (user_name, minute, rows) VALUES (p_user, m, p_want)
        ON CONFLICT (user_name, minute) DO UPDATE SET rows = u.rows + p_want;
    RETURN QUERY SELECT true, m, h + p_want, d + p_want;
END
$fn$;
"""),
        (3, "tickets", f"""
-- Apply -> approve (two people, never the requester) -> use -> close (R4). Scope is structured.
CREATE SEQUENCE {s}.ticket_numbers;
CREATE TABLE {s}.emergencies (
    id          bigserial PRIMARY KEY,
    user_name   text NOT NULL,
    role        text NOT NULL,
    reason      text NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    ticket      text
);
CREATE TABLE {s}.tickets (
    id                    text PRIMARY KEY,
    requester             text NOT NULL,
    requester_role        text NOT NULL,
    requester_department  text,
    created_at            timestamptz NOT NULL DEFAULT now(),
    tables                text[] NOT NULL,
    guests                text[] NOT NULL DEFAULT '{{}}',
    departments           text[] NOT NULL DEFAULT '{{}}',
    regions               text[] NOT NULL DEFAULT '{{}}',
    time_from             timestamptz,
    time_to               timestamptz,
    legal                 boolean NOT NULL DEFAULT false,
    cross_region          boolean NOT NULL DEFAULT false,
    reason                text NOT NULL,
    hours                 integer NOT NULL CHECK (hours > 0),
    status                text NOT NULL DEFAULT 'pending'
                          CHECK (status IN ('pending', 'approved', 'rejected', 'closed')),
    approved_at           timestamptz,
    expires_at            timestamptz,
    closed_at             timestamptz,
    closed_by             text,
    summary               jsonb,
    emergency             bigint REFERENCES {s}.emergencies
);
CREATE TABLE {s}.ticket_decisions (
    ticket         text NOT NULL REFERENCES {s}.tickets ON DELETE CASCADE,
    approver       text NOT NULL,
    approver_role  text NOT NULL,
    approve        boolean NOT NULL,
    comment        text NOT NULL DEFAULT '',
    at             timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (ticket, approver)
);
"""),
        (4, "audit anchors", f"""
-- Heads of the audit chains (replica, seq, hash), recorded every N events and S seconds and at a clean
-- stop, outside the log files: `pgwarden audit verify` checks each against the files, so a cut tail or a
-- re-chained file is found (docs/audit-integrity.md). Rows are only ever inserted.
CREATE TABLE {s}.audit_anchors (
    replica      text NOT NULL,
    seq          bigint NOT NULL,
    hash         text NOT NULL,
    key_id       text,
    anchored_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (replica, seq, hash)
);
"""),
    ]


#: NOTIFY channel carrying lockout changes to every replica.
def channel(schema: str) -> str:
    return f"{schema}_guards"


class StateStore:
    """asyncpg pool plus one listening connection; counters change in single statements."""

    def __init__(self, config: StateConfig, *, replica: str = "",
                 log: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        if not _IDENT.fullmatch(config.schema):
            raise ValueError(f"state schema {config.schema!r} must be a plain lower-case name")
        self.config = config
        self.schema = config.schema
        self.replica = replica
        self._log = log or (lambda event, fields: None)
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        #: user -> locked until (UTC), as last pushed or loaded; the lockout check reads only this.
        self.lockouts: dict[str, datetime] = {}
        self.lock_reasons: dict[str, str] = {}
        #: recently closed tickets: sessions using one stop at their next statement.
        self.closed_tickets: set[str] = set()
        self._reload_pending = False
        self._reload_again = False
        self._reload_task: asyncio.Task[None] | None = None
        #: users whose refusal streak is not zero (so an allowed statement knows to reset it).
        self.streaking: set[str] = set()
        # Lockouts this replica has counted and the store has not confirmed yet (a reload of the
        # store's tables does not forget them; the store's answer replaces them).
        self.early_lockouts: dict[str, datetime] = {}
        self.healthy = False
        self.problem = "the state store has not been reached yet"
        self._ready = asyncio.Event()

    # --- lifecycle --------------------------------------------------------------------------

    def _connect_kwargs(self) -> dict[str, Any]:
        return {**connect_kwargs(self.config),
                # A counter update waits for no disk flush: a crash of PostgreSQL itself may forget the
                # last few hundred milliseconds of counts, which is far cheaper than an fsync per statement.
                "server_settings": {"application_name": f"pgwarden-state/{self.replica}",
                                    "synchronous_commit": "off"}}

    async def start(self, *, migrate: bool = True, wait: float | None = None) -> None:
        """Begin (re)connecting in the background; with ``wait``, wait that long for the first success."""
        self._task = asyncio.get_running_loop().create_task(self._keep_connected(migrate))
        if wait:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._ready.wait(), wait)

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self._drop()

    async def _drop(self) -> None:
        listener, pool = self._listener, self._pool
        self._listener = self._pool = None
        if listener is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(listener.close(), 2)
        if pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.close(), 2)

    async def _keep_connected(self, migrate: bool) -> None:
        delay = 0.2
        while not self._closing:
            try:
                await self._connect(migrate)
                delay = 0.2
                self._set_health(True, "")
                while not self._closing and self._listener is not None and not self._listener.is_closed():
                    await asyncio.sleep(0.5)
                    # A listener can look open while the server is gone: ask it now and then.
                    await asyncio.wait_for(self._listener.fetchval("SELECT 1"), 5)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure means: not healthy, retry
                self._set_health(False, f"the state store is unreachable ({type(exc).__name__}: {exc})"[:300])
            await self._drop()
            if self._closing:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _set_health(self, ok: bool, problem: str) -> None:
        if ok != self.healthy:
            self._log("state_store_up" if ok else "state_store_down", {"problem": problem} if problem else {})
            if not ok:
                print(f"pgwarden: {problem}", file=sys.stderr, flush=True)
        self.healthy, self.problem = ok, problem
        if ok:
            self._ready.set()

    async def _connect(self, migrate: bool) -> None:
        kw = self._connect_kwargs()
        listener = await asyncpg.connect(**kw)
        try:
            if migrate:
                await apply_migrations(listener, self.schema)
            await listener.add_listener(channel(self.schema), self._on_notify)
            # No reset on release: these connections never change session state, and asyncpg's
            # default reset is one more round trip per counter update.
            pool = await asyncpg.create_pool(min_size=2, max_size=4, reset=_no_reset, **kw)
        except BaseException:
            await listener.close()
            raise
        self._listener, self._pool = listener, pool
        await self._reload()

    async def _reload(self) -> None:
        """Everything pushed by NOTIFY, read afresh (after a reconnect some may have been missed)."""
        assert self._pool is not None
        s = self.schema
        rows = await self._pool.fetch(
            f"SELECT user_name, locked_until, reason FROM {s}.lockouts WHERE locked_until > now()")
        self.lockouts = {r["user_name"]: r["locked_until"] for r in rows}
        self.lock_reasons = {r["user_name"]: r["reason"] for r in rows}
        rows = await self._pool.fetch(f"SELECT user_name FROM {s}.refusal_streaks WHERE streak > 0")
        self.streaking = {r["user_name"] for r in rows}
        rows = await self._pool.fetch(f"SELECT id FROM {s}.tickets WHERE status = 'closed' "
                                      "AND closed_at > now() - interval '7 days'")
        self.closed_tickets = {r["id"] for r in rows}

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, _payload: str) -> None:
        """A hint that something changed: read it back from the tables, never from the payload.

        Any login may NOTIFY on any channel; only what the state schema's owner wrote counts.
        """
        if self._reload_pending or self._pool is None:
            self._reload_again = True
            return
        self._reload_pending = True

        async def reload() -> None:
            try:
                while True:
                    self._reload_again = False
                    await self._reload()
                    if not self._reload_again:
                        return
            except Exception:  # noqa: BLE001 - the keep-alive loop notices a dead store
                pass
            finally:
                self._reload_pending = False

        self._reload_task = asyncio.get_running_loop().create_task(reload())

    def _require(self) -> asyncpg.Pool:
        if self._pool is None or not self.healthy:
            raise StateUnavailable(self.problem or "the state store is unreachable")
        return self._pool

    # --- lockouts (R3.5) -------------------------------------------------------------------

    def current_lockouts(self) -> dict[str, tuple[float, str]]:
        """user -> (locked until, as a POSIX time; why), for the admin console."""
        now = datetime.now(timezone.utc)
        return {u: (t.timestamp(), self.lock_reasons.get(u, "")) for u, t in self.lockouts.items() if t > now}

    def locked_until(self, user: str, now: datetime | None = None) -> datetime | None:
        until = self.lockouts.get(user) or self.early_lockouts.get(user)
        if until is None:
            return None
        if until <= (now or datetime.now(timezone.utc)):
            self.lockouts.pop(user, None)
            self.early_lockouts.pop(user, None)
            return None
        return until

    async def record_refusal(self, user: str, threshold: int, lock_seconds: float, reason: str) -> tuple[int, datetime | None]:
        """One more refused statement in a row; at ``threshold`` the person is locked out everywhere."""
        pool = self._require()
        s = self.schema
        row = await pool.fetchrow(f"""
WITH bump AS (
    INSERT INTO {s}.refusal_streaks AS r (user_name, streak, last_refusal) VALUES ($1, 1, now())
    ON CONFLICT (user_name) DO UPDATE SET streak = r.streak + 1, last_refusal = now()
    RETURNING r.streak
), lock AS (
    INSERT INTO {s}.lockouts AS l (user_name, locked_until, reason)
    SELECT $1, now() + make_interval(secs => $3), $4 FROM bump WHERE bump.streak >= $2
    ON CONFLICT (user_name) DO UPDATE SET locked_at = now(), locked_until = excluded.locked_until,
                                          reason = excluded.reason
    RETURNING l.locked_until
), note AS (
    SELECT pg_notify($5, CASE WHEN (SELECT count(*) FROM lock) > 0
        THEN json_build_object('kind', 'lock', 'user', $1::text, 'reason', $4::text,
                               'until', extract(epoch FROM (SELECT locked_until FROM lock)))::text
        ELSE json_build_object('kind', 'streak', 'user', $1::text, 'streak', (SELECT streak FROM bump))::text END)
)
SELECT (SELECT streak FROM bump) AS streak, (SELECT locked_until FROM lock) AS until, (SELECT count(*) FROM note) AS n
""", user, threshold, float(lock_seconds), reason, channel(s))
        if row["until"] is not None:
            await pool.execute(f"UPDATE {s}.refusal_streaks SET streak = 0 WHERE user_name = $1", user)
            self.lockouts[user] = row["until"]
            self.lock_reasons[user] = reason
            self.streaking.discard(user)
        else:
            self.streaking.add(user)
        return int(row["streak"]), row["until"]

    async def reset_streak(self, user: str) -> None:
        pool = self._require()
        s = self.schema
        await pool.execute(f"""
WITH r AS (UPDATE {s}.refusal_streaks SET streak = 0 WHERE user_name = $1 AND streak > 0 RETURNING 1)
SELECT pg_notify($2, json_build_object('kind', 'streak', 'user', $1::text, 'streak', 0)::text) FROM r
""", user, channel(s))
        self.streaking.discard(user)

    async def lockout_of(self, user: str) -> datetime | None:
        """Ask the store itself (at login: the push may not have arrived yet)."""
        pool = self._require()
        until = await pool.fetchval(
            f"SELECT locked_until FROM {self.schema}.lockouts WHERE user_name = $1 AND locked_until > now()", user)
        if until is not None:
            self.lockouts[user] = until
        return until

    async def unlock(self, user: str) -> bool:
        pool = self._require()
        async with pool.acquire() as conn:
            done = await unlock_on(conn, self.schema, user)
        self.lockouts.pop(user, None)
        self.early_lockouts.pop(user, None)
        return done

    # --- row budgets (R3.3) -----------------------------------------------------------------

    async def reserve_rows(self, user: str, want: int, hour: int | None,
                           day: int | None) -> tuple[bool, datetime, int, int]:
        """(granted, minute, rows used this hour, this day): all ``want`` rows, or none."""
        pool = self._require()
        r = await pool.fetchrow(f"SELECT * FROM {self.schema}.reserve_rows($1, $2, $3, $4)", user, want, hour, day)
        return bool(r["granted"]), r["minute"], int(r["used_hour"]), int(r["used_day"])

    async def give_back(self, user: str, minute: datetime, unused: int) -> None:
        """Return what a statement reserved but did not send."""
        if unused > 0:
            await _unused(self._require(), self.schema, user, minute, unused)

    # --- guest lookups (R3.4) --------------------------------------------------------------

    async def untake_lookups(self, user: str, guests: Sequence[str], month: date | None = None) -> None:
        """Undo one counted lookup of each guest (its statement was refused for another reason)."""
        m = month or datetime.now(timezone.utc).date().replace(day=1)
        await self._require().execute(
            f"UPDATE {self.schema}.guest_lookups SET lookups = greatest(lookups - 1, 0) "
            "WHERE user_name = $1 AND month = $2 AND guest = ANY ($3)", user, m, sorted(set(guests)))

    async def take_lookups(self, user: str, guests: Sequence[str], limit: int, *,
                           exempt: Sequence[str] = (), month: date | None = None) -> list[tuple[str, int, bool]]:
        """Count one lookup of each guest, all or none; returns (guest, lookups, allowed) per guest."""
        pool = self._require()
        m = month or datetime.now(timezone.utc).date().replace(day=1)
        distinct = sorted(set(guests))
        if len(distinct) == 1 and not exempt:
            # The common case, one guest: one upsert that counts only while under the limit.
            s = self.schema
            row = await pool.fetchrow(f"""
                INSERT INTO {s}.guest_lookups AS g (user_name, guest, month, lookups) VALUES ($1, $2, $3, 1)
                ON CONFLICT (user_name, guest, month) DO UPDATE SET lookups = g.lookups + 1
                    WHERE g.lookups < $4
                RETURNING g.lookups""", user, distinct[0], m, limit)
            if row is not None and row["lookups"] <= limit:
                return [(distinct[0], int(row["lookups"]), True)]
            if row is not None:  # a first lookup with a limit below 1 (not allowed by the rules)
                return [(distinct[0], int(row["lookups"]), False)]
            return [(distinct[0], limit, False)]
        rows = await pool.fetch(f"SELECT guest, lookups, allowed FROM {self.schema}.take_lookups($1, $2, $3, $4, $5)",
                                user, distinct, m, limit, list(exempt))
        return [(r["guest"], int(r["lookups"]), bool(r["allowed"])) for r in rows]


async def _no_reset(_conn: asyncpg.Connection) -> None:
    return None


async def _unused(pool: asyncpg.Pool, schema: str, user: str, minute: datetime, unused: int) -> None:
    await pool.execute(f"UPDATE {schema}.row_usage SET rows = greatest(rows - $3, 0) "
                       "WHERE user_name = $1 AND minute = $2", user, minute, unused)


async def unlock_on(conn: asyncpg.Connection, schema: str, user: str) -> bool:
    """Lift a lockout (and its streak) and tell every replica at once; False if there was none."""
    n = await conn.fetchval(f"""
WITH d AS (DELETE FROM {schema}.lockouts WHERE user_name = $1 RETURNING 1),
     r AS (UPDATE {schema}.refusal_streaks SET streak = 0 WHERE user_name = $1 RETURNING 1)
SELECT count(*) FROM d""", user)
    # Always: every replica re-reads the lockouts (whatever it may have been told by others).
    await conn.execute("SELECT pg_notify($1, $2)", channel(schema), json.dumps({"kind": "unlock", "user": user}))
    return bool(n)


def connect_kwargs(c: StateConfig) -> dict[str, Any]:
    """asyncpg's arguments for the state store (the proxy's pool and the command line alike)."""
    ssl: Any = {"disable": False, "prefer": "prefer", "require": "require"}.get(c.sslmode, "prefer")
    return {"host": c.host, "port": c.port, "user": c.user, "password": c.password, "database": c.database,
            "ssl": ssl, "timeout": c.connect_timeout}


async def connect(config: StateConfig) -> asyncpg.Connection:
    """One connection to the state store (for the command line)."""
    return await asyncpg.connect(**connect_kwargs(config))


async def apply_migrations(conn: asyncpg.Connection, schema: str) -> list[int]:
    """Bring the state schema up to date; replicas starting together take turns (advisory lock)."""
    applied: list[int] = []
    lock_key = f"pgwarden-migrate:{schema}"
    await conn.execute("SELECT pg_advisory_lock(hashtext($1))", lock_key)
    try:
        # A DBA may have made the schema for us (deploy/sql/state_role.sql): then no CREATE is needed.
        if not await conn.fetchval("SELECT true FROM pg_namespace WHERE nspname = $1", schema):
            await conn.execute(f"CREATE SCHEMA {schema}")
        await conn.execute(f"""CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
            version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())""")
        done = {r["version"] for r in await conn.fetch(f"SELECT version FROM {schema}.schema_migrations")}
        for version, name, sql in _migrations(schema):
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(f"INSERT INTO {schema}.schema_migrations (version, name) VALUES ($1, $2)",
                                   version, name)
            applied.append(version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", lock_key)
    return applied


def latest_version(schema: str = "pgwarden") -> int:
    return max(v for v, _, _ in _migrations(schema))

