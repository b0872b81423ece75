"""``decide()``: the single entry point the proxy and ``pgwarden explain`` share.

Until access rules are configured (the rules model lands with the policy
issue) the engine is a transparent relay: every statement is allowed as sent.
The proxy already calls it for every statement of every Query and Parse, so
rules slot in here without touching the wire layer.
"""

from __future__ import annotations

from typing import Any

from proxy.identity import Principal

from .decision import ALLOW, Decision


class Engine:
    """Holds the loaded rules; ``decide`` is pure and cheap to call per statement."""

    def __init__(self, rules: Any = None) -> None:
        self.rules = rules

    def decide(self, principal: Principal, sql: str, catalog: Any = None, context: Any = None) -> Decision:
        return ALLOW


def decide(principal: Principal, sql: str, catalog: Any = None, context: Any = None, *, engine: Engine | None = None) -> Decision:
    return (engine or Engine()).decide(principal, sql, catalog, context)
