"""Positive, token-level recognition of the small statements sqlglot does not model.

sqlglot turns many utility statements into an opaque ``exp.Command`` or, worse,
into harmless-looking nodes (``DISCARD ALL`` -> a column alias, ``SAVEPOINT a``
-> an alias, ``RELEASE SAVEPOINT a`` -> a parse error). So transaction control,
SET/RESET/SHOW, EXPLAIN, DECLARE/FETCH/CLOSE, PREPARE/EXECUTE/DEALLOCATE are
matched here against strict token patterns, and their SQL is *regenerated from
the validated tokens* (never copied from the client's text). Anything that does
not match a pattern returns None and goes to the sqlglot parser, whose result
is then allow-listed by node type in :mod:`rules.rewrite`.

Pure functions; the only dependency is sqlglot's PostgreSQL tokenizer, the same
one the parser uses, so both always agree on where a token ends.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from sqlglot.tokens import Token, TokenType

from .catalog import normalise_identifier
from .grants import StatementKind
from .settings import SESSION_SETTINGS, setting_problem

__all__ = ["Refused", "Simple", "Wrapped", "recognise", "SAFE_SETTINGS", "ident_sql"]


class Refused(Exception):
    """Raised anywhere in the decision; carries the client-facing message."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or message


@dataclass(frozen=True)
class Simple:
    """A fully recognised statement; ``sql`` is canonical text rebuilt from validated tokens.

    ``node`` is the statement's kind as PostgreSQL's parser names it, ``setting`` the setting a
    SET/RESET changes (as PostgreSQL names it): what :mod:`rules.pgconfirm` compares.
    """

    kind: StatementKind
    sql: str
    node: str = ""
    setting: str | None = None
    #: SET/RESET search_path: the schemas it sets, () for the default (the session follows it)
    search_path: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Wrapped:
    """``prefix`` + a query (EXPLAIN, DECLARE CURSOR, PREPARE); the query's tokens go to the rewriter."""

    kind: StatementKind
    prefix: str
    inner: list[Token]
    node: str = ""
    hold: bool = False  # DECLARE ... WITH HOLD


#: Settings a restricted role may SET/RESET (lower case): the same list as at startup.
SAFE_SETTINGS = SESSION_SETTINGS

_TX_MODE_WORDS = frozenset({"ISOLATION", "LEVEL", "SERIALIZABLE", "REPEATABLE", "READ", "COMMITTED",
                            "UNCOMMITTED", "ONLY", "WRITE", "NOT", "DEFERRABLE"})
_EXPLAIN_OPTIONS = frozenset({"VERBOSE", "COSTS", "SETTINGS", "BUFFERS", "WAL", "TIMING", "SUMMARY",
                              "MEMORY", "FORMAT", "GENERIC_PLAN", "SERIALIZE"})
_EXPLAIN_VALUES = frozenset({"TRUE", "FALSE", "ON", "OFF", "TEXT", "JSON", "XML", "YAML", "NONE", "BINARY"})
_FETCH_WORDS = frozenset({"NEXT", "PRIOR", "FIRST", "LAST", "ABSOLUTE", "RELATIVE", "ALL", "FORWARD",
                          "BACKWARD", "FROM", "IN"})
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*\Z")
_NUMBER = re.compile(r"\d+(\.\d+)?([eE][+-]?\d+)?\Z")
_NOT_WORD_TYPES = frozenset({
    TokenType.STRING, TokenType.IDENTIFIER, TokenType.NUMBER, TokenType.NATIONAL_STRING,
    TokenType.BYTE_STRING, TokenType.HEREDOC_STRING, TokenType.UNICODE_STRING, TokenType.HEX_STRING,
    TokenType.BIT_STRING, TokenType.RAW_STRING,
})


def _word(tok: Token) -> str | None:
    """The upper-cased bare word a keyword/VAR token spells, or None (strings, quoted names, symbols)."""
    if tok.token_type in _NOT_WORD_TYPES or not _WORD.match(tok.text):
        return None
    return tok.text.upper()


def ident_sql(name: str) -> str:
    """Always-quoted identifier: no keyword or case surprises in regenerated text."""
    return '"' + name.replace('"', '""') + '"'


def _name(tok: Token) -> str | None:
    """A single-token name (cursor, savepoint, statement) rendered quoted, folded as PostgreSQL folds it."""
    if tok.token_type == TokenType.IDENTIFIER:
        return ident_sql(normalise_identifier(tok.text, True))
    if _word(tok) is not None:
        return ident_sql(normalise_identifier(tok.text, False))
    return None


