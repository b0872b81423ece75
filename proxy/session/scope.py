"""A ticket or break-glass scope in use by one session (R4.3, R4.5). Sans-IO.

The scope widens the person's grants from the next statement on (it travels in the principal's
attributes, so the engine decides with it); statements prepared under a scope carry its epoch
and stop when the scope changes, ends or is closed on any replica. Checking a ticket with the
state store is the relay's wait (an awaitable the I/O layer runs); this module only keeps the
state and says what the audit log must hear.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from rules.model import SCOPE_ATTRIBUTE
from rules.principal import Principal

__all__ = ["ScopeState", "ScopeVerdict"]


class ScopeVerdict:
    """The state store's answer to SET pgwarden.ticket / emergency: a scope, or why not."""

    __slots__ = ("scope", "message")

    def __init__(self, scope: Any, message: str) -> None:
        self.scope = scope
        self.message = message


class ScopeState:
    """The scope in use, its epoch, and the epochs of statements and portals prepared under one."""

    def __init__(self) -> None:
        self.scope: Any = None  # rules.tickets.Scope
        self.source = ""  # the statement that activated it (re-run after a wait: not again)
        self.epoch = 0  # changes whenever the scope does
        self.statements: dict[bytes, int] = {}  # prepared under a scope -> the epoch it was prepared in
        self.portals: dict[bytes, int] = {}

    def set(self, principal: Principal, scope: Any, source: str, audit_base: dict[str, Any],
            emit: Callable[..., None]) -> Principal:
        """Use ``scope`` (None: stop using one) from the next statement on; the principal to decide with."""
        old = self.scope
        self.scope, self.source = scope, source
        self.epoch += 1  # statements prepared under the old scope stop here
        attrs = {k: v for k, v in principal.attributes.items() if k != SCOPE_ATTRIBUTE}
        if scope is not None:
            attrs[SCOPE_ATTRIBUTE] = scope
        for key in ("ticket", "emergency"):
            audit_base.pop(key, None)
        if scope is not None:
            audit_base["emergency" if scope.emergency else "ticket"] = scope.ticket
            emit("emergency_started" if scope.emergency else "ticket_used", principal,
                 ticket=scope.ticket, expires_at=str(scope.expires_at), tables=list(scope.tables))
        elif old is not None:
            emit("ticket_released", principal, ticket=old.ticket)
        return dataclasses.replace(principal, attributes=attrs)

    def ended(self, closed_tickets: Any) -> bool:
        """Has the scope in use expired or been closed (on any replica)?"""
        scope = self.scope
        if scope is None:
            return False
        expired = scope.expires_at is not None and scope.expires_at <= datetime.now(timezone.utc)
        return expired or (closed_tickets is not None and scope.ticket in closed_tickets)

    def prepared(self, name: bytes) -> None:
        """A statement was prepared (Parse): valid while the scope it was widened by lasts."""
        if self.scope is not None:
            self.statements[name] = self.epoch
        elif self.statements:
            self.statements.pop(name, None)

    def bound(self, portal: bytes, statement: bytes) -> None:
        if self.statements:
            ep = self.statements.get(statement)
            if ep is None:
                self.portals.pop(portal, None)
            else:
                self.portals[portal] = ep

    def stale(self, portal: bytes) -> bool:
        """A portal of a statement prepared under a scope that has changed since."""
        ep = self.portals.get(portal)
        return ep is not None and ep != self.epoch

    def guests(self) -> tuple[str, ...]:
        """Guests the scope names: past the monthly lookup quota."""
        return tuple(self.scope.guests) if self.scope is not None else ()
