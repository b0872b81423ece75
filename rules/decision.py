"""What the policy engine answers for one statement."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

INSUFFICIENT_PRIVILEGE = "42501"


@dataclass(frozen=True, slots=True)
class Decision:
    """allow as sent, rewrite to ``sql``, or refuse with ``sqlstate``/``message``.

    A value, not a side effect: the proxy acts on it and the audit log records it,
    and ``pgwarden explain`` prints the very same object.
    """

    action: str  # "allow" | "rewrite" | "refuse"
    sql: str | None = None
    sqlstate: str = INSUFFICIENT_PRIVILEGE
    message: str = ""
    reason: str = ""
    tables: tuple[str, ...] = field(default=())
    redacted: str | None = None  # the statement as logged, sensitive literals masked (R2.4)
    redacted_sql: str | None = None  # the rewritten statement as logged, when ``redacted`` is set
    masked: tuple[str, ...] = ()  # table.column masked for this person in this statement
    hidden: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()  # from the role, e.g. internal_audit
    #: Guests this statement looks up (rules.lookups.Lookup), for roles with a lookup quota (R3.4).
    lookups: tuple = ()
    #: What the statement is, as PostgreSQL's parser confirmed it (rules.pgconfirm.Reading): statement
    #: kinds, relations, cursors WITH HOLD. The session acts on these facts, never on the text.
    reading: Any = None
    #: The most records of protected tables one result row may carry (rules.records): the row cap
    #: allows rows x this, and the row budget is charged rows x this for what was sent.
    records_per_row: int = 1
    #: "schema.table.column" of every protected column the statement uses (rules.records.columns_read);
    #: None when that is not followed (writes): then every masked column of its tables is listed.
    columns_read: frozenset[str] | None = None
    #: Keyed hashes (rules.redact.value_hash) of the literals redacted from the logged statement, so
    #: ``pgwarden audit search --value X`` finds who searched for X without X being in the log.
    value_hashes: tuple[str, ...] = ()

    @property
    def refused(self) -> bool:
        return self.action == "refuse"


ALLOW = Decision("allow")


def refuse(message: str, *, reason: str = "", sqlstate: str = INSUFFICIENT_PRIVILEGE) -> Decision:
    return Decision("refuse", sqlstate=sqlstate, message=message, reason=reason or message)