class _Cursor:
    """A tiny reader over one statement's tokens."""

    def __init__(self, tokens: Sequence[Token], sql: str) -> None:
        self.toks, self.sql, self.i = list(tokens), sql, 0

    def peek(self, k: int = 0) -> Token | None:
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else None

    def word(self, k: int = 0) -> str | None:
        t = self.peek(k)
        return _word(t) if t is not None else None

    def take(self, *words: str) -> str | None:
        w = self.word()
        if w is not None and w in words:
            self.i += 1
            return w
        return None

    def done(self) -> bool:
        return self.i >= len(self.toks)

    def rest(self) -> list[Token]:
        return self.toks[self.i:]


def recognise(tokens: Sequence[Token], sql: str) -> Simple | Wrapped | None:
    """Match one statement's tokens; Simple/Wrapped if recognised, None to hand over to sqlglot.

    Raises Refused for statements that are understood and never allowed (SET ROLE, DISCARD, ...).
    """
    c = _Cursor(tokens, sql)
    first = c.word()
    if first is None:
        return None
    handler = _HANDLERS.get(first)
    return handler(c) if handler else None


def _tx_modes(c: _Cursor) -> str | None:
    """Transaction modes (ISOLATION LEVEL ..., READ ONLY, [NOT] DEFERRABLE, commas) to the end."""
    out: list[str] = []
    while not c.done():
        t = c.peek()
        assert t is not None
        if t.token_type == TokenType.COMMA and out:
            out[-1] += ","
            c.i += 1
            continue
        w = c.word()
        if w not in _TX_MODE_WORDS:
            return None
        out.append(w)
        c.i += 1
    return " ".join(out)


def _begin(c: _Cursor) -> Simple | None:
    head = c.take("BEGIN", "START")
    if head == "START" and c.take("TRANSACTION") is None:
        return None
    if head == "BEGIN":
        c.take("WORK", "TRANSACTION")
    modes = _tx_modes(c)
    if modes is None:
        return None
    return Simple(StatementKind.TRANSACTION, ("BEGIN " + modes).strip(), node="TransactionStmt")


def _end(c: _Cursor) -> Simple | None:
    head = c.take("COMMIT", "END", "ROLLBACK", "ABORT")
    assert head is not None
    c.take("WORK", "TRANSACTION")
    if head in ("ROLLBACK", "ABORT") and c.take("TO"):
        c.take("SAVEPOINT")
        return _named(c, "ROLLBACK TO SAVEPOINT", StatementKind.TRANSACTION, "TransactionStmt")
    verb = "COMMIT" if head in ("COMMIT", "END") else "ROLLBACK"
    if c.take("AND"):
        no = c.take("NO")
        if c.take("CHAIN") is None or not c.done():
            return None
        return Simple(StatementKind.TRANSACTION, f"{verb} AND {'NO ' if no else ''}CHAIN", node="TransactionStmt")
    return Simple(StatementKind.TRANSACTION, verb, node="TransactionStmt") if c.done() else None


def _named(c: _Cursor, verb: str, kind: StatementKind, node: str) -> Simple | None:
    """``verb name`` with exactly one name token left."""
    t = c.peek()
    if t is None or c.peek(1) is not None:
        return None
    name = _name(t)
    return Simple(kind, f"{verb} {name}", node) if name else None


def _savepoint(c: _Cursor) -> Simple | None:
    c.take("SAVEPOINT")
    return _named(c, "SAVEPOINT", StatementKind.TRANSACTION, "TransactionStmt")


def _release(c: _Cursor) -> Simple | None:
    c.take("RELEASE")
    c.take("SAVEPOINT")
    return _named(c, "RELEASE SAVEPOINT", StatementKind.TRANSACTION, "TransactionStmt")


def _value(c: _Cursor) -> str | None:
    """One SET value: 'plain string', [-]number, bare word, or "quoted name"."""
    t = c.peek()
    if t is None:
        return None
    sign = ""
    if t.token_type in (TokenType.DASH, TokenType.PLUS):
        sign = "-" if t.token_type == TokenType.DASH else ""
        c.i += 1
        t = c.peek()
        if t is None or t.token_type != TokenType.NUMBER:
            return None
    c.i += 1
    if t.token_type == TokenType.STRING:  # plain '...' (E'', $$, U&'' have their own token types)
        return "'" + t.text.replace("'", "''") + "'"
    if t.token_type == TokenType.NUMBER and _NUMBER.match(t.text):
        return sign + t.text
    if t.token_type == TokenType.IDENTIFIER:
        return ident_sql(t.text)
    w = _word(t)
    return w.lower() if w is not None else None


