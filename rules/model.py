"""The access rules a DBA writes in YAML, as typed values, and what they grant one person.

Theory of operation: ``load_rules`` turns the YAML into ``Rules`` (every
error names file:line); ``grants_for`` turns Rules + a Principal into the
``StatementGrants`` the rewriter consumes. Row conditions are a small
vocabulary a DBA can write without SQL (time windows, own department,
ownership through another table, column values); each becomes a sqlglot
predicate over the table's own columns, built from quoted identifiers and
literals and pg_catalog-qualified operators and functions, so neither a
principal's attribute values nor a session's search_path can change what
it means. Time windows are computed by PostgreSQL from statement_timestamp()
in the configured time zone: a transaction held open does not widen them.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlglot
from sqlglot import exp

from .retention import RetentionRule, parse_retention
from .yamlfile import ConfigError, Located, load_yaml, parse_networks
from .principal import Principal

from .grants import ColumnRule, StatementGrants, StatementKind, TableGrant, Treatment
from .tickets import Scope, TicketPolicy, widen

#: The principal attribute under which a session's active ticket (or break-glass) scope travels.
SCOPE_ATTRIBUTE = "pgwarden.scope"
#: ... and the smaller row cap of a statement decided again with what is left of a row budget.
CAP_ATTRIBUTE = "pgwarden.row_cap"

DEFAULT_KINDS = frozenset({StatementKind.SELECT, StatementKind.SHOW, StatementKind.SET,
                           StatementKind.TRANSACTION, StatementKind.EXPLAIN})
# What drivers and BI tools read to describe a schema. Catalog views that reveal data or
# statistics (pg_stats, pg_statistic, pg_stat_activity, pg_stat_statements, ...) are not here.
CATALOG_RELATIONS = frozenset(f"pg_catalog.{n}" for n in (
    "pg_type", "pg_namespace", "pg_class", "pg_attribute", "pg_attrdef", "pg_index", "pg_constraint",
    "pg_proc", "pg_description", "pg_am", "pg_collation", "pg_enum", "pg_range", "pg_inherits",
    "pg_database", "pg_roles", "pg_settings", "pg_tables", "pg_views", "pg_matviews", "pg_indexes",
    "pg_tablespace", "pg_extension", "pg_trigger", "pg_depend", "pg_sequence", "pg_language",
    "pg_opclass", "pg_operator", "pg_cast", "pg_timezone_names", "pg_available_extensions",
)) | frozenset(f"information_schema.{n}" for n in (
    "tables", "columns", "schemata", "views", "key_column_usage", "table_constraints",
    "referential_constraints", "constraint_column_usage", "routines", "parameters", "sequences",
    "element_types", "domains", "check_constraints",
))

_DURATION = re.compile(r"^\s*(\d+)\s*(m|min|minutes?|h|hours?|d|days?)\s*$")
_UNITS = {"m": "minutes", "min": "minutes", "h": "hours", "d": "days"}


# --- the model ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shift:
    name: str
    start: time
    end: time  # may be earlier than start: the shift crosses midnight


@dataclass(frozen=True)
class TableRules:
    """How a table is classified: which columns are sensitive, which carry time and department."""

    name: str  # qualified, as written ("public.cs_records")
    subject_key: str | None = None
    time_column: str | None = None
    department_column: str | None = None
    sensitive: Mapping[str, Any] = field(default_factory=dict)  # column -> mask as written (kind or mapping)
    line: str = ""
    legal_hold_column: str | None = None  # rows under legal hold (R2.5): a ticket opens them only if legal
    region_column: str | None = None  # for region-scoped (cross-region) tickets (R1.5)
    record_key: str | None = None  # the column naming one record (lookup quotas: a pick by it names a guest)


@dataclass(frozen=True)
class Condition:
    """One row condition as written; rendered per principal by ``condition_sql``."""

    kind: str  # current_shift | today | last | own_department | column | owned_through | sql
    args: Mapping[str, Any] = field(default_factory=dict)
    where: str = ""  # file:line


@dataclass(frozen=True)
class TableGrantRule:
    table: str
    rows: tuple[Condition, ...] = ()
    unmask: frozenset[str] | None = frozenset()  # None: every column in clear
    hide: frozenset[str] = frozenset()
    hide_sensitive: bool = False
    masks: Mapping[str, Any] = field(default_factory=dict)  # extra/override masks for this role
    kinds: frozenset[StatementKind] = frozenset({StatementKind.SELECT})
    where: str = ""


@dataclass(frozen=True)
class Role:
    name: str
    grants: Mapping[str, TableGrantRule]
    kinds: frozenset[StatementKind] = DEFAULT_KINDS
    requires: Mapping[str, Any] = field(default_factory=dict)
    otherwise: str | None = None  # role used when a requirement fails
    row_cap: int | None = None
    export: bool = False
    unrestricted: bool = False
    flags: frozenset[str] = frozenset()  # e.g. internal_audit: every statement flagged in the audit log
    functions: frozenset[str] = frozenset()
    where: str = ""
    #: Lookups of one guest per person per calendar month before a ticket is needed (R3.4); None: no quota.
    guest_lookups: int | None = None
    #: Designated devices (R3.6): networks this role may connect from; empty: anywhere.
    networks: tuple[Any, ...] = ()
    #: Rows per person per rolling hour and day (R3.3): (hour, day), either may be None.
    row_budget: tuple[int | None, int | None] | None = None
    #: Break-glass (R4.5): tables opened at once by SET pgwarden.emergency, and for how long.
    emergency_tables: tuple[str, ...] = ()
    emergency_hours: int = 0


@dataclass(frozen=True)
class Guards:
    """Rule-wide guard settings (``guards:``): the circuit breaker (R3.5) and who may lift it."""

    lockout_after: int = 3  # consecutive refused statements
    lockout_seconds: int = 1800
    unlock_roles: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Rules:
    timezone: str
    shifts: tuple[Shift, ...]
    tables: Mapping[str, TableRules]
    roles: Mapping[str, Role]
    source: str = ""
    #: Every file the rules were read from (the main file and its includes): reload watches them all.
    sources: tuple[str, ...] = ()
    guards: Guards = field(default_factory=Guards)
    tickets: TicketPolicy = field(default_factory=TicketPolicy)


# --- loading ------------------------------------------------------------------------------------


def _err(loc: Located, path: tuple[Any, ...], msg: str) -> ConfigError:
    return ConfigError(f"{loc.where(*path)}: {msg}")


def _mapping(v: Any, loc: Located, path: tuple[Any, ...], what: str) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _err(loc, path, f"{what} must be a mapping")
    return v


def _keys(d: dict[str, Any], allowed: set[str], loc: Located, path: tuple[Any, ...]) -> None:
    for k in d:
        if k not in allowed:
            raise _err(loc, path + (k,), f"unknown key {k!r} (expected one of: {', '.join(sorted(allowed))})")


def _parse_time(v: Any, loc: Located, path: tuple[Any, ...]) -> time:
    if isinstance(v, int):  # YAML 1.1 reads 07:00 as a sexagesimal integer (420)
        return time(v // 60 % 24, v % 60)
    try:
        hh, mm = str(v).split(":")
        return time(int(hh), int(mm))
    except ValueError:
        raise _err(loc, path, f"expected a time like \"07:00\", not {v!r}") from None


def _kinds(v: Any, loc: Located, path: tuple[Any, ...]) -> frozenset[StatementKind]:
    if not isinstance(v, list):
        raise _err(loc, path, "statements must be a list")
    out = set()
    for i, k in enumerate(v):
        try:
            out.add(StatementKind(str(k)))
        except ValueError:
            raise _err(loc, path + (i,), f"unknown statement kind {k!r} (expected one of: "
                       f"{', '.join(s.value for s in StatementKind)})") from None
    return frozenset(out)


def _condition(v: Any, loc: Located, path: tuple[Any, ...]) -> Condition:
    where = loc.where(*path)
    if isinstance(v, str):
        if v in ("current_shift", "today", "own_department"):
            return Condition(v, {}, where)
        raise _err(loc, path, f"unknown row condition {v!r} (current_shift, today, own_department, or a mapping "
                   "last / column / owned_through / sql)")
    if not isinstance(v, dict) or len(v) != 1:
        raise _err(loc, path, "a row condition is a name or a mapping with one key")
    (key, arg), = v.items()
    p = path + (key,)
    if key == "last":
        m = _DURATION.match(str(arg))
        if not m:
            raise _err(loc, p, f"expected a duration like 72h, 3d or 30m, not {arg!r}")
        unit = m.group(2)
        unit = _UNITS.get(unit, unit if unit.endswith("s") else unit + "s")
        return Condition("last", {"amount": int(m.group(1)), "unit": unit}, where)
    if key == "column":
        d = _mapping(arg, loc, p, "column")
        _keys(d, {"name", "in", "not_in", "equals", "is"}, loc, p)
        if "name" not in d or len([k for k in ("in", "not_in", "equals", "is") if k in d]) != 1:
            raise _err(loc, p, "column needs a name and exactly one of in / not_in / equals / is")
        return Condition("column", d, where)
    if key == "owned_through":
        d = _mapping(arg, loc, p, "owned_through")
        _keys(d, {"table", "key", "references", "owner_column", "owner"}, loc, p)
        for k in ("table", "key", "references", "owner_column"):
            if k not in d:
                raise _err(loc, p, f"owned_through needs {k}")
        return Condition("owned_through", d, where)
    if key == "sql":
        try:
            parsed = sqlglot.parse_one(str(arg), read="postgres")
        except sqlglot.errors.ParseError as exc:
            raise _err(loc, p, f"row condition SQL does not parse: {exc}") from None
        if parsed.find(exp.Select, exp.Subquery) is not None:
            raise _err(loc, p, "a raw SQL row condition may not contain a subquery (use owned_through)")
        return Condition("sql", {"text": str(arg)}, where)
    raise _err(loc, path, f"unknown row condition {key!r}")


def _grant(table: str, v: Any, loc: Located, path: tuple[Any, ...]) -> TableGrantRule:
    d = _mapping(v, loc, path, f"grant on {table}")
    _keys(d, {"rows", "unmask", "hide", "masks", "statements"}, loc, path)
    rows = d.get("rows") or []
    if not isinstance(rows, list):
        raise _err(loc, path + ("rows",), "rows must be a list of conditions (all must hold)")
    unmask_raw = d.get("unmask", [])
    unmask: frozenset[str] | None
    if unmask_raw == "all":
        unmask = None
    elif isinstance(unmask_raw, list):
        unmask = frozenset(str(c) for c in unmask_raw)
    else:
        raise _err(loc, path + ("unmask",), "unmask is a list of columns or 'all'")
    hide_raw = d.get("hide", [])
    hide_sensitive = hide_raw == "sensitive"
    if not hide_sensitive and not isinstance(hide_raw, list):
        raise _err(loc, path + ("hide",), "hide is a list of columns or 'sensitive'")
    return TableGrantRule(
        table=table, rows=tuple(_condition(c, loc, path + ("rows", i)) for i, c in enumerate(rows)),
        unmask=unmask, hide=frozenset() if hide_sensitive else frozenset(str(c) for c in hide_raw),
        hide_sensitive=hide_sensitive,
        masks={c: _mask(k, loc, path + ("masks", c)) for c, k in
               _mapping(d.get("masks"), loc, path + ("masks",), "masks").items()},
        kinds=_kinds(d["statements"], loc, path + ("statements",)) if "statements" in d
        else frozenset({StatementKind.SELECT}),
        where=loc.where(*path),
    )


def parse_rules(data: Any, loc: Located) -> Rules:
    d = _mapping(data, loc, (), "the rules file")
    _keys(d, {"timezone", "shifts", "tables", "roles", "guards", "tickets", "retention"}, loc, ())

    parse_retention(d.get("retention"), loc, d.get("tables") or {})
    tz = str(d.get("timezone", "UTC"))
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise _err(loc, ("timezone",), f"unknown time zone {tz!r}") from None
    shifts = []
    for name, v in _mapping(d.get("shifts"), loc, ("shifts",), "shifts").items():
        if not isinstance(v, list) or len(v) != 2:
            raise _err(loc, ("shifts", name), "a shift is [start, end], e.g. [\"07:00\", \"15:00\"]")
        start, end = (_parse_time(t, loc, ("shifts", name)) for t in v)
        if start == end:
            raise _err(loc, ("shifts", name), "a shift cannot start and end at the same time")
        shifts.append(Shift(str(name), start, end))
    tables = {}
    for name, v in _mapping(d.get("tables"), loc, ("tables",), "tables").items():
        t = _mapping(v, loc, ("tables", name), f"table {name}")
        _keys(t, {"subject_key", "time_column", "department_column", "sensitive", "legal_hold_column",
                  "region_column", "record_key"}, loc, ("tables", name))
        tables[name] = TableRules(
            name=name, subject_key=t.get("subject_key"), record_key=t.get("record_key"),
            time_column=t.get("time_column"),
            department_column=t.get("department_column"), legal_hold_column=t.get("legal_hold_column"),
            region_column=t.get("region_column"),
            sensitive={c: _mask(k, loc, ("tables", name, "sensitive", c)) for c, k in
                       _mapping(t.get("sensitive"), loc, ("tables", name, "sensitive"), "sensitive").items()},
            line=loc.where("tables", name))
    roles = {}
    for name, v in _mapping(d.get("roles"), loc, ("roles",), "roles").items():
        p = ("roles", name)
        r = _mapping(v, loc, p, f"role {name}")
        _keys(r, {"grants", "statements", "requires", "otherwise", "row_cap", "export", "unrestricted", "flags",
                  "functions", "guest_lookups", "networks", "row_budget", "emergency"}, loc, p)
        grants = {}
        for table, g in _mapping(r.get("grants"), loc, p + ("grants",), "grants").items():
            if table not in tables:
                raise _err(loc, p + ("grants", table), f"table {table!r} is not classified under tables:")
            grants[table] = _grant(table, g, loc, p + ("grants", table))
        cap = r.get("row_cap")
        if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
            raise _err(loc, p + ("row_cap",), "row_cap must be a positive whole number")
        roles[name] = Role(
            name=name, grants=grants,
            kinds=_kinds(r["statements"], loc, p + ("statements",)) if "statements" in r else DEFAULT_KINDS,
            requires=_mapping(r.get("requires"), loc, p + ("requires",), "requires"),
            otherwise=r.get("otherwise"), row_cap=cap, export=bool(r.get("export", False)),
            unrestricted=bool(r.get("unrestricted", False)),
            flags=frozenset(str(f) for f in r.get("flags") or []),
            functions=frozenset(str(f) for f in r.get("functions") or []), where=loc.where(*p),
            guest_lookups=_positive(r, "guest_lookups", loc, p),
            networks=parse_networks(r.get("networks"), loc, p + ("networks",)),
            row_budget=_budget(r, cap, loc, p), **_emergency(r.get("emergency"), tables, loc, p))
    guards = _guards(d.get("guards"), loc, roles)
    ticket_policy = _tickets(d.get("tickets"), loc, roles)
    for name, role in roles.items():
        if role.otherwise is not None and role.otherwise not in roles:
            raise _err(loc, ("roles", name, "otherwise"), f"unknown role {role.otherwise!r}")
        for t, g in role.grants.items():
            _check_grant_columns(g, tables[t], loc, ("roles", name, "grants", t))
    return Rules(timezone=tz, shifts=tuple(shifts), tables=tables, roles=roles, source=loc.source, guards=guards,
                 tickets=ticket_policy)


def _positive(d: dict[str, Any], key: str, loc: Located, path: tuple[Any, ...]) -> int | None:
    v = d.get(key)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise _err(loc, path + (key,), f"{key} must be a positive whole number")
    return v


def _budget(r: dict[str, Any], cap: int | None, loc: Located,
            path: tuple[Any, ...]) -> tuple[int | None, int | None] | None:
    if r.get("row_budget") is None:
        return None
    b = _mapping(r["row_budget"], loc, path + ("row_budget",), "row_budget")
    _keys(b, {"hour", "day"}, loc, path + ("row_budget",))
    hour, day = (_positive(b, k, loc, path + ("row_budget",)) for k in ("hour", "day"))
    if hour is None and day is None:
        raise _err(loc, path + ("row_budget",), "row_budget needs hour, day or both")
    if cap is None:
        # A statement reserves what it may return before it runs: without a cap that is unbounded.
        raise _err(loc, path + ("row_budget",), "a role with a row_budget needs a row_cap (rows per statement)")
    for k, v in (("hour", hour), ("day", day)):
        if v is not None and v < cap:
            raise _err(loc, path + ("row_budget", k), f"row_budget {k} ({v}) is smaller than row_cap ({cap}): "
                       "no statement could ever run")
    return hour, day


def _emergency(v: Any, tables: Mapping[str, TableRules], loc: Located, path: tuple[Any, ...]) -> dict[str, Any]:
    if v is None:
        return {}
    p = path + ("emergency",)
    e = _mapping(v, loc, p, "emergency")
    _keys(e, {"tables", "hours"}, loc, p)
    names = e.get("tables") or []
    if not isinstance(names, list) or not names:
        raise _err(loc, p + ("tables",), "emergency needs the list of tables it opens")
    for i, t in enumerate(names):
        if t not in tables:
            raise _err(loc, p + ("tables", i), f"table {t!r} is not classified under tables:")
    hours = _positive(e, "hours", loc, p) or 2
    return {"emergency_tables": tuple(map(str, names)), "emergency_hours": hours}


def _tickets(v: Any, loc: Located, roles: Mapping[str, Role]) -> TicketPolicy:
    p = ("tickets",)
    d = _mapping(v, loc, p, "tickets")
    _keys(d, {"approvers", "legal_approvers", "hq_approvers", "approvals_needed", "default_hours", "max_hours",
              "keep_closed_days", "emergency_backing_hours"}, loc, p)
    sets = {}
    for key in ("approvers", "legal_approvers", "hq_approvers"):
        names = d.get(key) or []
        if not isinstance(names, list):
            raise _err(loc, p + (key,), f"{key} is a list of role names")
        for i, r in enumerate(names):
            if r not in roles:
                raise _err(loc, p + (key, i), f"unknown role {r!r}")
        sets[key] = frozenset(map(str, names))
    nums = {k: _positive(d, k, loc, p) for k in ("approvals_needed", "default_hours", "max_hours", "keep_closed_days",
                                                "emergency_backing_hours")}
    return TicketPolicy(**sets, **{k: v for k, v in nums.items() if v is not None})


def _seconds(v: Any, loc: Located, path: tuple[Any, ...]) -> int:
    m = _DURATION.match(str(v))
    if not m:
        raise _err(loc, path, f"expected a duration like 30m, 2h or 1d, not {v!r}")
    unit = m.group(2)[0]
    return int(m.group(1)) * {"m": 60, "h": 3600, "d": 86400}[unit]


def _guards(v: Any, loc: Located, roles: Mapping[str, Role]) -> Guards:
    d = _mapping(v, loc, ("guards",), "guards")
    _keys(d, {"lockout", "unlock_roles"}, loc, ("guards",))
    lock = _mapping(d.get("lockout"), loc, ("guards", "lockout"), "lockout")
    _keys(lock, {"after", "for"}, loc, ("guards", "lockout"))
    after = _positive(lock, "after", loc, ("guards", "lockout")) or 3
    seconds = _seconds(lock.get("for", "30m"), loc, ("guards", "lockout", "for"))
    unlockers = d.get("unlock_roles") or []
    if not isinstance(unlockers, list):
        raise _err(loc, ("guards", "unlock_roles"), "unlock_roles is a list of role names")
    for i, r in enumerate(unlockers):
        if r not in roles:
            raise _err(loc, ("guards", "unlock_roles", i), f"unknown role {r!r}")
    return Guards(lockout_after=after, lockout_seconds=seconds, unlock_roles=frozenset(map(str, unlockers)))


def _resolve_env(v: Any, loc: Located, path: tuple[Any, ...]) -> Any:
    """'env:NAME' anywhere in a mask's parameters reads the secret from the environment."""
    if isinstance(v, str) and v.startswith("env:"):
        val = os.environ.get(v[4:])
        if val is None:
            raise _err(loc, path, f"environment variable {v[4:]} is not set (needed for a mask parameter)")
        return val
    if isinstance(v, dict):
        return {k: _resolve_env(x, loc, path) for k, x in v.items()}
    return v


