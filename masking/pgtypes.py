"""PostgreSQL column types as the masks see them: a family, and a safe type node for casts.

A mask must give back the column's own type (so ``SELECT *`` keeps its shape
and user predicates keep type-checking), and every type it names must be
schema-qualified so a user's ``search_path`` cannot substitute another type.
The catalog hands us ``format_type()`` text ("character varying(20)",
"timestamp(3) with time zone", "numeric(12,2)", "text[]", "public.mood");
this module turns it into a :class:`PgType` whose :meth:`PgType.node` is a
``pg_catalog.<name>`` (or quoted ``schema.name``) sqlglot type.

Type modifiers (lengths, precisions) are dropped on purpose: a masked value can
be longer than the column allows (``a***@x.cn`` for ``ab@x.cn``, an 18-char hash
in a ``varchar(8)``), and an explicit cast to ``varchar(n)`` would truncate it
silently while one to ``numeric(p,s)`` can fail on a rounded value. The type
(what ``pg_typeof`` shows) is kept; only the typmod becomes -1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlglot import exp

__all__ = ["MaskTypeError", "PgType", "parse_pg_type"]


class MaskTypeError(ValueError):
    """A mask cannot be applied to a type (or a value of the wrong Python type)."""


# Families the mask kinds are defined over.
TEXT, INT, NUMERIC, FLOAT, DATE, TIMESTAMP, OTHER = (
    "text", "int", "numeric", "float", "date", "timestamp", "other",
)

#: format_type() spellings and internal names -> (pg_catalog internal name, family).
_BUILTINS: dict[str, tuple[str, str]] = {}


def _add(internal: str, family: str, *spellings: str) -> None:
    for s in (internal, *spellings):
        _BUILTINS[s] = (internal, family)


_add("text", TEXT)
_add("varchar", TEXT, "character varying")
_add("bpchar", TEXT, "character", "char")
_add("int2", INT, "smallint")
_add("int4", INT, "integer", "int")
_add("int8", INT, "bigint")
_add("numeric", NUMERIC, "decimal")
_add("float4", FLOAT, "real")
_add("float8", FLOAT, "double precision", "float")
_add("date", DATE)
_add("timestamp", TIMESTAMP, "timestamp without time zone")
_add("timestamptz", TIMESTAMP, "timestamp with time zone")
for _internal, _spellings in {
    "bool": ("boolean",), "uuid": (), "json": (), "jsonb": (), "bytea": (), "inet": (), "cidr": (),
    "macaddr": (), "macaddr8": (), "interval": (), "time": ("time without time zone",),
    "timetz": ("time with time zone",), "money": (), "xml": (), "oid": (), "bit": (),
    "varbit": ("bit varying",), "tsvector": (), "point": (), "int4range": (), "int8range": (),
    "numrange": (), "daterange": (), "tsrange": (), "tstzrange": (),
}.items():
    _add(_internal, OTHER, *_spellings)

_TYPMOD = re.compile(r"\(\s*-?\d+\s*(?:,\s*-?\d+\s*)*\)")
_IDENT = r'"(?:[^"]|"")+"|[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_$\u0080-\U0010ffff]*'
_QUALIFIED = re.compile(
    rf"^(?P<schema>{_IDENT})\.(?P<name>{_IDENT})\s*(?:{_TYPMOD.pattern})?\s*(?P<arr>(?:\[\d*\]\s*)*)$"
)
_ARRAY_SUFFIX = re.compile(r"(?:\s*\[\d*\])+\s*$")
_UNQUOTED = re.compile(r"^[a-z][a-z0-9_ ]*$")


@dataclass(frozen=True)
class PgType:
    """A column type reduced to what masking needs.

    ``schema``/``name`` are the type's real (catalog) names, ``family`` one of
    text/int/numeric/float/date/timestamp/other (``other`` also for any
    non-built-in type), ``array_dims`` > 0 for arrays (maskable only by
    ``null`` and ``constant``).
    """

    schema: str
    name: str
    family: str
    array_dims: int = 0
    spelled: str = ""

    @property
    def builtin(self) -> bool:
        return self.schema == "pg_catalog" and self.name in _BUILTINS

    def node(self) -> exp.DataType:
        """The type as a sqlglot node: ``pg_catalog.int4``, ``"s"."t"[]``; never a bare name."""
        if self.builtin:
            schema, name = exp.to_identifier("pg_catalog"), exp.to_identifier(self.name)
        else:
            schema = exp.Identifier(this=self.schema, quoted=True)
            name = exp.Identifier(this=self.name, quoted=True)
        node = exp.DataType(this=exp.DataType.Type.USERDEFINED, kind=exp.Dot(this=schema, expression=name))
        for _ in range(self.array_dims):
            node = exp.DataType(this=exp.DataType.Type.ARRAY, expressions=[node], nested=True)
        return node

    def __str__(self) -> str:
        return self.spelled or f"{self.schema}.{self.name}" + "[]" * self.array_dims


def _ident(text: str) -> str:
    if text.startswith('"'):
        return text[1:-1].replace('""', '"')
    return text.lower()  # PostgreSQL folds unquoted names to lower case


def parse_pg_type(pg_type: str) -> PgType:
    """Parse ``format_type()`` output (or ``schema.type``) into a :class:`PgType`.

    Built-in types may be unqualified; any other type must be schema-qualified,
    since an unqualified name would be resolved through the session's
    search_path. Raises :class:`MaskTypeError` for anything else.
    """
    if not isinstance(pg_type, str) or not pg_type.strip():
        raise MaskTypeError(f"invalid column type {pg_type!r}")
    text = pg_type.strip()
    m = _QUALIFIED.match(text)
    if m:
        schema, name = _ident(m["schema"]), _ident(m["name"])
        dims = m["arr"].count("[")
        if schema == "pg_catalog" and name in _BUILTINS:
            internal, family = _BUILTINS[name]
            return PgType("pg_catalog", internal, family, dims, text)
        return PgType(schema, name, OTHER, dims, text)
    if '"' not in text and "." not in text:
        arr = _ARRAY_SUFFIX.search(text)
        dims = arr.group(0).count("[") if arr else 0
        base = text[: arr.start()] if arr else text
        base = " ".join(_TYPMOD.sub(" ", base.lower()).split())
        if _UNQUOTED.match(base) and base in _BUILTINS:
            internal, family = _BUILTINS[base]
            return PgType("pg_catalog", internal, family, dims, text)
    raise MaskTypeError(
        f"unknown column type {pg_type!r}: built-in types are given by name "
        "(format_type output), any other type schema-qualified (schema.type)"
    )