def _values(c: _Cursor) -> str | None:
    out: list[str] = []
    while True:
        v = _value(c)
        if v is None:
            return None
        out.append(v)
        t = c.peek()
        if t is None:
            return ", ".join(out)
        if t.token_type != TokenType.COMMA:
            return None
        c.i += 1


def _setting_refusal(name: str, value: str | None = None) -> Refused:
    return Refused(setting_problem(name, value) or f"pgwarden: changing setting {name} is not allowed; refused")


def _path(c: _Cursor) -> tuple[str, ...] | None:
    """search_path's values to the end: 'a string' and "Quoted" names as written, bare words folded."""
    out: list[str] = []
    while not c.done():
        t = c.peek()
        assert t is not None
        if t.token_type == TokenType.STRING:
            out.append(t.text)
        elif t.token_type == TokenType.IDENTIFIER:
            out.append(normalise_identifier(t.text, True))
        elif _word(t) is not None:
            if t.text.upper() == "DEFAULT" and not out and c.peek(1) is None:
                return ()
            out.append(normalise_identifier(t.text, False))
        else:
            return None
        c.i += 1
        if c.done():
            break
        if c.peek().token_type != TokenType.COMMA:  # type: ignore[union-attr]
            return None
        c.i += 1
    return tuple(out) if out else None


def _set_path(prefix: str, c: _Cursor) -> Simple | None:
    path = _path(c)
    if path is None:
        return None
    value = "DEFAULT" if path == () else ", ".join(ident_sql(s) for s in path)
    return Simple(StatementKind.SET, f"{prefix}search_path TO {value}", "VariableSetStmt", "search_path", path)


def _set(c: _Cursor) -> Simple | None:
    c.take("SET")
    scope = c.take("SESSION", "LOCAL")
    if c.word() == "ROLE" or (scope == "SESSION" and c.word() == "AUTHORIZATION") or c.word() == "AUTHORIZATION":
        raise Refused("pgwarden: SET ROLE / SET SESSION AUTHORIZATION is not allowed; refused")
    if scope == "SESSION" and c.take("CHARACTERISTICS"):
        if c.take("AS") is None or c.take("TRANSACTION") is None:
            return None
        modes = _tx_modes(c)
        return Simple(StatementKind.TRANSACTION, f"SET SESSION CHARACTERISTICS AS TRANSACTION {modes}",
                      "VariableSetStmt", "session characteristics") if modes else None
    if scope is None and c.take("TRANSACTION"):
        modes = _tx_modes(c)
        return Simple(StatementKind.TRANSACTION, f"SET TRANSACTION {modes}", "VariableSetStmt",
                      "transaction") if modes else None
    prefix = f"SET {scope} " if scope else "SET "
    if c.word() == "TIME" and c.word(1) == "ZONE":
        c.i += 2
        v = _value(c)
        return Simple(StatementKind.SET, f"{prefix}TIME ZONE {v}", "VariableSetStmt",
                      "timezone") if v is not None and c.done() else None
    if c.word() == "NAMES":
        raise _setting_refusal("names")
    if c.word() == "SCHEMA":  # SET SCHEMA 'x' is SET search_path TO 'x'
        c.i += 1
        nxt = c.peek()
        if nxt is None or nxt.token_type != TokenType.STRING or c.peek(1) is not None:
            return None
        if scope == "LOCAL":
            raise Refused("pgwarden: SET LOCAL search_path is not allowed (pgwarden follows the session's path); "
                          "use SET search_path outside a transaction block")
        return _set_path(prefix, c)
    t = c.peek()
    if t is None:
        return None
    name = normalise_identifier(t.text, t.token_type == TokenType.IDENTIFIER)
    if t.token_type != TokenType.IDENTIFIER and _word(t) is None:
        return None
    c.i += 1
    nxt = c.peek()
    if nxt is not None and nxt.token_type == TokenType.DOT:
        raise _setting_refusal(name + ".*")
    if name not in SAFE_SETTINGS:
        raise _setting_refusal(name)
    if nxt is not None and nxt.token_type == TokenType.EQ:
        c.i += 1
    elif c.take("TO") is None:
        return None
    if name == "search_path":
        if scope == "LOCAL":
            raise Refused("pgwarden: SET LOCAL search_path is not allowed (pgwarden follows the session's path); "
                          "use SET search_path outside a transaction block")
        return _set_path(prefix, c)
    v = _values(c)
    if v is not None and (why := setting_problem(name, v)) is not None:
        raise Refused(why)
    return Simple(StatementKind.SET, f"{prefix}{name} TO {v}", "VariableSetStmt", name) if v is not None else None