def _mask(kind: Any, loc: Located, path: tuple[Any, ...]) -> Any:
    """Parse a mask at load time so a bad one is an error with its file:line."""
    kind = _resolve_env(kind, loc, path)
    try:
        from masking.kinds import parse_mask
    except ImportError:  # pragma: no cover - masking is part of the package
        return kind
    try:
        return parse_mask(kind)
    except ValueError as exc:
        raise _err(loc, path, str(exc)) from None


def _check_grant_columns(g: TableGrantRule, t: TableRules, loc: Located, path: tuple[Any, ...]) -> None:
    for c in g.rows:
        if c.kind in ("current_shift", "today", "last") and not t.time_column:
            raise _err(loc, path, f"row condition {c.kind} needs a time_column on table {t.name}")
        if c.kind == "own_department" and not t.department_column:
            raise _err(loc, path, f"own_department needs a department_column on table {t.name}")


def load_rules(path: str | Path) -> Rules:
    data, loc, sources = _load_with_includes(Path(path), ())
    rules = parse_rules(data, loc)
    return dataclasses.replace(rules, source=str(path), sources=sources)


class _Merged(Located):
    """Positions across a rules file and its includes: each key keeps its own file and line."""

    def __init__(self, source: str) -> None:
        super().__init__(source)
        self.files: dict[tuple[Any, ...], str] = {}

    def where(self, *path: Any) -> str:
        while path and path not in self.lines:
            path = path[:-1]
        return f"{self.files.get(path, self.source)}:{self.lines.get(path, 1)}"

    def absorb(self, other: Located, prefix: tuple[Any, ...] = ()) -> None:
        """Take the positions of ``other`` under ``prefix`` (``other`` may itself be merged)."""
        for path, line in other.lines.items():
            if path[:len(prefix)] == prefix:
                self.lines[path] = line
                self.files[path] = other.files.get(path, other.source) if isinstance(other, _Merged) \
                    else other.source


