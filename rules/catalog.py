"""A snapshot of the upstream catalog that the (pure) policy engine resolves names against.

Theory of operation
-------------------
The policy engine must be free of I/O (DESIGN.md: ``pgwarden explain`` and the
proxy run the very same code), yet step 3 of "How a statement is decided" needs
to know what a name in the SQL *means* to PostgreSQL: which schema an
unqualified ``guests`` lands in, that ``cs_records_2024_05`` is a partition of
``cs_records``, that a view reads ``guests`` through another view. So the
catalog is read once, up front, into immutable values:

* :class:`Column`, :class:`Relation`, :class:`Function`, :class:`Schema` and
  :class:`Catalog` are frozen dataclasses; lookups on them are pure.
* :func:`load_catalog` is the only I/O: a handful of queries over one asyncpg
  connection (as the proxy's service login, since name resolution depends on
  *its* schema privileges), inside one read-only REPEATABLE READ transaction
  so all queries see the same catalog state.
* :func:`catalog_to_dict` / :func:`catalog_from_dict` save and restore a
  snapshot as JSON, so tests and ``pgwarden explain`` work without a server.

Naming
------
Relations are keyed by a canonical qualified name, ``schema.name``, in which a
part is double-quoted only when it is not a plain lower-case identifier
(``public.guests``, ``public."Guests"``, ``"odd.schema".t``). That form is
unambiguous (a schema ``a.b`` with table ``c`` and a schema ``a`` with table
``b.c`` get different keys) and reads like SQL; :func:`qualify` builds it and
:func:`split_qualified` parses user-written names (e.g. from YAML) into parts.

Resolution rules (what PostgreSQL does, what this module does)
---------------------------------------------------------------
* Unqualified relation names: PostgreSQL searches ``pg_temp`` (if the session
  has one and it is not listed), then ``pg_catalog`` (unless listed
  explicitly), then the search_path in order, skipping schemas that do not
  exist or on which the current user lacks USAGE. We do the same except that
  temporary schemas are never in a snapshot: a temp table shadowing a
  catalogued name is not seen (see :meth:`Catalog.resolve`).
* Functions: the same path without ``pg_temp``; overloads from all schemas are
  candidates, an earlier schema hiding a later function with identical
  argument types.
* Catalog-qualified names (``hotel.public.guests``) must name the snapshot's
  database; anything else is "cross-database reference" in PostgreSQL and
  ``None`` here.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # asyncpg is only needed by the loader
    import asyncpg

__all__ = [
    "BUILTIN_SCHEMAS",
    "Catalog",
    "Column",
    "Function",
    "NAMEDATALEN",
    "RELKINDS",
    "Relation",
    "Schema",
    "catalog_from_dict",
    "catalog_to_dict",
    "load_catalog",
    "normalise_identifier",
    "parse_search_path",
    "qualify",
    "quote_ident",
    "split_qualified",
]

#: PostgreSQL's identifier limit is NAMEDATALEN - 1 bytes (63 by default).
NAMEDATALEN = 64

#: Schemas whose functions count as built in.
BUILTIN_SCHEMAS = frozenset({"pg_catalog", "information_schema"})

#: pg_class.relkind -> Relation.kind, for the kinds a FROM clause can name.
RELKINDS: Mapping[str, str] = MappingProxyType({
    "r": "table",
    "p": "partitioned_table",
    "v": "view",
    "m": "matview",
    "f": "foreign_table",
    "S": "sequence",
})

_VOLATILITY = MappingProxyType({"i": "immutable", "s": "stable", "v": "volatile"})
_PROKIND = MappingProxyType({"f": "function", "a": "aggregate", "w": "window", "p": "procedure"})

_FORMAT = 1  # version of the JSON snapshot format

# --------------------------------------------------------------------------
# Identifiers
# --------------------------------------------------------------------------

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_PLAIN_IDENT = re.compile(r"[a-z_][a-z0-9_$]*\Z")


def _truncate_identifier(name: str) -> str:
    """Clip to NAMEDATALEN-1 bytes of UTF-8 at a character boundary, as PostgreSQL does.

    PostgreSQL truncates over-long identifiers (with a NOTICE) and then looks
    the *truncated* name up, so ``SELECT * FROM <64+ chars>`` can hit a
    real table; the engine must resolve the same object.
    """
    raw = name.encode("utf-8")
    if len(raw) < NAMEDATALEN:
        return name
    return raw[: NAMEDATALEN - 1].decode("utf-8", errors="ignore")


def normalise_identifier(raw: str, quoted: bool) -> str:
    """PostgreSQL identifier folding: unquoted -> ASCII lower case, quoted -> as is; both truncated.

    ``raw`` is the identifier's text without surrounding quotes (for a quoted
    identifier, with ``""`` already collapsed to ``"``). Only A-Z are folded:
    PostgreSQL leaves non-ASCII letters alone in multi-byte server encodings,
    so ``ÄBC`` unquoted is ``Äbc``, and Python's ``str.lower`` would be wrong.
    Assumes a UTF-8 server encoding for the 63-byte truncation.
    """
    return _truncate_identifier(raw if quoted else raw.translate(_ASCII_LOWER))


def quote_ident(name: str) -> str:
    """Double-quote ``name`` unless it is a plain lower-case identifier.

    Not keyword-aware on purpose: the result is a canonical *key*
    (``public.user`` stays readable), not SQL to execute.
    """
    if _PLAIN_IDENT.match(name):
        return name
    return '"' + name.replace('"', '""') + '"'


def qualify(schema: str, name: str) -> str:
    """The canonical key of a relation: ``schema.name`` with parts quoted only when needed."""
    return f"{quote_ident(schema)}.{quote_ident(name)}"


def _read_quoted(text: str, i: int, what: str) -> tuple[str, int]:
    """A "double-quoted" identifier starting at text[i] ('""' is a quote): (identifier, index after it)."""
    n = len(text)
    j = i + 1
    buf: list[str] = []
    while True:
        k = text.find('"', j)
        if k < 0:
            raise ValueError(f"unterminated {what} {text!r}")
        buf.append(text[j:k])
        if k + 1 < n and text[k + 1] == '"':
            buf.append('"')
            j = k + 2
            continue
        break
    ident = "".join(buf)
    if not ident:
        raise ValueError(f"zero-length {what} {text!r}")
    return ident, k + 1


def split_qualified(text: str) -> tuple[str, ...]:
    """Parse a dotted SQL-style name (``public."Guests"``, ``Hotel.Public.Guests``) into normalised parts.

    Unquoted parts are folded like PostgreSQL does, quoted parts keep their
    case; used to turn names DBAs write (YAML rules) into catalog keys.
    Raises ValueError on malformed input.
    """
    parts: list[str] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i < n and text[i] == '"':
            ident, i = _read_quoted(text, i, "quoted identifier in")
            parts.append(normalise_identifier(ident, True))
        else:
            j = i
            while j < n and text[j] not in '."' and not text[j].isspace():
                j += 1
            if j == i:
                raise ValueError(f"empty name part in {text!r}")
            parts.append(normalise_identifier(text[i:j], False))
            i = j
        while i < n and text[i].isspace():
            i += 1
        if i == n:
            return tuple(parts)
        if text[i] != ".":
            raise ValueError(f"unexpected {text[i]!r} in name {text!r}")
        i += 1


def _split_key(key: str) -> tuple[str, str]:
    parts = split_qualified(key)
    if len(parts) != 2:
        raise ValueError(f"not a schema-qualified name: {key!r}")
    return parts[0], parts[1]


def parse_search_path(value: str, user: str) -> tuple[str, ...]:
    """Split a ``search_path`` setting (as SHOW prints it) into schema names, ``$user`` expanded.

    PostgreSQL's rules: comma-separated identifiers, double quotes keep case,
    unquoted ones are folded; ``$user`` stands for the current user name.
    ``pg_temp`` / ``pg_catalog`` are kept so :meth:`Catalog.resolve` sees
    where they were listed. Nonexistent schemas are kept too (resolve skips
    them, as PostgreSQL does). An empty setting (``''``) is an empty path.
    """
    text = value.strip()
    if text in ("", '""'):  # SET search_path = '' shows as ""
        return ()
    out: list[str] = []
    for part in _split_commas(text):
        if part == "$user":
            out.append(user)
        else:
            out.append(part)
    return tuple(out)


def _split_commas(text: str) -> Iterator[str]:
    """PostgreSQL's SplitIdentifierString with ',' as separator."""
    i, n = 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i < n and text[i] == '"':
            ident, i = _read_quoted(text, i, "identifier in search_path")
            yield normalise_identifier(ident, True)
        else:
            j = i
            while j < n and text[j] != "," and not text[j].isspace():
                j += 1
            if j == i:
                raise ValueError(f"invalid search_path {text!r}")
            yield normalise_identifier(text[i:j], False)
            i = j
        while i < n and text[i].isspace():
            i += 1
        if i == n:
            return
        if text[i] != ",":
            raise ValueError(f"invalid search_path {text!r}")
        i += 1


