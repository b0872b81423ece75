"""Mask kinds: parsed from the YAML rules, turned into SQL, and computed in Python.

The rewriter replaces each protected table with a derived table whose columns
are ``mask_sql(spec, column, pg_type)``; the rules checker asks ``can_mask``
(or catches :class:`MaskTypeError`) to refuse a mask on a type it cannot mask;
the audit log uses ``mask_value`` to redact literals compared with masked
columns. SQL and Python agree value for value (tests/integration/test_masking_pg.py).

Masking rules (REQUIREMENTS R2.1), all by characters (code points), NULL -> NULL:

==============  =============================================================
resident_id     first 3 + '*'... + last 4 when >= 15 chars (15/18-char IDs),
                otherwise every character '*'
bank_card       '*'... + last 4 when >= 12 chars, otherwise all '*'
mobile          first 3 + '*'... + last 4 when >= 11 chars, otherwise all '*'
name            first character + '*' per other character; 1 char -> '*'
email           first char of the local part (only if it has >= 2) + '***@' +
                domain (after the last '@'); no '@' -> all '*'
address         first min(6, len // 2) characters + '****'; '' -> ''
redact_text     runs of >= min_digits (default 6) ASCII or full-width digits
                -> '*' of the same length
hash            text: 'h:' + first 16 hex of sha256(salt || value);
                integers: the digest's first 2/4/8 bytes as a signed integer
constant        the constant, cast to the column type (for NULL rows too)
null            NULL of the column type
date_to_year    1 January (00:00) of the value's year, same type
round_number    round half away from zero to ``digits`` (may be negative)
==============  =============================================================

The thresholds never reveal more than the rule's visible parts of a well-formed
value, and never most of a short one: a 5-character "ID" is '*****'.
"""

from __future__ import annotations

import datetime as dt
import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from types import MappingProxyType
from typing import Any

from sqlglot import exp

from . import sqlgen, twins
from .pgtypes import DATE, FLOAT, INT, NUMERIC, OTHER, TEXT, TIMESTAMP, MaskTypeError, PgType, parse_pg_type

__all__ = ["MaskKind", "MaskSpec", "MaskTypeError", "can_mask", "mask_sql", "mask_value", "parse_mask"]


class MaskKind(enum.Enum):
    """What a mask does; the value is the name used in the YAML rules."""

    RESIDENT_ID = "resident_id"
    BANK_CARD = "bank_card"
    MOBILE = "mobile"
    NAME = "name"
    EMAIL = "email"
    ADDRESS = "address"
    REDACT_TEXT = "redact_text"
    HASH = "hash"
    CONSTANT = "constant"
    NULL = "null"
    DATE_TO_YEAR = "date_to_year"
    ROUND_NUMBER = "round_number"


TEXT_KINDS = frozenset({
    MaskKind.RESIDENT_ID, MaskKind.BANK_CARD, MaskKind.MOBILE, MaskKind.NAME,
    MaskKind.EMAIL, MaskKind.ADDRESS, MaskKind.REDACT_TEXT,
})

#: Type families each kind can mask (arrays and non-built-in types are "other").
_FAMILIES: dict[MaskKind, frozenset[str]] = {
    **{k: frozenset({TEXT}) for k in TEXT_KINDS},
    MaskKind.HASH: frozenset({TEXT, INT}),
    MaskKind.CONSTANT: frozenset({TEXT, INT, NUMERIC, FLOAT, DATE, TIMESTAMP, OTHER}),
    MaskKind.NULL: frozenset({TEXT, INT, NUMERIC, FLOAT, DATE, TIMESTAMP, OTHER}),
    MaskKind.DATE_TO_YEAR: frozenset({DATE, TIMESTAMP}),
    MaskKind.ROUND_NUMBER: frozenset({INT, NUMERIC, FLOAT}),
}

_ALIASES = {"round": MaskKind.ROUND_NUMBER}
MIN_SALT_LEN = 8
DIGITS_RANGE = (-30, 30)
MIN_DIGITS_RANGE = (4, 32)


# -- specs and their parameters -----------------------------------------------


def _int_param(kind: MaskKind, key: str, value: Any, bounds: tuple[int, int]) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"mask {kind.value}: {key} must be an integer, got {value!r}")
    if not bounds[0] <= value <= bounds[1]:
        raise ValueError(f"mask {kind.value}: {key} must be between {bounds[0]} and {bounds[1]}, got {value}")
    return value