#: Sections an included file may add entries to (a name defined twice is an error).
_INCLUDABLE = ("shifts", "tables", "roles")


def _load_with_includes(path: Path, chain: tuple[Path, ...]) -> tuple[dict[str, Any], _Merged, tuple[str, ...]]:
    """A rules file with ``include: [other.yaml, ...]`` (relative to it) merged in.

    Splitting is for people (a file of roles, a file of table classifications), so merging is
    strict: an entry defined in two files, or a time zone that disagrees, is an error naming both.
    """
    raw, own = load_yaml(path)
    loc = _Merged(str(path))
    loc.absorb(own)
    data = dict(_mapping(raw, loc, (), "the rules file"))
    sources = [str(path)]
    includes = data.pop("include", None)
    if includes is None:
        return data, loc, tuple(sources)
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) and i for i in includes):
        raise _err(loc, ("include",), "include is a file name or a list of them, relative to this file")
    for i, name in enumerate(includes):
        sub_path = (path.parent / name).resolve()  # absolute names too: a symlink loop is a cycle
        if sub_path in chain or sub_path == path.resolve():
            raise _err(loc, ("include", i), f"{name} includes itself (through {' -> '.join(map(str, chain))})")
        if not sub_path.is_file():
            raise _err(loc, ("include", i), f"included file {name!r} does not exist")
        sub, sub_loc, sub_sources = _load_with_includes(sub_path, (*chain, path.resolve()))
        sources.extend(sub_sources)
        for key, value in sub.items():
            if key in _INCLUDABLE:
                section = _mapping(data.setdefault(key, {}), loc, (key,), key)
                for name2, entry in _mapping(value, sub_loc, (key,), key).items():
                    if name2 in section:
                        raise ConfigError(f"{sub_loc.where(key, name2)}: {key[:-1]} {name2!r} is already defined "
                                          f"at {loc.where(key, name2)}")
                    section[name2] = entry
                    loc.absorb(sub_loc, (key, name2))
                data[key] = section
            elif key == "timezone":
                if "timezone" in data and data["timezone"] != value:
                    raise ConfigError(f"{sub_loc.where(key)}: timezone {value!r} disagrees with "
                                      f"{data['timezone']!r} at {loc.where(key)}")
                data[key] = value
                loc.absorb(sub_loc, (key,))
            else:
                raise ConfigError(f"{sub_loc.where(key)}: an included file may hold timezone, shifts, tables "
                                  f"and roles, not {key!r}")
    return data, loc, tuple(sources)


