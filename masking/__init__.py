"""Mask kinds as SQL expressions, with Python twins for redacting audit logs.

Pure (no I/O). The rewriter calls :func:`mask_sql` for each masked column of a
protected table; the rules checker calls :func:`can_mask`; the audit log calls
:func:`mask_value` on literals compared with masked columns (R2.4).
"""

from .kinds import MaskKind, MaskSpec, MaskTypeError, can_mask, mask_sql, mask_value, parse_mask
from .pgtypes import PgType, parse_pg_type

__all__ = [
    "MaskKind", "MaskSpec", "MaskTypeError", "PgType",
    "can_mask", "mask_sql", "mask_value", "parse_mask", "parse_pg_type",
]
