"""The audit event of one statement (R5.1), and its receipt (R5.4). Pure: facts in, fields out."""

from __future__ import annotations

import time
from typing import Any

from proxy.audit.receipts import new_receipt, receipt_notice, receipt_text
from proxy.session.sqltext import statement_type
from proxy.session.tracking import Run
from proxy.wire.codes import SqlState
from rules.redact import mask_shapes

__all__ = ["statement_fields"]


def statement_fields(run: Run, outcome: str, tag: tuple[str, int | None] | None, rows: int, err: Any,
                     protected: frozenset[str]) -> tuple[dict[str, Any], bytes | None, float]:
    """(event fields, the receipt NOTICE to send before the CommandComplete or None, seconds taken).

    ``tag``: (type, rows) from the statement's CommandComplete, if any; ``protected``: tables
    whose reads get a receipt (personal data).
    """
    dur = (time.perf_counter() - run.start) if run.start else 0.0
    text = run.text
    if tag is not None:
        stype, tag_rows = tag
        if tag_rows is not None and outcome != "suspended":
            rows = tag_rows
    else:
        stype = statement_type(text)
    fields: dict[str, Any] = {
        "statement_type": stype, "statement": text, "outcome": outcome, "rows": rows,
        "duration_ms": round(dur * 1000.0, 3),
    }
    if run.intent:
        fields["start"] = run.intent  # its statement_start (write-ahead)
    if err is not None:
        fields["sqlstate"] = err.sqlstate
        fields["error"] = mask_shapes(err.message)  # PostgreSQL's messages echo literals (R2.4)
    d = run.decision
    slip: bytes | None = None
    if d is not None and d.action == "rewrite":
        fields["decision"] = "rewrite"
        fields["rewritten"] = d.redacted_sql if d.redacted else d.sql
        if d.tables:
            fields["tables"] = list(d.tables)
        if d.masked:
            fields["masked"] = list(d.masked)
        if d.hidden:
            fields["hidden"] = list(d.hidden)
        if stype == "SELECT" and (outcome == "ok" or outcome == "suspended") and (
                d.masked or d.hidden or not protected.isdisjoint(d.tables)):
            fields["receipt"] = rid = new_receipt()
            slip = receipt_notice(receipt_text(rid, rows, d.tables, d.masked, d.hidden))
    if d is not None and d.value_hashes:
        fields["value_hashes"] = list(d.value_hashes)  # keyed hashes of the redacted literals (R2.4)
    if d is not None and d.flags:
        fields["flags"] = list(d.flags)
    if outcome == "refused" and d is not None:
        fields["sqlstate"] = d.sqlstate
        fields["reason"] = d.reason or d.message
    elif outcome == "refused":
        fields["sqlstate"] = SqlState.INSUFFICIENT_PRIVILEGE
    if run.guard is not None:
        fields["guard"] = run.guard
    return fields, slip, dur
