"""Receipts (R5.4): the confirmation slip a person gets for every read of personal data.

A statement that reads a protected table (one the rules give sensitive
columns or a subject key) gets a receipt id. The client receives it as a
NoticeResponse (severity NOTICE, SQLSTATE 00000) just before the statement's
CommandComplete, and the statement's audit event stores the same id, so a
person can quote the slip and security can find the exact event. Drivers
hand notices to a callback or log them (psql prints them); none treat a
NOTICE as an error.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from proxy.wire import codec


def protected_tables(tables: Mapping[str, Any]) -> frozenset[str]:
    """Qualified names of the tables holding personal data: sensitive columns or a subject key."""
    return frozenset(name for name, t in tables.items() if t.sensitive or t.subject_key)


_protected: tuple[Any, frozenset[str]] = (None, frozenset())


def protected_by(rules: Any) -> frozenset[str]:
    """``protected_tables`` of the rules in force, computed once per rules object (a reload makes a new one)."""
    global _protected
    if _protected[0] is not rules:
        _protected = (rules, protected_tables(rules.tables) if rules is not None else frozenset())
    return _protected[1]


def new_receipt() -> str:
    """``R-`` and 16 hex digits: unique across replicas without coordination (64 random bits)."""
    return "R-" + os.urandom(8).hex()


def _short(name: str) -> str:
    return name.removeprefix("public.")


def _columns(qualified: Iterable[str], single_table: bool) -> str:
    """``public.cs_records.phone`` -> ``phone`` when one table was read, else ``cs_records.phone``."""
    out = []
    for q in qualified:
        out.append(q.rsplit(".", 1)[-1] if single_table else _short(q))
    return ", ".join(out)


def receipt_text(receipt: str, rows: int, tables: Iterable[str], masked: Iterable[str] = (),
                 hidden: Iterable[str] = ()) -> str:
    """The slip as the person reads it, e.g.
    ``pgwarden receipt R-7f3a...: 37 rows from cs_records, masked: id_number, phone``."""
    names = sorted({_short(t) for t in tables})
    single = len(names) == 1
    text = f"pgwarden receipt {receipt}: {rows} row{'' if rows == 1 else 's'} from {', '.join(names)}"
    masked, hidden = sorted(masked), sorted(hidden)
    if masked:
        text += f", masked: {_columns(masked, single)}"
    if hidden:
        text += f", hidden: {_columns(hidden, single)}"
    return text


def receipt_notice(text: str) -> bytes:
    """The NoticeResponse carrying the slip."""
    return codec.error_response("00000", text, severity="NOTICE", notice=True)