def _is_temp_schema(name: str) -> bool:
    return name == "pg_temp" or name.startswith(("pg_temp_", "pg_toast_temp_"))


# --------------------------------------------------------------------------
# The data model
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Column:
    """One user column (attnum > 0, not dropped); ``type_name`` is ``format_type`` text."""

    name: str
    type_name: str
    type_oid: int
    not_null: bool
    position: int  # attnum: SELECT * order; may have gaps where columns were dropped
    #: pg_get_expr() of the column's DEFAULT (what an INSERT that omits it stores); None if none.
    default: str | None = None
    #: 'i' identity, 's' generated (stored), '' plain: both compute the value outside ``default``.
    computed: str = ""


@dataclass(frozen=True, slots=True)
class Relation:
    """Something a FROM clause can name: table, partitioned table, view, matview, foreign table, sequence.

    Names here are canonical keys (see :func:`qualify`). The derived fields
    (``root``, ``ancestors``, ``depends_on``, ``calls``) are filled in by
    :meth:`Catalog.build` from ``parents`` and ``direct_depends_on``/
    ``direct_calls``, so a hand-built catalog and a loaded one agree.
    """

    oid: int
    schema: str
    name: str
    kind: str
    columns: tuple[Column, ...] = ()
    #: Direct parent (the first, for multiple inheritance) of a partition or inheritance child.
    parent: str | None = None
    #: Relations (views, tables, ...) this view/matview reads, transitively through other views.
    depends_on: frozenset[str] = frozenset()
    owner: str = ""
    #: All direct parents in pg_inherits order (inheritance allows several).
    parents: tuple[str, ...] = ()
    #: The root ancestor (following first parents), None if not a child.
    root: str | None = None
    #: Every ancestor through all parents.
    ancestors: frozenset[str] = frozenset()
    #: What the view's own definition names (pg_depend of its _RETURN rule).
    direct_depends_on: frozenset[str] = frozenset()
    #: Non-built-in functions the view's definition calls (transitively through views), as ``schema.name``.
    calls: frozenset[str] = frozenset()
    direct_calls: frozenset[str] = frozenset()
    is_partition: bool = False
    #: relpersistence: 'p' permanent, 'u' unlogged ('t' temp never appears in a snapshot).
    persistence: str = "p"

    @property
    def qualified_name(self) -> str:
        return qualify(self.schema, self.name)

    @property
    def is_view(self) -> bool:
        return self.kind in ("view", "matview")

    def column(self, name: str) -> Column | None:
        """The column called ``name`` (already normalised), or None."""
        for col in self.columns:
            if col.name == name:
                return col
        return None

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)