def _normalise_params(kind: MaskKind, params: Mapping[str, Any]) -> dict[str, Any]:
    """Check a kind's parameters; returns them complete (defaults filled in)."""
    allowed = {
        MaskKind.HASH: {"salt"},
        MaskKind.CONSTANT: {"value"},
        MaskKind.ROUND_NUMBER: {"digits"},
        MaskKind.REDACT_TEXT: {"min_digits"},
    }.get(kind, set())
    unknown = set(params) - allowed
    if unknown:
        expected = ", ".join(sorted(allowed)) if allowed else "no parameters"
        raise ValueError(f"mask {kind.value}: unknown parameter(s) {', '.join(sorted(map(str, unknown)))} "
                         f"(expected {expected})")
    out: dict[str, Any] = {}
    if kind is MaskKind.HASH:
        salt = params.get("salt")
        if not isinstance(salt, str) or len(salt) < MIN_SALT_LEN:
            raise ValueError(f"mask hash: salt must be a secret string of at least {MIN_SALT_LEN} characters "
                             "(a short or known salt lets anyone recompute the hashes of guessed values)")
        out["salt"] = salt
    elif kind is MaskKind.CONSTANT:
        if "value" not in params:
            raise ValueError("mask constant: needs a value, e.g. {constant: '***'}")
        value = params["value"]
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (int, Decimal)) or (isinstance(value, float) and math.isfinite(value)):
            value = str(value)
        if not isinstance(value, str):
            raise ValueError(f"mask constant: value must be a string or a number, got {value!r}")
        if "\x00" in value:
            raise ValueError("mask constant: value may not contain NUL characters")
        out["value"] = value
    elif kind is MaskKind.ROUND_NUMBER:
        if "digits" not in params:
            raise ValueError("mask round_number: needs digits, e.g. {round: 2} or {round: -2} (hundreds)")
        out["digits"] = _int_param(kind, "digits", params["digits"], DIGITS_RANGE)
    elif kind is MaskKind.REDACT_TEXT:
        out["min_digits"] = _int_param(kind, "min_digits", params.get("min_digits", 6), MIN_DIGITS_RANGE)
    return out


@dataclass(frozen=True)
class MaskSpec:
    """A validated mask: its kind and complete parameters (read-only).

    ``params``: hash ``{"salt": str}``, constant ``{"value": str}``,
    round_number ``{"digits": int}``, redact_text ``{"min_digits": int}``,
    nothing for the others. Constructing one validates it; the salt is kept
    out of ``repr`` so a spec can be logged.
    """

    kind: MaskKind
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.kind, MaskKind):
            raise ValueError(f"not a mask kind: {self.kind!r}")
        if not isinstance(self.params, Mapping):
            raise ValueError(f"mask {self.kind.value}: parameters must be a mapping, got {self.params!r}")
        object.__setattr__(self, "params", MappingProxyType(_normalise_params(self.kind, self.params)))

    def __hash__(self) -> int:
        return hash((self.kind, tuple(sorted(self.params.items()))))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MaskSpec):
            return NotImplemented
        return self.kind is other.kind and dict(self.params) == dict(other.params)

    def __repr__(self) -> str:
        shown = {k: ("<secret>" if k == "salt" else v) for k, v in self.params.items()}
        return f"MaskSpec({self.kind.value}, {shown})" if shown else f"MaskSpec({self.kind.value})"


def _kind(name: Any) -> MaskKind:
    if isinstance(name, str):
        key = name.strip().lower()
        if key in _ALIASES:
            return _ALIASES[key]
        for k in MaskKind:
            if k.value == key:
                return k
    names = ", ".join(k.value for k in MaskKind)
    raise ValueError(f"unknown mask kind {name!r} (expected one of: {names}; or round)")


