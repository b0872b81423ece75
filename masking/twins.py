"""Python twins of the SQL masks: the same masked value for the same input.

Used to redact sensitive literals in audit events (R2.4) and to test the SQL.
Each function mirrors its builder in :mod:`masking.sqlgen` step for step,
including PostgreSQL's own conversions (float -> numeric keeps 15 significant
digits for float8 and 6 for float4; numeric rounds half away from zero).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import re
import struct
from collections.abc import Callable, Mapping
from decimal import ROUND_HALF_UP, Context, Decimal
from typing import Any

from .pgtypes import PgType
from .sqlgen import DIGIT_CLASS, FLOAT_MAX, INT_BOUNDS, INT_HASH_BYTES, MARK_RE, REDACT_MARK

#: Wide enough for any PostgreSQL numeric (131072 digits before the point, 16383 after).
_CTX = Context(prec=200_000, rounding=ROUND_HALF_UP, Emax=1_000_000, Emin=-1_000_000)


# -- text kinds ---------------------------------------------------------------


def _keep_ends(s: str, front: int, back: int, min_len: int) -> str:
    n = len(s)
    if n < min_len:
        return "*" * n
    return s[:front] + "*" * max(n - front - back, 0) + (s[n - back:] if back else "")


def resident_id(s: str, params: Mapping[str, Any]) -> str:
    return _keep_ends(s, 3, 4, 15)


def bank_card(s: str, params: Mapping[str, Any]) -> str:
    return _keep_ends(s, 0, 4, 12)


def mobile(s: str, params: Mapping[str, Any]) -> str:
    return _keep_ends(s, 3, 4, 11)


def name(s: str, params: Mapping[str, Any]) -> str:
    return _keep_ends(s, 1, 0, 2)


def email(s: str, params: Mapping[str, Any]) -> str:
    if "@" not in s:
        return "*" * len(s)
    local, _, domain = s.rpartition("@")
    return (local[0] if len(local) >= 2 else "") + "***@" + domain


def address(s: str, params: Mapping[str, Any]) -> str:
    return s[: min(6, len(s) // 2)] + "****" if s else ""


def redact_text(s: str, params: Mapping[str, Any]) -> str:
    k = int(params["min_digits"])
    d = DIGIT_CLASS
    s = re.sub(f"{d}(?={d}{{{k - 1}}})", REDACT_MARK, s)
    s = re.sub(f"{MARK_RE}{d}{{{k - 1}}}", REDACT_MARK * k, s)
    return s.replace(REDACT_MARK, "*")


TEXT_TWINS: dict[str, Callable[[str, Mapping[str, Any]], str]] = {
    "resident_id": resident_id,
    "bank_card": bank_card,
    "mobile": mobile,
    "name": name,
    "email": email,
    "address": address,
    "redact_text": redact_text,
}


# -- the other kinds ----------------------------------------------------------


def hash_(value: str | int, t: PgType, params: Mapping[str, Any]) -> str | int:
    digest = hashlib.sha256((str(params["salt"]) + str(value)).encode("utf-8")).digest()
    if isinstance(value, str):
        return "h:" + digest.hex()[:16]
    return int.from_bytes(digest[: INT_HASH_BYTES[t.name]], "big", signed=True)


def date_to_year(value: dt.date) -> dt.date:
    if isinstance(value, dt.datetime):
        # an aware value keeps its tzinfo: 1 January 00:00 in that zone, as date_trunc does in the session's
        return value.replace(month=1, day=1, hour=0, minute=0, second=0, microsecond=0, fold=0)
    return dt.date(value.year, 1, 1)


def round_decimal(d: Decimal, digits: int) -> Decimal:
    """PostgreSQL's round(numeric, digits): half away from zero, scale max(digits, 0)."""
    if not d.is_finite():
        return d
    r = d.quantize(Decimal((0, (1,), -digits)), context=_CTX)
    if digits < 0:
        r = r.quantize(Decimal(1), context=_CTX)
    return r.copy_abs() if r.is_zero() else r


def to_float4(d: Decimal | float) -> float:
    """The float4 nearest to ``d`` (as strtof), widened to a Python float."""
    d = Decimal(d)
    try:
        f = struct.unpack("<f", struct.pack("<f", float(d)))[0]
    except OverflowError:  # beyond the largest float4, as strtof
        return math.copysign(math.inf, d)
    # float(d) rounds once to double; correct a possible double rounding by checking the neighbours
    bits = struct.unpack("<i", struct.pack("<f", f))[0]
    best = f
    for nb in (bits - 1, bits + 1):
        try:
            g = struct.unpack("<f", struct.pack("<i", nb))[0]
        except struct.error:
            continue
        if math.isfinite(g) and abs(Decimal(g) - d) < abs(Decimal(best) - d):
            best = g
    return best


def float4_value(d: Decimal | float) -> float:
    """A float4 as PostgreSQL prints it (shortest round-trip digits) and text-protocol drivers load it.

    ``0.1::real`` comes back as the double 0.1, not as the exact float4
    0.100000001490116...; both denote the same float4.
    """
    f = to_float4(d)
    if not math.isfinite(f) or f == 0:
        return f
    for p in range(1, 10):
        text = format(f, f".{p}g")
        if to_float4(Decimal(text)) == f:
            return float(text)
    return f  # pragma: no cover - 9 significant digits always round-trip a float4


def round_number(value: int | float | Decimal, t: PgType, params: Mapping[str, Any]) -> int | float | Decimal:
    digits = int(params["digits"])
    if t.name == "numeric":
        return round_decimal(Decimal(value), digits)
    if t.name in INT_BOUNDS:
        low, high = INT_BOUNDS[t.name]
        return max(low, min(high, int(round_decimal(Decimal(int(value)), digits))))
    x = float(value)
    if not math.isfinite(x):
        return x
    f4 = t.name == "float4"
    fmax = Decimal(FLOAT_MAX[t.name])
    # float -> numeric in PostgreSQL: printf("%.6g") of the float4, "%.15g" of the float8
    r = round_decimal(Decimal(format(to_float4(x) if f4 else x, ".6g" if f4 else ".15g")), digits)
    r = max(-fmax, min(fmax, r))
    return float4_value(r) if f4 else float(r)


__all__ = ["TEXT_TWINS", "date_to_year", "float4_value", "hash_", "round_decimal", "round_number", "to_float4"]