@dataclass(frozen=True, slots=True)
class Function:
    """One pg_proc row; ``arg_types`` are the input argument types as ``format_type`` text."""

    oid: int
    schema: str
    name: str
    arg_types: tuple[str, ...]
    return_type: str
    language: str
    volatility: str = "volatile"  # 'immutable' | 'stable' | 'volatile'
    security_definer: bool = False
    leakproof: bool = False
    is_builtin: bool = False
    kind: str = "function"  # 'function' | 'aggregate' | 'window' | 'procedure'
    returns_set: bool = False
    variadic: bool = False

    @property
    def volatile(self) -> bool:
        return self.volatility == "volatile"

    @property
    def qualified_name(self) -> str:
        return qualify(self.schema, self.name)


@dataclass(frozen=True, slots=True)
class Schema:
    """A namespace; ``usable`` = the loading user has USAGE, ``loaded`` = its objects are in the snapshot.

    PostgreSQL skips search_path entries without USAGE when resolving
    unqualified names, so resolution needs the flag, not just the name.
    """

    name: str
    oid: int = 0
    owner: str = ""
    usable: bool = True
    loaded: bool = True


def _closure(start: str, edges: Mapping[str, Iterable[str]]) -> set[str]:
    """Everything reachable from ``start`` (not including it unless on a cycle)."""
    seen: set[str] = set()
    stack = list(edges.get(start, ()))
    while stack:
        q = stack.pop()
        if q in seen:
            continue
        seen.add(q)
        stack.extend(edges.get(q, ()))
    return seen


def _root(start: str, first_parent: Mapping[str, str]) -> str | None:
    cur, seen = start, {start}
    while cur in first_parent:
        cur = first_parent[cur]
        if cur in seen:  # cannot happen in PostgreSQL; do not loop forever on bad JSON
            break
        seen.add(cur)
    return None if cur == start else cur


