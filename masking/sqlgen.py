"""SQL for each mask kind, built as sqlglot nodes (never by formatting text into SQL).

Rules every expression here follows, because the masked value is computed
inside the policy's derived table, on rows the user may not otherwise see:

* Every function is ``pg_catalog.f(...)`` and every operator
  ``OPERATOR(pg_catalog.op)`` wrapped in parentheses, so neither a user's
  search_path nor operator precedence can change what runs. The only other
  constructs are SQL syntax that does no name lookup: CAST to ``pg_catalog``
  types, CASE WHEN, GREATEST/LEAST (btree opclass), EXTRACT.
* No expression can raise for any stored value: no casts of data to narrower
  types, guards for infinities and calendar edges, clamps before numeric
  casts back to integer/float. A mask that can fail on some rows would be an
  error oracle about those rows.
* NULL in gives NULL out (except ``constant``, which is constant), and the
  result is cast back to the column's type (without typmod, see pgtypes).

Each builder has a Python twin in :mod:`masking.twins`; the integration tests
check the two agree on a real PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sqlglot import exp

from .pgtypes import DATE, FLOAT, INT, NUMERIC, TEXT, TIMESTAMP, PgType

#: Control character (U+0001) marking digits during free-text redaction (see redact_text).
REDACT_MARK = "\x01"
#: ASCII and full-width digits (Chinese free text uses both), as a regex that PostgreSQL's ARE
#: and Python's re read alike. Written with escapes so the generated SQL is pure ASCII and
#: survives any client_encoding (the proxy requires standard_conforming_strings = on).
DIGIT_CLASS = r"[0-9\uFF10-\uFF19]"
MARK_RE = r"\u0001"

INT_BOUNDS = {
    "int2": (-(2**15), 2**15 - 1),
    "int4": (-(2**31), 2**31 - 1),
    "int8": (-(2**63), 2**63 - 1),
}
#: Bytes of the sha256 digest a hashed integer keeps (its width).
INT_HASH_BYTES = {"int2": 2, "int4": 4, "int8": 8}
#: Largest finite float4/float8, as literals that parse back to exactly that value.
FLOAT_MAX = {"float4": "3.4028235e38", "float8": "1.7976931348623157e308"}
#: Earliest 1 January each type can hold (the minimum is 4714-11-24 BC).
FIRST_JAN1 = {
    "date": "4713-01-01 BC",
    "timestamp": "4713-01-01 00:00:00 BC",
    # a day later, so that truncation in any session time zone stays in range
    "timestamptz": "4713-01-02 00:00:00+00 BC",
}


# -- node helpers ---------------------------------------------------------------


def fn(name: str, *args: exp.Expression) -> exp.Expression:
    """``pg_catalog.name(args)``."""
    return exp.Dot(this=exp.to_identifier("pg_catalog"), expression=exp.Anonymous(this=name, expressions=list(args)))


def op(left: exp.Expression, operator: str, right: exp.Expression) -> exp.Expression:
    """``(left OPERATOR(pg_catalog.op) right)``."""
    return exp.Paren(this=exp.Operator(this=left, operator=f"pg_catalog.{operator}", expression=right))


def lit(value: str) -> exp.Expression:
    return exp.Literal.string(value)


def num(value: int) -> exp.Expression:
    """An integer literal; negatives as unary minus, which PostgreSQL folds into the constant."""
    return exp.Literal.number(value) if value >= 0 else exp.Neg(this=exp.Literal.number(-value))


def cast(e: exp.Expression, to: exp.DataType | str) -> exp.Expression:
    if isinstance(to, str):
        to = PgType("pg_catalog", to, "").node()
    return exp.Cast(this=e, to=to)


def case(whens: list[tuple[exp.Expression, exp.Expression]], default: exp.Expression | None) -> exp.Expression:
    return exp.Case(ifs=[exp.If(this=c, true=v) for c, v in whens], default=default)


def greatest(*args: exp.Expression) -> exp.Expression:
    """GREATEST(...): no name lookup (btree opclass). It skips NULLs, so callers guard NULL input."""
    return exp.Greatest(this=args[0], expressions=list(args[1:]), ignore_nulls=True)


def least(*args: exp.Expression) -> exp.Expression:
    """LEAST(...): as :func:`greatest`."""
    return exp.Least(this=args[0], expressions=list(args[1:]), ignore_nulls=True)


def concat(*parts: exp.Expression) -> exp.Expression:
    """Text concatenation as nested ``pg_catalog.textcat`` (strict: NULL in, NULL out)."""
    out = parts[0]
    for p in parts[1:]:
        out = fn("textcat", out, p)
    return out


def stars(count: exp.Expression) -> exp.Expression:
    """``repeat('*', count)``; a count <= 0 gives ''."""
    return fn("repeat", lit("*"), count)


# -- text kinds ---------------------------------------------------------------
# Each takes the column already cast to text (``s``) and returns a text expression.


def _keep_ends(s: exp.Expression, front: int, back: int, min_len: int) -> exp.Expression:
    """Keep ``front``/``back`` characters when the value has at least ``min_len``; else all '*'."""
    n = fn("length", s.copy())
    kept = concat(
        *([fn("left", s.copy(), num(front))] if front else []),
        stars(op(n.copy(), "-", num(front + back))),
        *([fn("right", s.copy(), num(back))] if back else []),
    )
    return case([(op(n.copy(), ">=", num(min_len)), kept)], stars(n.copy()))


def resident_id(s: exp.Expression, params: Mapping[str, Any]) -> exp.Expression:
    return _keep_ends(s, 3, 4, 15)


def bank_card(s: exp.Expression, params: Mapping[str, Any]) -> exp.Expression:
    return _keep_ends(s, 0, 4, 12)


def mobile(s: exp.Expression, params: Mapping[str, Any]) -> exp.Expression:
    return _keep_ends(s, 3, 4, 11)


def name(s: exp.Expression, params: Mapping[str, Any]) -> exp.Expression:
    return _keep_ends(s, 1, 0, 2)


def email(s: exp.Expression, params: Mapping[str, Any]) -> exp.Expression:
    """First character of the local part (if it has 2+) + '***@' + domain; no '@': all '*'."""
    n = fn("length", s.copy())
    at_from_end = fn("strpos", fn("reverse", s.copy()), lit("@"))  # last '@', counted from the end
    domain = fn("right", s.copy(), op(at_from_end.copy(), "-", num(1)))
    local_len = op(n.copy(), "-", at_from_end.copy())
    return case(
        [
            (op(at_from_end.copy(), "=", num(0)), stars(n.copy())),
            (op(local_len, ">=", num(2)), concat(fn("left", s.copy(), num(1)), lit("***@"), domain.copy())),
        ],
        concat(lit("***@"), domain),
    )


def address(s: exp.Expression, params: Mapping[str, Any]) -> exp.Expression:
    """The first min(6, len/2) characters + '****'; '' stays ''."""
    n = fn("length", s.copy())
    keep = least(num(6), op(n.copy(), "/", num(2)))
    return case([(op(n.copy(), "=", num(0)), lit(""))], concat(fn("left", s.copy(), keep), lit("****")))


def redact_text(s: exp.Expression, params: Mapping[str, Any]) -> exp.Expression:
    """Every run of ``min_digits``+ digits becomes '*' of the same length.

    Linear-time with PostgreSQL's regex engine (its lookbehind is quadratic:
    3 minutes for 500 kB): (1) mark each digit followed by min_digits-1 more,
    (2) the last mark of a run and the min_digits-1 digits after it become
    marks, (3) marks become '*'. The mark is chr(1); one already in the text
    also becomes '*' (and so do the digits right after it).
    """
    k = int(params["min_digits"])
    d = DIGIT_CLASS
    mark = fn("chr", num(ord(REDACT_MARK)))
    step1 = fn("regexp_replace", s, lit(f"{d}(?={d}{{{k - 1}}})"), mark, lit("g"))
    step2 = fn("regexp_replace", step1, lit(f"{MARK_RE}{d}{{{k - 1}}}"), fn("repeat", mark.copy(), num(k)), lit("g"))
    return fn("translate", step2, mark.copy(), lit("*"))


TEXT_BUILDERS: dict[str, Callable[[exp.Expression, Mapping[str, Any]], exp.Expression]] = {
    "resident_id": resident_id,
    "bank_card": bank_card,
    "mobile": mobile,
    "name": name,
    "email": email,
    "address": address,
    "redact_text": redact_text,
}


# -- the other kinds ----------------------------------------------------------


def _digest_hex(salt: str, text: exp.Expression) -> exp.Expression:
    """``encode(sha256(convert_to(salt || text, 'UTF8')), 'hex')``: hashes the UTF-8 bytes."""
    return fn("encode", fn("sha256", fn("convert_to", concat(lit(salt), text), lit("UTF8"))), lit("hex"))


def hash_(column: exp.Expression, t: PgType, params: Mapping[str, Any]) -> exp.Expression:
    """Text: 'h:' + 16 hex of sha256(salt || value). Integers: the digest's first 2/4/8 bytes, signed."""
    salt = str(params["salt"])
    if t.family == TEXT:
        return concat(lit("h:"), fn("left", _digest_hex(salt, cast(column.copy(), "text")), num(16)))
    width = INT_HASH_BYTES[t.name]
    hexpart = fn("left", _digest_hex(salt, cast(column.copy(), "text")), num(2 * max(width, 4)))
    bits = exp.DataType(
        this=exp.DataType.Type.USERDEFINED,
        kind=exp.Dot(this=exp.to_identifier("pg_catalog"), expression=exp.to_identifier("bit")),
        expressions=[exp.DataTypeParam(this=exp.Literal.number(8 * max(width, 4)))],
    )
    # 'x' + hex digits -> bit(n): always exactly n valid bits, so the cast cannot fail
    as_int = cast(cast(concat(lit("x"), hexpart), bits), "int8" if width == 8 else "int4")
    if width == 2:  # the top 16 bits of the int4, sign included: always in int2 range
        as_int = op(as_int, ">>", num(16))
    return as_int