def _reset(c: _Cursor) -> Simple | None:
    c.take("RESET")
    t = c.peek()
    if t is None or c.peek(1) is not None:
        if c.word() == "SESSION":
            raise Refused("pgwarden: RESET SESSION AUTHORIZATION is not allowed; refused")
        return None
    if c.word() == "ALL":
        raise Refused("pgwarden: RESET ALL is not allowed; refused")
    if c.word() == "ROLE":
        raise Refused("pgwarden: RESET ROLE is not allowed; refused")
    name = normalise_identifier(t.text, t.token_type == TokenType.IDENTIFIER)
    if name not in SAFE_SETTINGS:
        raise _setting_refusal(name)
    return Simple(StatementKind.SET, f"RESET {name}", "VariableSetStmt", name,
                  () if name == "search_path" else None)


def _show(c: _Cursor) -> Simple | None:
    c.take("SHOW")
    words: list[str] = []
    while not c.done():
        t = c.peek()
        assert t is not None
        if t.token_type == TokenType.IDENTIFIER:
            words.append(ident_sql(t.text))
        elif _word(t) is not None:
            words.append(t.text.lower())
        else:
            return None
        c.i += 1
    return Simple(StatementKind.SHOW, "SHOW " + " ".join(words), "VariableShowStmt") if 1 <= len(words) <= 4 else None


def _refuse_statement(what: str):  # noqa: ANN202 - small factory
    def handler(c: _Cursor) -> Simple | None:
        raise Refused(f"pgwarden: {what} is not allowed; refused")
    return handler


# VERBOSE prints the policy derived table's output expressions: mask parameters (hash salts) included.
_VERBOSE = "pgwarden: EXPLAIN VERBOSE would show the masks' own parameters; use EXPLAIN without VERBOSE"


def _explain(c: _Cursor) -> Wrapped | None:
    c.take("EXPLAIN")
    opts: list[str] = []
    t = c.peek()
    if t is not None and t.token_type == TokenType.L_PAREN:
        c.i += 1
        while True:
            name = c.word()
            if name in ("ANALYZE", "ANALYSE"):
                raise Refused("pgwarden: EXPLAIN ANALYZE runs the statement; refused")
            if name == "VERBOSE":
                raise Refused(_VERBOSE)
            if name not in _EXPLAIN_OPTIONS:
                return None
            c.i += 1
            val = c.word()
            if val in _EXPLAIN_VALUES:
                opts.append(f"{name} {val}")
                c.i += 1
            else:
                opts.append(name)
            t = c.peek()
            if t is None:
                return None
            c.i += 1
            if t.token_type == TokenType.R_PAREN:
                break
            if t.token_type != TokenType.COMMA:
                return None
    else:
        if c.word() in ("ANALYZE", "ANALYSE"):
            raise Refused("pgwarden: EXPLAIN ANALYZE runs the statement; refused")
        if c.word() == "VERBOSE":
            raise Refused(_VERBOSE)
    if c.done():
        return None
    prefix = "EXPLAIN " + (f"({', '.join(opts)}) " if opts else "")
    return Wrapped(StatementKind.EXPLAIN, prefix, c.rest(), "ExplainStmt")


def _declare(c: _Cursor) -> Wrapped | None:
    c.take("DECLARE")
    t = c.peek()
    name = _name(t) if t is not None else None
    if name is None:
        return None
    c.i += 1
    words: list[str] = []
    for allowed in (("BINARY",), ("ASENSITIVE", "INSENSITIVE"), ("NO",), ("SCROLL",)):
        w = c.take(*allowed)
        if w:
            words.append(w)
    if c.take("CURSOR") is None:
        return None
    words.append("CURSOR")
    hold = c.take("WITH", "WITHOUT")
    if hold:
        if c.take("HOLD") is None:
            return None
        words.append(f"{hold} HOLD")
    if c.take("FOR") is None or c.done():
        return None
    return Wrapped(StatementKind.SELECT, f"DECLARE {name} {' '.join(words)} FOR ", c.rest(), "DeclareCursorStmt",
                   hold=hold == "WITH")


