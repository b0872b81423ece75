"""Guards that span statements, sessions and replicas: lockouts (R3.5) and guest lookup quotas (R3.4).

The session asks three things: may this person start a statement at all (a lockout, or a
state store that cannot be reached while the person is restricted: answered from memory,
no round trip), may this statement look up these guests (one call to the state store, only
for statements that look guests up), and, after each statement, whether it was refused
(the refusal streak that trips the circuit breaker, updated without waiting).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from rules.decision import Decision

from rules.principal import Principal
from proxy.guards.statestore import StateStore, StateUnavailable

#: Reasons of refusals the guards made themselves: they do not extend a refusal streak.
GUARD_REASONS = frozenset({"locked out", "state store unavailable"})


@dataclass(frozen=True)
class Verdict:
    """What the state store said about one statement: go ahead (with what it counted) or not."""

    allowed: bool
    message: str = ""
    counts: dict[str, int] | None = None  # guest -> lookups this month, after this one
    reserved: tuple[datetime, int] | None = None  # (minute, rows) reserved from the row budget
    used: tuple[int, int] | None = None  # rows used this hour, this day (with the reservation)
    left: int = 0  # refused by the row budget: the rows still left (a smaller statement may fit)
    reason: str = ""  # for the audit event: which guard refused

    def audit(self) -> dict[str, Any] | None:
        out: dict[str, Any] = {}
        if self.counts:
            out["lookups"] = self.counts
        if self.used is not None:
            out["rows_hour"], out["rows_day"] = self.used
        if self.reserved is not None:
            out["rows_reserved"] = self.reserved[1]
        return out or None



class _Streak:
    """One person's refusal streak as this replica knows it, between the store's answers."""

    __slots__ = ("local", "issued", "reset_after")

    def __init__(self) -> None:
        self.local = 0  # refusals in a row, this replica's count (the store's, plus what it has not answered)
        self.issued = 0  # refusals reported so far (each store update answers one of them)
        self.reset_after = 0  # refusals up to this one came before the last success


def _when(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


class Guards:
    """One per server; ``store`` is None when no state store is configured (then nothing is guarded)."""

    def __init__(self, store: StateStore | None, rules: Callable[[], Any],
                 spawn: Callable[[Any], None], stats: Any = None) -> None:
        self.store = store
        self._rules = rules  # the current rules (they change on reload)
        self._spawn = spawn
        self.stats = stats  # proxy.metrics.Stats when metrics are on: lockouts are counted there
        self._streaks: dict[str, _Streak] = {}  # person -> refusals in a row as this replica knows them
        self._chains: dict[str, asyncio.Future[Any]] = {}  # person -> the last store update asked for

    def _settings(self) -> Any:
        rules = self._rules()
        return getattr(rules, "guards", None)

    # --- before a statement or a login -------------------------------------------------------

    def block(self, principal: Principal, restricted: bool) -> tuple[str, str] | None:
        """(message, reason) when this person may not run anything now; answered from memory."""
        store = self.store
        if store is None:
            return None
        if restricted and not store.healthy:
            return (f"pgwarden: the guard state store cannot be reached ({store.problem}); statements of "
                    "restricted roles are refused until it is back", "state store unavailable")
        until = store.locked_until(principal.user)
        if until is not None:
            return (f"pgwarden: user {principal.user} is locked out until {_when(until)} after repeated refused "
                    f"statements; ask security to run `pgwarden unlock {principal.user}`", "locked out")
        return None

    async def login_block(self, principal: Principal, restricted: bool) -> str | None:
        """At login the store itself is asked: another replica's lockout may not have been pushed yet."""
        store = self.store
        if store is None:
            return None
        if store.healthy:
            try:
                await store.lockout_of(principal.user)
            except StateUnavailable:
                pass
            except Exception as exc:  # noqa: BLE001 - the store failed mid-call: treat as unreachable
                if restricted:
                    return f"pgwarden: the guard state store cannot be reached ({type(exc).__name__})"
        b = self.block(principal, restricted)
        return b[0] if b else None

    # --- lookups ----------------------------------------------------------------------------

    def wants_lookup_check(self, decision: Decision | None) -> bool:
        return self.store is not None and decision is not None and bool(decision.lookups)

    async def check(self, principal: Principal, grants: Any, guests: Sequence[str], want: int,
                    exempt: Sequence[str] = ()) -> Verdict:
        """Lookups and the row budget for one statement, asked at the same time (one round trip)."""
        role = getattr(grants, "role", "")
        budget = getattr(grants, "row_budget", None)
        jobs: list[Any] = []
        if guests:
            jobs.append(self.check_lookups(principal, role, getattr(grants, "guest_lookups", None) or 0, guests,
                                           exempt, month=self._month()))
        if want and budget:
            jobs.append(self.check_budget(principal, role, want, budget))
        if not jobs:
            return Verdict(True)
        results = [await jobs[0]] if len(jobs) == 1 else await asyncio.gather(*jobs)  # no task for one job
        lookups = results[0] if guests else None
        rows = results[-1] if want and budget else None
        store = self.store
        assert store is not None
        if lookups is not None and rows is not None and lookups.allowed != rows.allowed:
            # All or nothing: undo the half that went through.
            try:
                if lookups.allowed:
                    await store.untake_lookups(principal.user, guests, self._month())
                elif rows.reserved is not None:
                    await store.give_back(principal.user, rows.reserved[0], rows.reserved[1])
            except Exception:  # noqa: BLE001 - the statement is refused either way
                pass
        refused = next((v for v in results if not v.allowed), None)
        counts = lookups.counts if lookups is not None else None
        used = rows.used if rows is not None else None
        if refused is not None:
            return Verdict(False, refused.message, counts, None, used, left=refused.left, reason=refused.reason)
        return Verdict(True, "", counts, rows.reserved if rows is not None else None, used)

    async def check_budget(self, principal: Principal, role: str, want: int,
                           budget: tuple[int | None, int | None]) -> Verdict:
        store = self.store
        assert store is not None
        hour, day = budget
        try:
            granted, minute, used_h, used_d = await store.reserve_rows(principal.user, want, hour, day)
        except StateUnavailable as exc:
            return Verdict(False, f"pgwarden: the guard state store cannot be reached ({exc}); row budgets cannot "
                                  "be kept, so reads of protected tables are refused until it is back")
        except Exception as exc:  # noqa: BLE001 - fail closed
            return Verdict(False, f"pgwarden: the row budget cannot be checked ({type(exc).__name__}); refused")
        if not granted:
            left = min(x for x in ((hour - used_h) if hour else None, (day - used_d) if day else None)
                       if x is not None)
            per = "hour" if hour and hour - used_h == left else "day"
            return Verdict(False, (
                f"pgwarden: {principal.user} has {max(left, 0)} rows left of role {role}'s row budget this {per}, "
                f"and this statement may return up to {want}; wait, narrow it (LIMIT), or ask for a ticket"),
                used=(used_h, used_d), left=max(left, 0), reason="row budget (R3.3)")
        return Verdict(True, reserved=(minute, want), used=(used_h, used_d))

    def give_back(self, principal: Principal, reserved: tuple[datetime, int], sent: int) -> None:
        """After the statement: return the reserved rows it did not send (without waiting)."""
        store = self.store
        unused = reserved[1] - max(sent, 0)
        if store is None or unused <= 0:
            return

        async def run() -> None:
            try:
                await store.give_back(principal.user, reserved[0], unused)
            except Exception:  # noqa: BLE001 - the reservation stays counted: the safe side
                pass

        self._spawn(run())

    def _month(self) -> Any:
        """The calendar month of the quota, in the rules' time zone (a hotel's month, not UTC's)."""
        from zoneinfo import ZoneInfo

        tz = getattr(self._rules(), "timezone", "UTC") or "UTC"
        return datetime.now(ZoneInfo(tz)).date().replace(day=1)

    async def check_lookups(self, principal: Principal, role: str, limit: int, guests: Sequence[str],
                            exempt: Sequence[str] = (), month: Any = None) -> Verdict:
        store = self.store
        assert store is not None
        try:
            rows = await store.take_lookups(principal.user, guests, limit, exempt=exempt, month=month)
        except StateUnavailable as exc:
            return Verdict(False, f"pgwarden: the guard state store cannot be reached ({exc}); "
                                        "guest lookups are refused until it is back")
        except Exception as exc:  # noqa: BLE001 - fail closed
            return Verdict(False, f"pgwarden: guest lookups cannot be counted ({type(exc).__name__}); refused")
        counts = {g: n for g, n, _ in rows}
        over = sorted(g for g, _, ok in rows if not ok)
        if over:
            return Verdict(False, (
                f"pgwarden: {principal.user} has looked up guest {', '.join(over)} {limit} times this month, the "
                f"limit for role {role}; a further lookup needs an approved ticket"), counts,
                reason="guest lookup quota (R3.4)")
        return Verdict(True, "", counts)

    # --- after a statement ----------------------------------------------------------------

    def after(self, principal: Principal, refused: bool, reason: str, emit: Callable[[str, dict[str, Any]], None]) -> None:
        """Keep the refusal streak: N refused in a row lock the person out on every replica.

        Exact, both ways (R3.5). This replica counts at once, in the order the sessions report
        statements (each session reports in statement order): the refusal that makes N locks the
        person out here before the next statement is decided, and a success right after a refusal
        resets the streak. The store, which counts every replica's statements, hears the same
        updates in the same order (one chain per person) and has the last word: its lockout reaches
        the other replicas by NOTIFY, and where it counted less (a success elsewhere) the early
        lockout here is lifted.
        """
        store = self.store
        settings = self._settings()
        if store is None or settings is None or not store.healthy:
            return
        user = principal.user
        mine = self._streaks.setdefault(user, _Streak())
        if refused:
            if reason in GUARD_REASONS:
                return
            mine.issued += 1
            mine.local += 1
            token = mine.issued
            early = None
            if mine.local >= settings.lockout_after and store.locked_until(user) is None:
                early = datetime.now(timezone.utc) + timedelta(seconds=settings.lockout_seconds)
                store.early_lockouts[user] = early  # refused from the very next statement on, on this replica
                store.lock_reasons[user] = reason[:200]

            async def bump() -> None:
                try:
                    streak, until = await store.record_refusal(
                        user, settings.lockout_after, settings.lockout_seconds, reason[:200])
                except Exception:  # noqa: BLE001 - the refusal itself already happened; an early lock stays
                    return
                if early is not None:
                    store.early_lockouts.pop(user, None)  # the store's answer has the last word
                if until is not None:
                    mine.local, mine.reset_after = 0, mine.issued
                    if self.stats is not None:
                        self.stats.lockouts += 1
                    emit("lockout", {"until": until.isoformat(), "streak": streak, "reason": reason[:200]})
                elif token > mine.reset_after:
                    # The store's count (every replica's) as of this refusal, and this replica's since.
                    mine.local = streak + (mine.issued - token)

            self._in_order(user, bump)
        elif mine.local or user in store.streaking:
            mine.local, mine.reset_after = 0, mine.issued
            store.streaking.discard(user)

            async def reset() -> None:
                try:
                    await store.reset_streak(user)
                except Exception:  # noqa: BLE001 - best effort
                    store.streaking.add(user)

            self._in_order(user, reset)

    def _in_order(self, user: str, step: Callable[[], Any]) -> None:
        """Run the store updates of one person one after the other, in the order they were asked for."""
        before = self._chains.get(user)

        async def run() -> None:
            if before is not None:
                with contextlib.suppress(BaseException):
                    await before
            await step()

        task = self._spawn(run())
        self._chains[user] = task
        task.add_done_callback(lambda t: self._chains.pop(user, None) if self._chains.get(user) is t else None)


