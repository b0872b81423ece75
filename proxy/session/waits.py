"""Waiting for an answer the session cannot compute itself (a guard check, a ticket, an analysis).

Envoy's filters are the model: a message that needs an outside answer stops the stream; the
client's later messages are held behind it, in order; when the answer comes, the message is
handled again with it, and the stream resumes. The core raises :class:`Suspend` with the
awaitable; the I/O layer runs it and hands the result back. Each answer belongs to the question
that asked it: the handler takes it only if it is of its own kind (and, for an analysis, of its
own text).
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from rules.decision import Decision

__all__ = ["Suspend", "Analysed"]


class Suspend(Exception):
    """Raised while handling a client message that must wait for ``check`` (an awaitable)."""

    def __init__(self, check: Awaitable[Any]) -> None:
        super().__init__("waiting")
        self.check = check


class Analysed:
    """A worker's decision for the text of the message that waited for it."""

    __slots__ = ("text", "decision")

    def __init__(self, text: str, decision: Decision) -> None:
        self.text = text
        self.decision = decision