def _derive(
    relations: Iterable[Relation],
    parents_of: Mapping[str, Sequence[str]],
    reads_of: Mapping[str, Iterable[str]],
    calls_of: Mapping[str, Iterable[str]],
) -> list[Relation]:
    """Fill root/ancestors/depends_on/calls from edge maps that may cover more than ``relations``."""
    first_parent = {k: v[0] for k, v in parents_of.items() if v}
    out = []
    for rel in relations:
        q = rel.qualified_name
        parents = tuple(parents_of.get(q, ()))
        depends = _closure(q, reads_of)
        depends.discard(q)
        calls = set(calls_of.get(q, ()))
        for dep in depends:
            calls.update(calls_of.get(dep, ()))
        ancestors = _closure(q, parents_of)
        ancestors.discard(q)
        out.append(Relation(
            oid=rel.oid, schema=rel.schema, name=rel.name, kind=rel.kind, columns=rel.columns,
            parent=parents[0] if parents else None, depends_on=frozenset(depends), owner=rel.owner,
            parents=parents, root=_root(q, first_parent), ancestors=frozenset(ancestors),
            direct_depends_on=frozenset(reads_of.get(q, ())), calls=frozenset(calls),
            direct_calls=frozenset(calls_of.get(q, ())), is_partition=rel.is_partition,
            persistence=rel.persistence,
        ))
    return out