def device_refusal(principal: Principal, user_networks: Sequence[Any], role: Any) -> str | None:
    """Designated devices (R3.6): the person's and the role's networks must both admit the client."""
    import ipaddress

    try:
        addr = ipaddress.ip_address(principal.client_addr.split("%")[0]) if principal.client_addr else None
    except ValueError:
        addr = None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # a dual-stack listener shows IPv4 clients as ::ffff:a.b.c.d
    for nets, whose in ((user_networks, f"user {principal.user}"),
                        (getattr(role, "networks", ()), f"role {getattr(role, 'name', '')}")):
        if nets and (addr is None or not any(addr in n for n in nets)):
            allowed = ", ".join(str(n) for n in nets)
            return (f"pgwarden: {whose} may connect only from designated devices ({allowed}), "
                    f"not from {principal.client_addr or 'a local socket'}")
    return None


_FETCH = re.compile(
    r"\s*FETCH\s+(?:(NEXT|PRIOR|FIRST|LAST)|(ABSOLUTE|RELATIVE)\s+[+-]?\d+|(FORWARD|BACKWARD)?\s*(ALL|[+-]?\d+)?)?"
    r"\s*(?:FROM|IN)?\s*(\"(?:[^\"]|\"\")+\"|[A-Za-z_][A-Za-z0-9_$]*)\s*;?\s*", re.IGNORECASE)