# --- rendering conditions -------------------------------------------------------------------


def _col(name: str) -> exp.Column:
    return exp.column(exp.to_identifier(name, quoted=True))


def _lit(v: Any) -> exp.Expression:
    if isinstance(v, bool):
        return exp.Boolean(this=v)
    if isinstance(v, (int, float)):
        return exp.Literal.number(v)
    return exp.Literal.string(str(v))


def _op(left: exp.Expression, op: str, right: exp.Expression) -> exp.Expression:
    """left OPERATOR(pg_catalog.op) right: no user-defined operator can stand in for it."""
    # OPERATOR(...) has one precedence for every operator in PostgreSQL: parenthesise operands.
    return exp.Operator(this=_atom(left), operator=f"pg_catalog.{op}", expression=_atom(right))


def _atom(e: exp.Expression) -> exp.Expression:
    simple = (exp.Column, exp.Literal, exp.Boolean, exp.Null, exp.Paren, exp.Cast, exp.Case)
    return e.copy() if isinstance(e, simple) else exp.Paren(this=e.copy())


def _sql(template: str, **nodes: exp.Expression) -> exp.Expression:
    """Parse a fixed template and put expression nodes where its placeholders are."""
    tree = sqlglot.parse_one(template, read="postgres")

    def put(n: exp.Expression) -> exp.Expression:
        if isinstance(n, exp.Column) and not n.table and n.name in nodes:
            return nodes[n.name].copy()
        return n

    return tree.transform(put)