@dataclass(frozen=True, eq=True)
class Catalog:
    """An immutable snapshot of what the upstream database contains, with pure lookups.

    Build one with :meth:`Catalog.build` (by hand, in tests), :func:`load_catalog`
    (from PostgreSQL) or :func:`catalog_from_dict` (from saved JSON).
    """

    relations: Mapping[str, Relation]
    functions: Mapping[tuple[str, str], tuple[Function, ...]]
    search_path: tuple[str, ...]
    server_version_num: int
    snapshot_time: datetime
    database: str
    user: str = ""
    schemas: Mapping[str, Schema] = field(default_factory=dict)

    _by_name: Mapping[tuple[str, str], Relation] = field(init=False, repr=False, compare=False)
    _by_oid: Mapping[int, Relation] = field(init=False, repr=False, compare=False)
    _children: Mapping[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)
    _by_relname: Mapping[str, tuple[Relation, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rels = dict(self.relations)
        by_name: dict[tuple[str, str], Relation] = {}
        children: dict[str, list[str]] = {}
        by_relname: dict[str, list[Relation]] = {}
        for key, rel in rels.items():
            if key != rel.qualified_name:
                raise ValueError(f"relation key {key!r} is not its qualified name {rel.qualified_name!r}")
            by_name[(rel.schema, rel.name)] = rel
            by_relname.setdefault(rel.name, []).append(rel)
            for p in rel.parents or ((rel.parent,) if rel.parent else ()):
                children.setdefault(p, []).append(key)
        schemas = dict(self.schemas)
        # A hand-built catalog may omit schemas: every schema that holds something is usable and loaded.
        for rel in rels.values():
            schemas.setdefault(rel.schema, Schema(rel.schema))
        for (s, _n) in self.functions:
            schemas.setdefault(s, Schema(s))
        schemas.setdefault("pg_catalog", Schema("pg_catalog"))  # always searched
        set_ = object.__setattr__
        set_(self, "relations", MappingProxyType(rels))
        set_(self, "functions", MappingProxyType({k: tuple(v) for k, v in self.functions.items()}))
        set_(self, "schemas", MappingProxyType(schemas))
        set_(self, "search_path", tuple(self.search_path))
        set_(self, "_by_name", MappingProxyType(by_name))
        set_(self, "_by_oid", MappingProxyType({r.oid: r for r in rels.values()}))
        set_(self, "_children", MappingProxyType({k: tuple(sorted(v)) for k, v in children.items()}))
        set_(self, "_by_relname", MappingProxyType({k: tuple(v) for k, v in by_relname.items()}))

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    @classmethod
    def build(
        cls,
        relations: Iterable[Relation],
        functions: Iterable[Function] = (),
        *,
        database: str = "postgres",
        user: str = "",
        search_path: Sequence[str] = ("pg_catalog", "public"),
        schemas: Iterable[Schema] | None = None,
        server_version_num: int = 0,
        snapshot_time: datetime | None = None,
    ) -> Catalog:
        """A catalog from relations whose ``parents``/``parent`` and ``direct_depends_on`` are set.

        Derives ``root``, ``ancestors``, transitive ``depends_on`` and ``calls``
        with the same code the loader uses, so tests exercise it too.
        """
        rels = list(relations)
        parents_of = {r.qualified_name: (r.parents or ((r.parent,) if r.parent else ())) for r in rels}
        reads_of = {r.qualified_name: r.direct_depends_on for r in rels}
        calls_of = {r.qualified_name: r.direct_calls for r in rels}
        derived = _derive(rels, parents_of, reads_of, calls_of)
        funcs: dict[tuple[str, str], list[Function]] = {}
        for f in functions:
            funcs.setdefault((f.schema, f.name), []).append(f)
        return cls(
            relations={r.qualified_name: r for r in derived},
            functions={k: tuple(v) for k, v in funcs.items()},
            search_path=tuple(search_path),
            server_version_num=server_version_num,
            snapshot_time=snapshot_time or datetime.now(UTC),
            database=database,
            user=user,
            schemas={s.name: s for s in schemas} if schemas is not None else {},
        )

    # -- identity --------------------------------------------------------------

    @cached_property
    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON form: a cache key part and a "did the catalog change" test."""
        blob = json.dumps(catalog_to_dict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    # -- plain lookups -------------------------------------------------------------

    def get(self, schema: str, name: str) -> Relation | None:
        """The relation ``schema.name`` (normalised parts), or None."""
        return self._by_name.get((schema, name))

    def by_oid(self, oid: int) -> Relation | None:
        return self._by_oid.get(oid)

    def candidates(self, name: str) -> tuple[Relation, ...]:
        """Every catalogued relation called ``name`` in any schema.

        For callers that cannot be sure of the session's search_path: if any
        candidate is protected, treating the reference as protected is safe.
        """
        return self._by_relname.get(name, ())

    # -- name resolution -------------------------------------------------------------

    def effective_search_path(self, search_path: Sequence[str] | None = None) -> tuple[str, ...]:
        """The schemas an unqualified relation name is looked up in, in order.

        ``search_path`` is the session's path as schema names (``$user``
        is expanded here too, like PostgreSQL; see :func:`parse_search_path`);
        None means the snapshot's path (the service user's default).
        pg_catalog goes first unless listed; schemas that do not exist or
        lack USAGE for the service user are skipped, as PostgreSQL skips them;
        temporary schemas are dropped (never in a snapshot).
        """
        path = self.search_path if search_path is None else tuple(search_path)
        out: list[str] = []
        if "pg_catalog" not in path:
            out.append("pg_catalog")
        for s in path:
            if s == "$user":
                s = self.user
            if _is_temp_schema(s):
                continue
            sch = self.schemas.get(s)
            if sch is None or not sch.usable or s in out:
                continue
            out.append(s)
        return tuple(out)

    def _split(self, name_parts: Sequence[str]) -> tuple[str | None, str] | None:
        """(schema or None, name) from 1-3 parts; None for a foreign database or a bad arity."""
        if isinstance(name_parts, str):
            raise TypeError("name_parts must be a sequence of identifiers, not a string")
        parts = tuple(name_parts)
        if len(parts) == 1:
            return None, parts[0]
        if len(parts) == 2:
            return parts[0], parts[1]
        if len(parts) == 3:
            if parts[0] != self.database:
                return None  # PostgreSQL: "cross-database references are not implemented"
            return parts[1], parts[2]
        return None

    def resolve(self, name_parts: Sequence[str], search_path: Sequence[str] | None = None) -> Relation | None:
        """The relation a table reference names, as PostgreSQL would pick it, or None.

        ``name_parts``: already-normalised identifiers (see
        :func:`normalise_identifier`): ``[name]``, ``[schema, name]`` or
        ``[database, schema, name]``. ``search_path``: the *session's current*
        path (it changes with SET); None uses the snapshot's default.

        None means "not a catalogued relation": unknown, a foreign database,
        a temporary table, created after the snapshot, or the first
        matching search_path schema was not loaded. Callers that enforce
        rules must treat None as "cannot tell" (refuse for restricted roles),
        never as "harmless".
        """
        split = self._split(name_parts)
        if split is None:
            return None
        schema, name = split
        if schema is not None:
            return self._by_name.get((schema, name))
        for s in self.effective_search_path(search_path):
            rel = self._by_name.get((s, name))
            if rel is not None:
                return rel
            if not self.schemas[s].loaded:
                return None  # it might be there: cannot tell, fail closed
        return None

    def resolve_function(self, name_parts: Sequence[str],
                         search_path: Sequence[str] | None = None) -> tuple[Function, ...]:
        """Every function a call by this name could bind to, in search order.

        Overload resolution by argument types is PostgreSQL's business; the
        engine gets all candidates (an earlier schema's function hides a later
        one with identical argument types, as in PostgreSQL) and should
        refuse if any candidate is not allowed. Empty tuple: unknown (or the
        search hit a schema that was not loaded).
        """
        split = self._split(name_parts)
        if split is None:
            return ()
        schema, name = split
        if schema is not None:
            return self.functions.get((schema, name), ())
        out: list[Function] = []
        seen: set[tuple[str, ...]] = set()
        for s in self.effective_search_path(search_path):
            if not self.schemas[s].loaded:
                return ()
            for f in self.functions.get((s, name), ()):
                if f.arg_types not in seen:
                    seen.add(f.arg_types)
                    out.append(f)
        return tuple(out)

    # -- inheritance and views --------------------------------------------------------

    def root_of(self, rel: Relation) -> Relation:
        """A partition or inheritance child -> its root table (via first parents); else ``rel`` itself.

        With multiple inheritance there are several roots: use ``rel.ancestors``
        when deciding protection.
        """
        if rel.root is not None:
            root = self.relations.get(rel.root)
            if root is not None:
                return root
        cur, seen = rel, {rel.qualified_name}
        while cur.parent is not None and cur.parent not in seen:
            nxt = self.relations.get(cur.parent)
            if nxt is None:
                break
            seen.add(cur.parent)
            cur = nxt
        return cur

    def descendants(self, rel: Relation | str) -> frozenset[str]:
        """Every partition / inheritance child below ``rel``: reading the parent (without ONLY) reads them."""
        start = rel if isinstance(rel, str) else rel.qualified_name
        return frozenset(_closure(start, self._children))

    def protected_dependencies(self, rel: Relation, protected: set[str] | frozenset[str]) -> set[str]:
        """Which names in ``protected`` reading ``rel`` exposes data of.

        Considers ``rel`` itself and everything it reads transitively (views
        through views); for each of those, its ancestors (a partition carries
        its root's rules) and its descendants (a parent scan includes the
        children's rows). ``protected`` holds canonical keys (:func:`qualify`).
        ``rel`` itself is included when protected: subtract it if the rules
        name the view explicitly.
        """
        touched = {rel.qualified_name} | set(rel.depends_on)
        hits: set[str] = set()
        for q in touched:
            names = {q} | self.descendants(q)
            r = self.relations.get(q)
            if r is not None:
                names |= r.ancestors
            hits |= names & protected
        return hits


# --------------------------------------------------------------------------
# JSON snapshots
# --------------------------------------------------------------------------


def catalog_to_dict(cat: Catalog) -> dict[str, Any]:
    """A JSON-ready dict (lists sorted, so equal catalogs give equal JSON)."""
    def col(c: Column) -> dict[str, Any]:
        return {"name": c.name, "type_name": c.type_name, "type_oid": c.type_oid,
                "not_null": c.not_null, "position": c.position, "default": c.default, "computed": c.computed}

    def rel(r: Relation) -> dict[str, Any]:
        return {
            "oid": r.oid, "schema": r.schema, "name": r.name, "kind": r.kind,
            "columns": [col(c) for c in r.columns], "owner": r.owner,
            "parents": list(r.parents), "direct_depends_on": sorted(r.direct_depends_on),
            "direct_calls": sorted(r.direct_calls), "depends_on": sorted(r.depends_on),
            "calls": sorted(r.calls), "root": r.root, "ancestors": sorted(r.ancestors),
            "is_partition": r.is_partition, "persistence": r.persistence,
        }

    def fn(f: Function) -> dict[str, Any]:
        return {
            "oid": f.oid, "schema": f.schema, "name": f.name, "arg_types": list(f.arg_types),
            "return_type": f.return_type, "language": f.language, "volatility": f.volatility,
            "security_definer": f.security_definer, "leakproof": f.leakproof, "is_builtin": f.is_builtin,
            "kind": f.kind, "returns_set": f.returns_set, "variadic": f.variadic,
        }

    return {
        "format": _FORMAT,
        "database": cat.database,
        "user": cat.user,
        "server_version_num": cat.server_version_num,
        "snapshot_time": cat.snapshot_time.isoformat(),
        "search_path": list(cat.search_path),
        "schemas": [{"name": s.name, "oid": s.oid, "owner": s.owner, "usable": s.usable, "loaded": s.loaded}
                    for s in sorted(cat.schemas.values(), key=lambda s: s.name)],
        "relations": [rel(cat.relations[k]) for k in sorted(cat.relations)],
        "functions": [fn(f) for k in sorted(cat.functions) for f in cat.functions[k]],
    }


def catalog_from_dict(d: Mapping[str, Any]) -> Catalog:
    """Inverse of :func:`catalog_to_dict`; stored derived fields are kept as saved, not recomputed."""
    if d.get("format") != _FORMAT:
        raise ValueError(f"unsupported catalog snapshot format {d.get('format')!r}")
    rels = {}
    for r in d["relations"]:
        rel = Relation(
            oid=int(r["oid"]), schema=r["schema"], name=r["name"], kind=r["kind"],
            columns=tuple(Column(c["name"], c["type_name"], int(c["type_oid"]), bool(c["not_null"]),
                                 int(c["position"]), c.get("default"), c.get("computed", ""))
                          for c in r["columns"]),
            parent=r["parents"][0] if r["parents"] else None,
            depends_on=frozenset(r["depends_on"]), owner=r.get("owner", ""),
            parents=tuple(r["parents"]), root=r.get("root"), ancestors=frozenset(r.get("ancestors", ())),
            direct_depends_on=frozenset(r.get("direct_depends_on", ())),
            calls=frozenset(r.get("calls", ())), direct_calls=frozenset(r.get("direct_calls", ())),
            is_partition=bool(r.get("is_partition", False)), persistence=r.get("persistence", "p"),
        )
        rels[rel.qualified_name] = rel
    funcs: dict[tuple[str, str], list[Function]] = {}
    for f in d["functions"]:
        fun = Function(
            oid=int(f["oid"]), schema=f["schema"], name=f["name"], arg_types=tuple(f["arg_types"]),
            return_type=f["return_type"], language=f["language"], volatility=f["volatility"],
            security_definer=bool(f["security_definer"]), leakproof=bool(f["leakproof"]),
            is_builtin=bool(f["is_builtin"]), kind=f.get("kind", "function"),
            returns_set=bool(f.get("returns_set", False)), variadic=bool(f.get("variadic", False)),
        )
        funcs.setdefault((fun.schema, fun.name), []).append(fun)
    return Catalog(
        relations=rels,
        functions={k: tuple(v) for k, v in funcs.items()},
        search_path=tuple(d["search_path"]),
        server_version_num=int(d["server_version_num"]),
        snapshot_time=datetime.fromisoformat(d["snapshot_time"]),
        database=d["database"],
        user=d.get("user", ""),
        schemas={s["name"]: Schema(s["name"], int(s.get("oid", 0)), s.get("owner", ""), bool(s["usable"]),
                                   bool(s["loaded"])) for s in d.get("schemas", ())},
    )


# --------------------------------------------------------------------------
# Loading from PostgreSQL (the only I/O in this module)
# --------------------------------------------------------------------------

_META_SQL = """
SELECT current_database() AS database, current_user AS usr,
       current_setting('server_version_num')::int AS version,
       current_schemas(true)::text[] AS path, now() AS at
"""

# Prefix pg_ is reserved for system schemas, so these patterns cannot hide a user schema.
_SCHEMAS_SQL = r"""
SELECT n.oid, n.nspname, pg_get_userbyid(n.nspowner) AS owner,
       has_schema_privilege(n.oid, 'USAGE') AS usable
FROM pg_namespace n
WHERE n.nspname <> 'pg_toast' AND n.nspname NOT LIKE 'pg\_temp\_%' AND n.nspname NOT LIKE 'pg\_toast\_temp\_%'
"""

_RELATIONS_SQL = """
SELECT c.oid, n.nspname, c.relname, c.relkind::text AS relkind, pg_get_userbyid(c.relowner) AS owner,
       c.relispartition, c.relpersistence::text AS persistence
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S') AND n.nspname = ANY($1::text[])
"""

_COLUMNS_SQL = """
SELECT a.attrelid, a.attname, format_type(a.atttypid, a.atttypmod) AS type_name, a.atttypid,
       a.attnotnull, a.attnum, pg_get_expr(d.adbin, d.adrelid) AS default_expr,
       (a.attidentity::text || a.attgenerated::text) AS computed
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE a.attnum > 0 AND NOT a.attisdropped
  AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S') AND n.nspname = ANY($1::text[])
ORDER BY a.attrelid, a.attnum
"""

# Every inheritance edge in the database (not only loaded schemas), so roots and
# ancestors are right even when a parent lives in a schema that was not loaded.
_INHERITS_SQL = """
SELECT cn.nspname AS child_schema, c.relname AS child, pn.nspname AS parent_schema, p.relname AS parent
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_namespace cn ON cn.oid = c.relnamespace
JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace pn ON pn.oid = p.relnamespace
WHERE c.relkind IN ('r', 'p', 'f')
ORDER BY i.inhrelid, i.inhseqno
"""

# What each view/matview definition references (its ON SELECT rule's pg_depend
# rows): relations, and functions. All views in the database, so the transitive
# closure runs through views in schemas that were not loaded.
_VIEW_DEPS_SQL = """
SELECT DISTINCT vn.nspname AS view_schema, v.relname AS view,
       (d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass) AS is_relation,
       COALESCE(rn.nspname, fn.nspname) AS ref_schema, COALESCE(rc.relname, f.proname) AS ref_name
FROM pg_rewrite r
JOIN pg_class v ON v.oid = r.ev_class JOIN pg_namespace vn ON vn.oid = v.relnamespace
JOIN pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass AND d.objid = r.oid
LEFT JOIN pg_class rc ON d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass AND rc.oid = d.refobjid
LEFT JOIN pg_namespace rn ON rn.oid = rc.relnamespace
LEFT JOIN pg_proc f ON d.refclassid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND f.oid = d.refobjid
LEFT JOIN pg_namespace fn ON fn.oid = f.pronamespace
WHERE r.ev_type = '1' AND v.relkind IN ('v', 'm')
  AND ((rc.oid IS NOT NULL AND rc.oid <> r.ev_class AND rc.relkind IN ('r', 'p', 'v', 'm', 'f', 'S'))
       OR f.oid IS NOT NULL)
"""

_FUNCTIONS_SQL = """
SELECT p.oid, n.nspname, p.proname,
       ARRAY(SELECT format_type(t.oid, NULL)
             FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY AS t(oid, i) ORDER BY t.i)::text[] AS args,
       format_type(p.prorettype, NULL) AS ret, l.lanname, p.provolatile::text AS volatility,
       p.prosecdef, p.proleakproof, p.prokind::text AS kind, p.proretset, p.provariadic <> 0 AS variadic
FROM pg_proc p
JOIN pg_namespace n ON n.oid = p.pronamespace
JOIN pg_language l ON l.oid = p.prolang
WHERE n.nspname = ANY($1::text[])
ORDER BY p.oid
"""


async def load_catalog(conn: asyncpg.Connection, schemas: Sequence[str] | None = None) -> Catalog:
    """Read a :class:`Catalog` from the upstream over ``conn``.

    Connect as the proxy's service login: schema USAGE (which decides
    unqualified-name resolution) and the default search_path are that
    user's. ``schemas`` limits which schemas' relations and functions are
    loaded (pg_catalog and information_schema always are); None loads all
    but pg_toast and temporary schemas. Inheritance and view-dependency
    edges are read for the whole database, so derived fields stay complete.
    Runs in one read-only REPEATABLE READ transaction (a consistent view of
    the catalog) unless ``conn`` is already inside a transaction.
    """
    if conn.is_in_transaction():
        return await _load(conn, schemas)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        return await _load(conn, schemas)


async def _load(conn: asyncpg.Connection, only: Sequence[str] | None) -> Catalog:
    meta = await conn.fetchrow(_META_SQL)
    schema_rows = await conn.fetch(_SCHEMAS_SQL)
    existing = {r["nspname"] for r in schema_rows}
    wanted = existing if only is None else (set(only) | BUILTIN_SCHEMAS) & existing
    names = sorted(wanted)
    schemas = [Schema(r["nspname"], r["oid"], r["owner"], r["usable"], r["nspname"] in wanted)
               for r in schema_rows]

    rel_rows = await conn.fetch(_RELATIONS_SQL, names)
    cols: dict[int, list[Column]] = {}
    for r in await conn.fetch(_COLUMNS_SQL, names):
        cols.setdefault(r["attrelid"], []).append(
            Column(r["attname"], r["type_name"], r["atttypid"], r["attnotnull"], r["attnum"],
                   r["default_expr"], r["computed"] or ""))

    parents_of: dict[str, list[str]] = {}
    for r in await conn.fetch(_INHERITS_SQL):
        parents_of.setdefault(qualify(r["child_schema"], r["child"]), []).append(
            qualify(r["parent_schema"], r["parent"]))

    reads_of: dict[str, set[str]] = {}
    calls_of: dict[str, set[str]] = {}
    for r in await conn.fetch(_VIEW_DEPS_SQL):
        view = qualify(r["view_schema"], r["view"])
        ref = qualify(r["ref_schema"], r["ref_name"])
        if r["is_relation"]:
            reads_of.setdefault(view, set()).add(ref)
        elif r["ref_schema"] not in BUILTIN_SCHEMAS:
            calls_of.setdefault(view, set()).add(ref)

    bare = [
        Relation(oid=r["oid"], schema=r["nspname"], name=r["relname"], kind=RELKINDS[r["relkind"]],
                 columns=tuple(cols.get(r["oid"], ())), owner=r["owner"], is_partition=r["relispartition"],
                 persistence=r["persistence"])
        for r in rel_rows
    ]
    relations = _derive(bare, parents_of, reads_of, calls_of)

    functions: dict[tuple[str, str], list[Function]] = {}
    for r in await conn.fetch(_FUNCTIONS_SQL, names):
        f = Function(
            oid=r["oid"], schema=r["nspname"], name=r["proname"], arg_types=tuple(r["args"]),
            return_type=r["ret"], language=r["lanname"], volatility=_VOLATILITY[r["volatility"]],
            security_definer=r["prosecdef"], leakproof=r["proleakproof"],
            is_builtin=r["nspname"] in BUILTIN_SCHEMAS, kind=_PROKIND.get(r["kind"], r["kind"]),
            returns_set=r["proretset"], variadic=r["variadic"],
        )
        functions.setdefault((f.schema, f.name), []).append(f)

    return Catalog(
        relations={r.qualified_name: r for r in relations},
        functions={k: tuple(v) for k, v in functions.items()},
        search_path=tuple(s for s in meta["path"] if not _is_temp_schema(s)),
        server_version_num=meta["version"],
        snapshot_time=meta["at"],
        database=meta["database"],
        user=meta["usr"],
        schemas={s.name: s for s in schemas},
    )