def parse_mask(value: str | Mapping[str, Any]) -> MaskSpec:
    """A mask from its YAML form.

    ``"resident_id"`` (any kind without parameters), ``{"hash": {"salt": "..."}}``
    or ``{"hash": "<salt>"}``, ``{"constant": "***"}``, ``{"round": 2}`` or
    ``{"round_number": {"digits": -2}}``, ``{"redact_text": {"min_digits": 8}}``,
    ``{"name": {}}``. Raises ValueError with a message a DBA can act on.
    """
    if value is None:
        raise ValueError("mask is empty (YAML null): write the kind name, e.g. mask: resident_id; "
                         "for a NULL mask quote it: mask: 'null'")
    if isinstance(value, MaskSpec):
        return value
    if isinstance(value, str):
        kind = _kind(value)
        if kind in (MaskKind.HASH, MaskKind.CONSTANT, MaskKind.ROUND_NUMBER):
            example = {MaskKind.HASH: "{hash: {salt: <secret>}}", MaskKind.CONSTANT: "{constant: '***'}",
                       MaskKind.ROUND_NUMBER: "{round: 2}"}[kind]
            raise ValueError(f"mask {kind.value} needs a parameter, e.g. {example}")
        return MaskSpec(kind)
    if isinstance(value, Mapping):
        if len(value) != 1:
            raise ValueError(f"a mask mapping has exactly one key, the kind (e.g. {{round: 2}}), got {dict(value)!r}")
        (name, arg), = value.items()
        kind = _kind(name)
        if arg is None:
            params: Mapping[str, Any] = {}
        elif isinstance(arg, Mapping):
            params = arg
        elif kind is MaskKind.HASH:
            params = {"salt": arg}
        elif kind is MaskKind.CONSTANT:
            params = {"value": arg}
        elif kind is MaskKind.ROUND_NUMBER:
            params = {"digits": arg}
        elif kind is MaskKind.REDACT_TEXT:
            params = {"min_digits": arg}
        else:
            raise ValueError(f"mask {kind.value} takes no parameters, got {arg!r}")
        return MaskSpec(kind, params)
    raise ValueError(f"a mask is a kind name or a one-key mapping, got {value!r}")


# -- type checks ----------------------------------------------------------------

_INT_RE = re.compile(r"^[+-]?[0-9]+$")
_NUM_RE = re.compile(r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?$")
_DATE_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
_TS_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[ T][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,6})?)?")
_TZ_RE = re.compile(r"(Z|[+-][0-9]{2}(:?[0-9]{2})?)$")


def _constant_python(value: str, t: PgType | None) -> Any:
    """The constant as the Python value the column type gives back; MaskTypeError if invalid for it.

    Only forms PostgreSQL reads the same under every DateStyle/TimeZone are
    accepted, so the constant means one thing in every session.
    """
    if t is None or t.array_dims or t.family in (TEXT, OTHER):
        return value
    bad = MaskTypeError(f"constant {value!r} is not a valid {t} value")
    name = t.name
    if t.family == INT:
        if not _INT_RE.match(value):
            raise bad
        low, high = sqlgen.INT_BOUNDS[name]
        if not low <= int(value) <= high:
            raise bad
        return int(value)
    if t.family == NUMERIC:
        if not (_NUM_RE.match(value) or value.lower() == "nan"):
            raise bad
        return Decimal(value)
    if t.family == FLOAT:
        if not (_NUM_RE.match(value) or value.lower() in ("nan", "infinity", "-infinity")):
            raise bad
        d = Decimal(value)
        if not d.is_finite():
            return float(value)
        if abs(d) > Decimal(sqlgen.FLOAT_MAX[name]):
            raise bad  # PostgreSQL refuses out-of-range input ...
        x = twins.float4_value(d) if name == "float4" else float(d)
        if x == 0 and d != 0:
            raise bad  # ... and input that underflows to zero
        return x
    try:
        if t.family == DATE:
            if not _DATE_RE.match(value):
                raise bad
            return dt.date.fromisoformat(value)
        if not _TS_RE.match(value):
            raise bad
        has_tz = bool(_TZ_RE.search(value[16:]))
        if has_tz != (name == "timestamptz"):
            raise MaskTypeError(f"constant {value!r} for {t}: "
                                + ("give an explicit UTC offset" if name == "timestamptz" else "no UTC offset allowed"))
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as e:
        if isinstance(e, MaskTypeError):
            raise
        raise bad from e


def _check(spec: MaskSpec, pg_type: str | PgType) -> PgType:
    t = pg_type if isinstance(pg_type, PgType) else parse_pg_type(pg_type)
    family = OTHER if t.array_dims else t.family
    if family not in _FAMILIES[spec.kind]:
        raise MaskTypeError(f"mask {spec.kind.value} cannot mask a column of type {t}")
    if spec.kind is MaskKind.CONSTANT:
        _constant_python(spec.params["value"], t)
    return t


def can_mask(spec: MaskSpec | str | Mapping[str, Any], pg_type: str) -> bool:
    """Whether ``spec`` can mask a column of ``pg_type`` (format_type text).

    Never raises for a type; a spec given in YAML form that does not parse
    raises ValueError from :func:`parse_mask`.
    """
    spec = parse_mask(spec)
    try:
        _check(spec, pg_type)
    except MaskTypeError:
        return False
    return True