def _secondment(p: Principal) -> tuple[str, str, str] | None:
    """(original department, from, until) of a person on secondment (attribute ``secondment``)."""
    sec = p.attributes.get("secondment")
    if not isinstance(sec, Mapping):
        return None
    home, start, until = sec.get("home_department"), sec.get("from"), sec.get("until")
    if not (home and start and until):
        raise ValueError(f"user {p.user}: secondment needs home_department, from and until")
    return str(home), str(start), str(until)


def principal_value(ref: Any, p: Principal) -> Any:
    """'principal.user' / 'principal.department' / 'principal.attributes.x' -> the value; else ref itself."""
    if not isinstance(ref, str) or not ref.startswith("principal."):
        return ref
    parts = ref.split(".")
    if parts[1:] == ["user"]:
        return p.user
    if parts[1:] == ["department"]:
        return p.department
    if len(parts) == 3 and parts[1] == "attributes":
        return p.attributes.get(parts[2])
    raise ValueError(f"unknown principal reference {ref!r}")


def _local_now(tz: str) -> exp.Expression:
    return _sql("pg_catalog.timezone(tz, pg_catalog.statement_timestamp())", tz=_lit(tz))


def _shift_elapsed(rules: Rules) -> exp.Expression:
    """Time since the current shift began, computed by PostgreSQL from the statement's time."""
    t = _sql("CAST(l AS pg_catalog.time)", l=_local_now(rules.timezone))
    ifs = []
    for s in rules.shifts:
        a, b = _lit(s.start.strftime("%H:%M")), _lit(s.end.strftime("%H:%M"))
        if s.start < s.end:
            cond = _sql("t OPERATOR(pg_catalog.>=) CAST(a AS pg_catalog.time) "
                        "AND t OPERATOR(pg_catalog.<) CAST(b AS pg_catalog.time)", t=t, a=a, b=b)
            since = _sql("t OPERATOR(pg_catalog.-) CAST(a AS pg_catalog.time)", t=t, a=a)
        else:  # crosses midnight
            cond = _sql("t OPERATOR(pg_catalog.>=) CAST(a AS pg_catalog.time) "
                        "OR t OPERATOR(pg_catalog.<) CAST(b AS pg_catalog.time)", t=t, a=a, b=b)
            since = _sql("CASE WHEN t OPERATOR(pg_catalog.>=) CAST(a AS pg_catalog.time) "
                         "THEN t OPERATOR(pg_catalog.-) CAST(a AS pg_catalog.time) "
                         "ELSE (t OPERATOR(pg_catalog.-) CAST(a AS pg_catalog.time)) "
                         "OPERATOR(pg_catalog.+) CAST('24 hours' AS pg_catalog.interval) END", t=t, a=a)
        ifs.append(exp.If(this=cond, true=since))
    # Outside every shift: an empty window.
    return exp.Case(ifs=ifs, default=_sql("CAST('-1 second' AS pg_catalog.interval)"))