def _fetch(c: _Cursor) -> Simple | None:
    verb = c.take("FETCH", "MOVE")
    parts: list[str] = [str(verb)]
    toks = c.rest()
    if not toks:
        return None
    for t in toks[:-1]:
        w = _word(t)
        if w in _FETCH_WORDS:
            parts.append(w)
        elif t.token_type == TokenType.NUMBER and t.text.isdigit():
            parts.append(t.text)
        elif t.token_type == TokenType.DASH:
            parts.append("-")
        else:
            return None
    name = _name(toks[-1])
    if name is None:
        return None
    text = " ".join(parts).replace("- ", "-") + " " + name
    return Simple(StatementKind.SELECT, text, "FetchStmt")


def _close(c: _Cursor) -> Simple | None:
    c.take("CLOSE")
    if c.word() == "ALL" and c.peek(1) is None:
        return Simple(StatementKind.SELECT, "CLOSE ALL", "ClosePortalStmt")
    return _named(c, "CLOSE", StatementKind.SELECT, "ClosePortalStmt")


def _deallocate(c: _Cursor) -> Simple | None:
    c.take("DEALLOCATE")
    c.take("PREPARE")
    if c.word() == "ALL" and c.peek(1) is None:
        return Simple(StatementKind.SELECT, "DEALLOCATE ALL", "DeallocateStmt")
    return _named(c, "DEALLOCATE", StatementKind.SELECT, "DeallocateStmt")


def _prepare(c: _Cursor) -> Wrapped | None:
    c.take("PREPARE")
    if c.word() == "TRANSACTION":
        raise Refused("pgwarden: PREPARE TRANSACTION is not allowed; refused")
    t = c.peek()
    name = _name(t) if t is not None else None
    if name is None:
        return None
    c.i += 1
    types = ""
    t = c.peek()
    if t is not None and t.token_type == TokenType.L_PAREN:
        c.i += 1
        parts: list[str] = []
        while True:
            t = c.peek()
            if t is None:
                return None
            c.i += 1
            if t.token_type == TokenType.R_PAREN:
                break
            if t.token_type == TokenType.COMMA:
                parts.append(",")
            elif _word(t) is not None:
                parts.append(t.text.lower())
            else:
                return None  # type modifiers, arrays, quoted types: not understood (yet)
        types = " (" + " ".join(parts).replace(" ,", ",") + ")"
    if c.take("AS") is None or c.done():
        return None
    return Wrapped(StatementKind.SELECT, f"PREPARE {name}{types} AS ", c.rest(), "PrepareStmt")


def _execute(c: _Cursor) -> Simple | None:
    c.take("EXECUTE")
    t = c.peek()
    name = _name(t) if t is not None else None
    if name is None:
        return None
    c.i += 1
    if c.done():
        return Simple(StatementKind.SELECT, f"EXECUTE {name}", "ExecuteStmt")
    t = c.peek()
    if t is None or t.token_type != TokenType.L_PAREN or c.toks[-1].token_type != TokenType.R_PAREN:
        return None
    c.i += 1
    c.toks = c.toks[:-1]
    args: list[str] = []
    while not c.done():
        w = c.word()
        if w in ("NULL", "TRUE", "FALSE"):
            args.append(w)
            c.i += 1
        else:
            v = _value(c)
            if v is None or v.startswith('"') or (v[:1].isalpha() or v[:1] == "_"):
                return None  # only literals: no expressions, no subqueries
            args.append(v)
        t = c.peek()
        if t is None:
            break
        if t.token_type != TokenType.COMMA:
            return None
        c.i += 1
    return Simple(StatementKind.SELECT, f"EXECUTE {name} ({', '.join(args)})", "ExecuteStmt")


_HANDLERS = {
    "BEGIN": _begin, "START": _begin,
    "COMMIT": _end, "END": _end, "ROLLBACK": _end, "ABORT": _end,
    "SAVEPOINT": _savepoint, "RELEASE": _release,
    "SET": _set, "RESET": _reset, "SHOW": _show,
    "DISCARD": _refuse_statement("DISCARD"),
    "LISTEN": _refuse_statement("LISTEN"), "NOTIFY": _refuse_statement("NOTIFY"),
    "UNLISTEN": _refuse_statement("UNLISTEN"),
    "EXPLAIN": _explain, "DECLARE": _declare, "FETCH": _fetch, "MOVE": _fetch, "CLOSE": _close,
    "PREPARE": _prepare, "EXECUTE": _execute, "DEALLOCATE": _deallocate,
}