def skip_comments(sql: str) -> str:
    """The text after leading whitespace and comments, read as PostgreSQL reads them (/* */ nest)."""
    from proxy.session.sqltext import skip_space_and_comments

    return sql[skip_space_and_comments(sql, 0, parens=False):]


def cursor_name(raw: str) -> str:
    return raw[1:-1].replace('""', '"') if raw.startswith('"') else raw.lower()


def declared_cursor(sql: str) -> str | None:
    """The name a DECLARE gives its cursor, normalised as PostgreSQL does."""
    from rules.lookups import DECLARE_NAME

    m = DECLARE_NAME.match(sql)
    return cursor_name(m.group(1)) if m else None


def fetch_rows(sql: str, cap: int) -> tuple[str, int] | None:
    """(cursor, most rows this FETCH can return), or None if it is not a FETCH pgwarden can read.

    FETCH ALL (and FORWARD ALL) can return the whole cursor, which the row cap bounds.
    """
    m = _FETCH.fullmatch(sql)
    if m is None:
        return None
    single, absolute, _direction, count, name = m.groups()
    if single or absolute:
        n = 1
    elif count is None:
        n = 1
    elif count.upper() == "ALL":
        n = cap
    else:
        n = min(abs(int(count)), cap)
    return cursor_name(name), n


#: Binary parameter types pgwarden reads (OID -> struct format); anything else in binary is refused.
_BINARY = {20: ">q", 21: ">h", 23: ">i", 700: ">f", 701: ">d"}


def decode_param(value: bytes | None, binary: bool, type_oid: int = 0) -> str | None:
    """A bound parameter as text, to be read as a guest key (canonical_key does the rest).

    A binary value is read only by its declared type: the same eight bytes are a different
    number as int8 and as float8.
    """
    import struct

    if value is None:
        return None
    if not binary:
        return value.decode("utf-8", "replace")
    fmt = _BINARY.get(type_oid)
    if fmt is None or struct.calcsize(fmt) != len(value):
        raise ValueError("a binary parameter of a type pgwarden cannot read")
    (n,) = struct.unpack(fmt, value)
    return repr(n) if isinstance(n, float) else str(n)