def condition_sql(c: Condition, t: TableRules, rules: Rules, p: Principal) -> exp.Expression:
    """One row condition as a predicate over the table's own columns, for this principal."""
    if c.kind == "current_shift":
        if not rules.shifts:
            raise ValueError(f"{c.where}: current_shift needs shifts: in the rules")
        col = _col(t.time_column or "")
        now = _sql("pg_catalog.statement_timestamp()")
        since = _sql("n OPERATOR(pg_catalog.-) e", n=now, e=_shift_elapsed(rules))
        return exp.and_(_op(col, ">=", since), _op(col, "<=", now))
    if c.kind == "today":
        day = _sql("pg_catalog.timezone(tz, pg_catalog.date_trunc('day', l))", tz=_lit(rules.timezone),
                   l=_local_now(rules.timezone))
        return _op(_col(t.time_column or ""), ">=", day)
    if c.kind == "last":
        since = _sql("pg_catalog.statement_timestamp() OPERATOR(pg_catalog.-) CAST(i AS pg_catalog.interval)",
                     i=_lit(f"{c.args['amount']} {c.args['unit']}"))
        return _op(_col(t.time_column or ""), ">=", since)
    if c.kind == "own_department":
        if p.department is None:
            return exp.false()  # no department: no department's rows
        home = _secondment(p)
        if home is None:
            return _op(_col(t.department_column or ""), "=", _lit(p.department))
        # Seconded (R1.5): during the window, still only the original department; decided by
        # PostgreSQL at the statement's time, like every other window.
        dept, start, until = home
        now = _sql("pg_catalog.statement_timestamp()")
        during = exp.and_(_op(now, ">=", exp.Cast(this=_lit(start), to=exp.DataType.build("timestamptz"))),
                          _op(now, "<", exp.Cast(this=_lit(until), to=exp.DataType.build("timestamptz"))))
        which = exp.Case(ifs=[exp.If(this=during, true=_lit(dept))], default=_lit(p.department))
        return _op(_col(t.department_column or ""), "=", exp.Paren(this=which))
    if c.kind == "column":
        col = _col(str(c.args["name"]))
        if "equals" in c.args:
            v = principal_value(c.args["equals"], p)
            return exp.false() if v is None else _op(col, "=", _lit(v))
        if "is" in c.args:
            return exp.Is(this=col, expression=_lit(bool(c.args["is"])))
        values = [principal_value(v, p) for v in (c.args.get("in") or c.args.get("not_in") or [])]
        if not values:
            return exp.false() if "in" in c.args else exp.true()
        arr = exp.Array(expressions=[_lit(v) for v in values])
        any_ = _sql("x OPERATOR(pg_catalog.=) ANY(a)", x=col, a=arr)
        return any_ if "in" in c.args else exp.Not(this=exp.Paren(this=_sql("pg_catalog.coalesce(e, false)", e=any_)))
    if c.kind == "owned_through":
        a = c.args
        owner = principal_value(a.get("owner", "principal.user"), p)
        schema, _, name = str(a["table"]).rpartition(".")
        inner = exp.select(_col(str(a["references"]))).from_(
            exp.Table(this=exp.to_identifier(name, quoted=True),
                      db=exp.to_identifier(schema or "public", quoted=True))).where(
            _op(_col(str(a["owner_column"])), "=", _lit(owner)))
        return exp.In(this=_col(str(a["key"])), query=exp.Subquery(this=inner))
    if c.kind == "sql":
        return sqlglot.parse_one(c.args["text"], read="postgres")
    raise ValueError(f"unknown condition {c.kind}")


