"""Guards that span statements, sessions and replicas: lockouts (R3.5) and guest lookup quotas (R3.4).

The session asks three things: may this person start a statement at all (a lockout, or a
state store that cannot be reached while the person is restricted: answered from memory,
no round trip), may this statement look up these guests (one call to the state store, only
for statements that look guests up), and, after each statement, whether it was refused
(the refusal streak that trips the circuit breaker, updated without waiting).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from rules.decision import Decision

from .identity import Principal
from .statestore import StateStore, StateUnavailable

#: Reasons of refusals the guards made themselves: they do not extend a refusal streak.
GUARD_REASONS = frozenset({"locked out", "state store unavailable"})


@dataclass(frozen=True)
class LookupVerdict:
    allowed: bool
    message: str = ""
    counts: dict[str, int] | None = None


def _when(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


class Guards:
    """One per server; ``store`` is None when no state store is configured (then nothing is guarded)."""

    def __init__(self, store: StateStore | None, rules: Callable[[], Any],
                 spawn: Callable[[Any], None]) -> None:
        self.store = store
        self._rules = rules  # the current rules (they change on reload)
        self._spawn = spawn

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

    async def check_lookups(self, principal: Principal, role: str, limit: int, guests: Sequence[str],
                            exempt: Sequence[str] = ()) -> LookupVerdict:
        store = self.store
        assert store is not None
        try:
            rows = await store.take_lookups(principal.user, guests, limit, exempt=exempt)
        except StateUnavailable as exc:
            return LookupVerdict(False, f"pgwarden: the guard state store cannot be reached ({exc}); "
                                        "guest lookups are refused until it is back")
        except Exception as exc:  # noqa: BLE001 - fail closed
            return LookupVerdict(False, f"pgwarden: guest lookups cannot be counted ({type(exc).__name__}); refused")
        counts = {g: n for g, n, _ in rows}
        over = sorted(g for g, _, ok in rows if not ok)
        if over:
            return LookupVerdict(False, (
                f"pgwarden: {principal.user} has looked up guest {', '.join(over)} {limit} times this month, the "
                f"limit for role {role}; a further lookup needs an approved ticket"), counts)
        return LookupVerdict(True, "", counts)

    # --- after a statement ----------------------------------------------------------------

    def after(self, principal: Principal, refused: bool, reason: str, emit: Callable[[str, dict[str, Any]], None]) -> None:
        """Keep the refusal streak: N refused in a row lock the person out on every replica."""
        store = self.store
        settings = self._settings()
        if store is None or settings is None or not store.healthy:
            return
        user = principal.user
        if refused:
            if reason in GUARD_REASONS:
                return

            async def bump() -> None:
                try:
                    streak, until = await store.record_refusal(
                        user, settings.lockout_after, settings.lockout_seconds, reason[:200])
                except Exception:  # noqa: BLE001 - best effort: the refusal itself already happened
                    return
                if until is not None:
                    emit("lockout", {"until": until.isoformat(), "streak": streak, "reason": reason[:200]})

            self._spawn(bump())
        elif user in store.streaking:
            store.streaking.discard(user)

            async def reset() -> None:
                try:
                    await store.reset_streak(user)
                except Exception:  # noqa: BLE001 - best effort
                    store.streaking.add(user)

            self._spawn(reset())


def device_refusal(principal: Principal, user_networks: Sequence[Any], role: Any) -> str | None:
    """Designated devices (R3.6): the person's and the role's networks must both admit the client."""
    import ipaddress

    try:
        addr = ipaddress.ip_address(principal.client_addr.split("%")[0]) if principal.client_addr else None
    except ValueError:
        addr = None
    for nets, whose in ((user_networks, f"user {principal.user}"),
                        (getattr(role, "networks", ()), f"role {getattr(role, 'name', '')}")):
        if nets and (addr is None or not any(addr in n for n in nets)):
            allowed = ", ".join(str(n) for n in nets)
            return (f"pgwarden: {whose} may connect only from designated devices ({allowed}), "
                    f"not from {principal.client_addr or 'a local socket'}")
    return None


def decode_param(value: bytes | None, binary: bool) -> str | None:
    """A bound parameter as the text the quota counts (integers in binary are read as such)."""
    if value is None:
        return None
    if not binary:
        text = value.decode("utf-8", "replace")
        return str(int(text)) if text.strip().lstrip("-").isdigit() else text
    if len(value) in (2, 4, 8):
        return str(int.from_bytes(value, "big", signed=True))
    raise ValueError("a binary parameter of a type pgwarden cannot read")

