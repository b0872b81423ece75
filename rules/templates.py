"""Decisions reused across statements that differ only in their literals.

Clients of the simple protocol (psql, legacy PMS, many BI tools) put values
in the text, so an exact-text cache rarely hits and every statement would be
parsed and rewritten again (milliseconds each). Here a statement's *shape* is
its token stream from the same tokenizer the rewriter uses, with plain integer,
decimal and string literals replaced by their class. The first time a shape is
seen it is decided twice: as sent, and with every literal replaced by a unique
sentinel of the same class. The sentinel decision becomes the shape's template
only if putting the original literals back into it gives exactly the decision
made on the statement as sent; otherwise the shape is never templated. Later
statements of the shape get the template with their own literals put in, in
one pass, from the literals' source text (never re-quoted or re-generated).

Only literal classes whose values the rewriter cannot tell apart are
templated (a small integer stays an int4, a large one an int8); anything else
(E'' strings, dollar quotes, hex, Unicode escapes, numbers with exponents or
underscores) stays part of the shape verbatim.

One meaning: a template stands for sqlglot's reading of a shape, and was
confirmed against PostgreSQL's reading of its sentinel text. The shape is the
exact text outside the templated literals (whitespace and comments included),
and a statement takes the template only if PostgreSQL, too, reads its literals
as constants at those very places (``pgparse.normalize`` of the statement
equals that of the sentinel text). So a comment or quote that PostgreSQL reads
differently never borrows a decision made for another text.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from sqlglot.dialects.postgres import Postgres
from sqlglot.errors import SqlglotError
from sqlglot.tokens import TokenType

from .decision import Decision
from .pgconfirm import normalize

_TOKENIZER = Postgres().tokenizer_class()
_INT = re.compile(r"[0-9]+")
_DEC = re.compile(r"[0-9]+\.[0-9]+")
_INT4_MAX = 2_147_483_647
_INT8_MAX = 9_223_372_036_854_775_807
MAX_SHAPES = 20_000

Literal = tuple[int, int, str, str]  # start, end (exclusive), source text, class


def literal_class(kind: TokenType, text: str, source: str, start: int) -> str | None:
    """The class of a literal the rewriter treats alike whatever its value, or None (keep verbatim)."""
    if kind == TokenType.NUMBER:
        if _INT.fullmatch(text):
            v = int(text)
            return "i4" if v <= _INT4_MAX else "i8" if v <= _INT8_MAX else None
        return "dec" if _DEC.fullmatch(text) else None
    if kind == TokenType.STRING:
        raw = source[start:]
        if not raw.startswith("'") or "\\" in text:
            return None
        before = source[start - 1] if start > 0 else " "
        if before.isalnum() or before in "_$&'":
            return None  # a prefixed or adjacent literal
        return "str"
    return None


def shape_of(sql: str) -> tuple[str, list[Literal]] | None:
    """(shape key: the text with each templated literal replaced by its class, the literals),
    or None when the text does not tokenize."""
    try:
        tokens = _TOKENIZER.tokenize(sql)
    except (SqlglotError, ValueError, IndexError):
        return None
    literals: list[Literal] = []
    for t in tokens:
        cls = literal_class(t.token_type, t.text, sql, t.start) if t.token_type in (
            TokenType.NUMBER, TokenType.STRING) else None
        if cls is not None:
            literals.append((t.start, t.end + 1, sql[t.start:t.end + 1], cls))
    return _splice(sql, literals, [f"\x00{cls}\x00" for *_, cls in literals]), literals


def _sentinel(i: int, cls: str, salt: str) -> str:
    if cls == "i4":
        return str(2_000_000_000 + i)
    if cls == "i8":
        return str(9_000_000_000_000_000_000 + i)
    if cls == "dec":
        return f"{900_000_000 + i}.25"
    return f"'pgw{salt}x{i}'"


def _splice(sql: str, literals: list[Literal], texts: list[str]) -> str:
    out, pos = [], 0
    for (start, end, _, _), text in zip(literals, texts):
        out.append(sql[pos:start])
        out.append(text)
        pos = end
    out.append(sql[pos:])
    return "".join(out)


class Template:
    """A decision for one shape with sentinel literals, and how to put real ones in.

    ``pg_normal``: PostgreSQL's normalised sentinel text, which a statement's must equal to use it.
    """

    def __init__(self, decision: Decision, sentinels: list[str], pg_normal: str | None) -> None:
        self.decision = decision
        self.sentinels = sentinels
        self.pg_normal = pg_normal
        self._pattern = re.compile("|".join(re.escape(s) for s in sorted(sentinels, key=len, reverse=True)))

    def fill(self, texts: list[str]) -> Decision:
        d = self.decision
        if not d.sql:
            return d
        table = dict(zip(self.sentinels, texts))
        return replace(d, sql=self._pattern.sub(lambda m: table[m.group(0)], d.sql))


class TemplateCache:
    """Shape -> Template (or None: this shape is decided afresh every time)."""

    def __init__(self) -> None:
        self._shapes: dict[tuple[Any, ...], Template | None] = {}

    def decide(self, sql: str, context_key: tuple[Any, ...], full: Callable[[str], Decision]) -> Decision:
        shaped = shape_of(sql)
        if shaped is None or not shaped[1]:
            return full(sql)
        shape, literals = shaped
        key = (shape, *context_key)
        if key in self._shapes:
            tmpl = self._shapes[key]
            if tmpl is not None and tmpl.pg_normal is not None and normalize(sql) == tmpl.pg_normal:
                return tmpl.fill([text for _, _, text, _ in literals])
            return full(sql)
        d = full(sql)
        self._remember(key, sql, literals, d, full)
        return d

    def _remember(self, key: tuple[Any, ...], sql: str, literals: list[Literal], d: Decision,
                  full: Callable[[str], Decision]) -> None:
        if len(self._shapes) >= MAX_SHAPES:
            self._shapes.clear()
        salt = secrets.token_hex(4)
        sentinels = [_sentinel(i, cls, salt) for i, (_, _, _, cls) in enumerate(literals)]
        sentinel_text = _splice(sql, literals, sentinels)
        ds = full(sentinel_text)
        pg_normal = normalize(sentinel_text)
        tmpl = Template(ds, sentinels, pg_normal)
        # A decision whose logged text is redacted depends on the literals themselves: never templated.
        same = (d.redacted is None and ds.redacted is None
                and ds.action == d.action and ds.message == d.message and ds.sqlstate == d.sqlstate
                and ds.tables == d.tables and tmpl.fill([t for _, _, t, _ in literals]).sql == d.sql
                and (ds.sql is None or all(s in ds.sql for s in sentinels))
                and pg_normal is not None and normalize(sql) == pg_normal)
        self._shapes[key] = tmpl if same else None