# --- what one person is granted ----------------------------------------------------------------


def effective_role(rules: Rules, p: Principal) -> tuple[Role | None, str]:
    """The role that applies, following ``otherwise`` when a requirement fails (R1.6), and why."""
    role = rules.roles.get(p.role)
    why = ""
    seen = set()
    while role is not None and role.name not in seen:
        seen.add(role.name)
        failed = [k for k, want in role.requires.items() if p.attributes.get(k) != want]
        if not failed:
            return role, why
        why = (f"role {role.name} requires {', '.join(f'{k}={role.requires[k]!r}' for k in failed)}; "
               f"{p.user} has {', '.join(f'{k}={p.attributes.get(k)!r}' for k in failed)}")
        role = rules.roles.get(role.otherwise) if role.otherwise else None
        if role is not None:
            why += f"; using role {role.name}"
    return None, why or f"role {p.role!r} has no rules"


def grants_for(rules: Rules, p: Principal) -> tuple[StatementGrants | None, str]:
    """StatementGrants for this person (None: nothing at all is granted), and a note saying why."""
    role, why = effective_role(rules, p)
    if role is None:
        return None, why
    tables: dict[str, TableGrant] = {}
    for name, g in role.grants.items():
        t = rules.tables[name]
        conds = [condition_sql(c, t, rules, p) for c in g.rows]
        row_filter = exp.and_(*conds) if conds else None
        cols: dict[str, ColumnRule] = {}
        for col, kind in {**t.sensitive, **g.masks}.items():
            if g.hide_sensitive and col in t.sensitive:
                cols[col] = ColumnRule(Treatment.HIDDEN)
            elif g.unmask is None or col in g.unmask:
                continue
            else:
                cols[col] = ColumnRule(Treatment.MASK, kind)
        for col in g.hide:
            cols[col] = ColumnRule(Treatment.HIDDEN)
        tables[_canonical(name)] = TableGrant(table=_canonical(name), row_filter=row_filter, columns=cols,
                                              kinds=g.kinds, reason=f"{role.name} grant at {g.where}",
                                              subject_key=t.subject_key, record_key=t.record_key,
                                              personal=frozenset(t.sensitive))
    kinds = role.kinds | (frozenset({StatementKind.COPY_TO}) if role.export else frozenset())
    return StatementGrants(tables=tables, kinds=kinds, catalog_relations=CATALOG_RELATIONS,
                           row_cap=role.row_cap, export=role.export, allowed_functions=role.functions,
                           unrestricted=role.unrestricted, role=role.name, flags=role.flags,
                           guest_lookups=role.guest_lookups, row_budget=role.row_budget), why