def date_to_year(column: exp.Expression, t: PgType) -> exp.Expression:
    """1 January of the value's year, same type; infinities unchanged; 4714 BC -> 4713-01-01 BC."""
    floor = cast(lit(FIRST_JAN1[t.name]), t.name)
    clamped = greatest(column.copy(), floor)  # inside the isfinite() guard, so never fed NULL
    if t.family == DATE:
        year = cast(exp.Extract(this=exp.var("YEAR"), expression=clamped), "int4")
        truncated = fn("make_date", year, num(1), num(1))
    else:  # timestamp / timestamptz: date_trunc keeps the type (timestamptz in the session's TimeZone)
        truncated = fn("date_trunc", lit("year"), clamped)
    return case([(fn("isfinite", column.copy()), truncated)], column.copy())


def _clamp(e: exp.Expression, low: str, high: str, to: str = "numeric") -> exp.Expression:
    return least(greatest(e, cast(lit(low), to)), cast(lit(high), to))


def round_number(column: exp.Expression, t: PgType, params: Mapping[str, Any]) -> exp.Expression:
    """Round half away from zero to ``digits`` decimals (negative: tens, hundreds...), same type.

    Integers and floats go through numeric (pg_catalog.round(float8, int) does
    not exist); the result is clamped to the type's range before the cast back,
    and float NaN/Infinity are passed through untouched.
    """
    digits = int(params["digits"])
    if t.family == NUMERIC:
        return fn("round", column.copy(), num(digits))
    rounded = fn("round", cast(column.copy(), "numeric"), num(digits))
    if t.family == INT:
        if digits >= 0:
            return cast(rounded, t.name)
        low, high = INT_BOUNDS[t.name]
        # GREATEST skips NULLs: without the guard a NULL would come out as the lower bound
        not_null = exp.Not(this=exp.Is(this=column.copy(), expression=exp.Null()))
        return case([(not_null, cast(_clamp(rounded, str(low), str(high)), t.name))], None)
    assert t.family == FLOAT
    fmax = FLOAT_MAX[t.name]
    # NULL for NULL, false for NaN and +-Infinity: those take the ELSE branch unchanged
    finite = op(fn("abs", column.copy()), "<", cast(lit("Infinity"), t.name))
    return case([(finite, cast(_clamp(rounded, "-" + fmax, fmax), t.name))], column.copy())


__all__ = [
    "DATE", "FLOAT", "INT", "NUMERIC", "TEXT", "TIMESTAMP",
    "TEXT_BUILDERS", "address", "bank_card", "cast", "case", "concat", "date_to_year", "email", "fn",
    "greatest", "hash_", "least", "lit", "mobile", "name", "num", "op", "redact_text", "resident_id", "round_number", "stars",
]