# -- SQL and Python -------------------------------------------------------------


def mask_sql(spec: MaskSpec | str | Mapping[str, Any], column: exp.Expression, pg_type: str) -> exp.Expression:
    """The masked value of ``column`` (of type ``pg_type``) as a SQL expression of the same type.

    ``spec`` is a MaskSpec or its YAML form; ``column`` is copied, never
    modified. Raises MaskTypeError if the kind cannot mask the type.
    """
    spec = parse_mask(spec)
    t = _check(spec, pg_type)
    k = spec.kind
    if k is MaskKind.NULL:
        e = exp.null()
    elif k is MaskKind.CONSTANT:
        e = sqlgen.lit(spec.params["value"])
    elif k in TEXT_KINDS:
        e = sqlgen.TEXT_BUILDERS[k.value](sqlgen.cast(column.copy(), "text"), spec.params)
    elif k is MaskKind.HASH:
        e = sqlgen.hash_(column, t, spec.params)
    elif k is MaskKind.DATE_TO_YEAR:
        e = sqlgen.date_to_year(column, t)
    else:
        assert k is MaskKind.ROUND_NUMBER
        e = sqlgen.round_number(column, t, spec.params)
    to = t.node()
    if isinstance(e, exp.Cast) and e.args["to"] == to:
        return e  # already of the column's type
    return sqlgen.cast(e, to)


_DEFAULT_TYPES = {str: "text", int: "int8", Decimal: "numeric", float: "float8",
                  dt.datetime: "timestamp", dt.date: "date"}


def _default_type(value: Any) -> PgType:
    if isinstance(value, dt.datetime) and value.tzinfo is not None:
        return parse_pg_type("timestamptz")
    for py, name in _DEFAULT_TYPES.items():
        if isinstance(value, py) and not isinstance(value, bool):
            return parse_pg_type(name)
    raise MaskTypeError(f"cannot mask a Python {type(value).__name__} value")


def mask_value(spec: MaskSpec | str | Mapping[str, Any], value: Any, pg_type: str | None = None) -> Any:
    """The value ``mask_sql`` gives for ``value``, computed in Python (None -> None).

    ``pg_type`` matters for char(n) (trailing blanks are insignificant, as in
    PostgreSQL), float4 rounding, the width of a hashed integer and the Python
    type of a constant; without it the type follows the value (str -> text,
    int -> bigint, float -> double precision, ...). Raises MaskTypeError when
    the kind cannot mask the type or the value does not fit it.
    """
    spec = parse_mask(spec)
    k = spec.kind
    if k is MaskKind.CONSTANT:
        t = _check(spec, pg_type) if pg_type is not None else None
        return _constant_python(spec.params["value"], t)
    if value is None:
        if pg_type is not None:
            _check(spec, pg_type)
        return None
    if k is MaskKind.NULL:
        if pg_type is not None:
            _check(spec, pg_type)
        return None
    t = _check(spec, pg_type if pg_type is not None else _default_type(value))
    expected: tuple[type, ...] = {
        TEXT: (str,), INT: (int,), NUMERIC: (Decimal, int), FLOAT: (float, int, Decimal),
        DATE: (dt.date,), TIMESTAMP: (dt.datetime,),
    }[t.family]
    if isinstance(value, bool) or not isinstance(value, expected) or (
            t.family == DATE and isinstance(value, dt.datetime)):
        raise MaskTypeError(f"mask {k.value}: a {type(value).__name__} is not a {t} value")
    if t.family == TIMESTAMP and (value.tzinfo is not None) != (t.name == "timestamptz"):
        raise MaskTypeError(f"mask {k.value}: {'an aware' if value.tzinfo else 'a naive'} datetime "
                            f"is not a {t} value")
    if t.family == TEXT and t.name == "bpchar":
        value = value.rstrip(" ")
    if k in TEXT_KINDS:
        return twins.TEXT_TWINS[k.value](value, spec.params)
    if k is MaskKind.HASH:
        return twins.hash_(value, t, spec.params)
    if k is MaskKind.DATE_TO_YEAR:
        return twins.date_to_year(value)
    assert k is MaskKind.ROUND_NUMBER
    try:
        return twins.round_number(value, t, spec.params)
    except InvalidOperation as e:  # pragma: no cover - beyond PostgreSQL's numeric range
        raise MaskTypeError(f"mask round_number: {value!r} is out of range") from e