def grants_with_scope(rules: Rules, p: Principal) -> tuple[StatementGrants | None, str]:
    """grants_for, widened by the ticket or break-glass scope the session carries (if any)."""
    grants, why = grants_for(rules, p)
    cap = p.attributes.get(CAP_ATTRIBUTE)
    if grants is not None and grants.row_cap and isinstance(cap, int) and 0 < cap < grants.row_cap:
        grants = dataclasses.replace(grants, row_cap=cap)
    scope = p.attributes.get(SCOPE_ATTRIBUTE)
    if grants is None or not isinstance(scope, Scope) or grants.unrestricted:
        return grants, why
    return widen(grants, rules.tables, scope, _canonical), why


def _canonical(name: str) -> str:
    """The catalog's key for a table written in YAML ("public.cs_records")."""
    from .catalog import split_qualified

    parts = split_qualified(name)
    from .catalog import qualify

    return qualify(*parts[-2:]) if len(parts) >= 2 else qualify("public", parts[0])


def load_retention(path: str) -> tuple[RetentionRule, ...]:
    """The retention rules of a rules file (time columns from its tables, wherever they are declared)."""
    tables = {name: {"time_column": t.time_column} for name, t in load_rules(path).tables.items()}
    data, loc = load_yaml(path)
    if not isinstance(data, dict):
        return ()
    return parse_retention(data.get("retention"), loc, tables)
