"""Sensitive literals never reach the audit log in clear (R2.4), and can still be searched for.

Two rules decide which literals of a logged statement (and of the text
pgwarden sent in its place) are masked:

* **by lineage**: a literal whose value meets a sensitive column in any
  expression, comparison or function (``phone = '...'``, ``phone::text = ...``,
  ``phone ~ ...``, ``strpos(id_number, ...)``, ``SIMILAR TO``,
  ``coalesce(bank_card, '') = ...``, row comparisons, IN lists, LIKE, an
  UPDATE's SET, an INSERT's value for that column). Which columns are
  sensitive follows :mod:`rules.lineage`: through aliases, alias column lists,
  derived tables and CTEs (``SELECT * FROM (SELECT phone AS p ...) t WHERE
  p = ...``), whole-row references, and literals brought in by a derived
  table (``JOIN (SELECT '139...' AS p) v ON c.phone = v.p``). A column name the
  rules classify as sensitive in any table counts wherever it appears:
  over-redacting a log line is cheap, a clear ID number in it is not. The
  literal gets the column's own mask (``'138****5678'``), or ``'***'``.
* **by shape**: any literal, anywhere, holding a resident ID (18 characters
  with a valid GB 11643 check digit), a bank card (16-19 digits passing Luhn,
  optionally in groups of four), a mobile number (11 digits starting with 1,
  optionally 3-4-4) or an e-mail address has that part masked with the kind's
  mask; a comment holding one makes the logged text drop its comments.

Secrets the rules hold (hash-mask salts, which the generated SQL carries) are
replaced by ``'***'`` wherever they appear.

So that security can still find who searched for a value, each redacted
literal leaves a keyed hash (:func:`value_hash`: HMAC-SHA-256 with
``audit.value_key``) in the event's ``value_hashes``; ``pgwarden audit search
--value X`` hashes X the same way. Without a key no hashes are kept.

:func:`redact` never raises: a statement that cannot be parsed or regenerated
is logged as a placeholder (a hostile text must not turn the audit path into
a crash, nor into a clear log line).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlglot
from sqlglot import exp

__all__ = ["Redaction", "sensitive_columns", "redaction_of", "mentions_sensitive", "needs_redaction", "mask_shapes",
           "redact",
           "redact_values", "value_hash", "normalise_value", "shapes", "NOT_REDACTED"]

NOT_REDACTED = "<statement not parsed; not logged in clear>"
_HASH_DOMAIN = b"pgwarden-audit-value\x00"


@dataclass(frozen=True)
class Redaction:
    """What the rules make sensitive, and the key of the value hashes (None: no hashes)."""

    columns: Mapping[str, Any] = field(default_factory=dict)  # column name -> mask spec (first classification)
    tables: Mapping[str, str] = field(default_factory=dict)  # table name (unqualified) -> qualified, if sensitive
    salts: frozenset[str] = frozenset()
    key: bytes | None = None

    def __bool__(self) -> bool:  # "is anything sensitive?", as a plain mapping answered before
        return bool(self.columns)


def sensitive_columns(tables: Mapping[str, Any]) -> dict[str, Any]:
    """column name -> mask spec, over every classified table (the first classification wins)."""
    out: dict[str, Any] = {}
    for t in tables.values():
        for col, spec in t.sensitive.items():
            out.setdefault(col.lower(), spec)
    return out


def redaction_of(tables: Mapping[str, Any], key: bytes | None = None) -> Redaction:
    """The Redaction for the rules' ``tables:`` (and the value-hash key)."""
    salts: set[str] = set()
    for t in tables.values():
        for spec in t.sensitive.values():
            salt = getattr(spec, "params", {}).get("salt") if hasattr(spec, "params") else None
            if isinstance(salt, str) and salt:
                salts.add(salt)
    names = {q.rsplit(".", 1)[-1].lower(): q for q, t in tables.items() if t.sensitive}
    return Redaction(sensitive_columns(tables), names, frozenset(salts), key)


def _as_redaction(sensitive: Redaction | Mapping[str, Any] | None) -> Redaction:
    if isinstance(sensitive, Redaction):
        return sensitive
    return Redaction(dict(sensitive or {}))


def mentions_sensitive(low_sql: str, sensitive: Redaction | Mapping[str, Any]) -> bool:
    """Could this (lower-cased) statement name a sensitive column? U&"..." spells names in escapes."""
    cols = sensitive.columns if isinstance(sensitive, Redaction) else sensitive
    return "u&" in low_sql or any(c in low_sql for c in cols)


# --- shapes ---------------------------------------------------------------------------------------

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
_RESIDENT_ID = re.compile(r"(?<![0-9A-Za-z])\d{17}[\dXx](?![0-9A-Za-z])")
_CARD = re.compile(r"(?<![\d-])(?:\d{16,19}|\d{4}(?:[ -]\d{4}){3}(?:[ -]?\d{1,3})?)(?![\d])")
_MOBILE = re.compile(r"(?<![\d-])(?:1\d{10}|1\d{2}[ -]\d{4}[ -]\d{4})(?![\d])")
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
#: A cheap first look: could the text hold a shaped value at all?
_SHAPE_HINT = re.compile(r"\d{11}|\d{3}[ -]\d{4}[ -]\d{4}|\d{4}[ -]\d{4}[ -]\d{4}|@[A-Za-z0-9-]+\.")


def _valid_resident_id(s: str) -> bool:
    total = sum(int(c) * w for c, w in zip(s[:17], _ID_WEIGHTS))
    return _ID_CHECK[total % 11] == s[17].upper()


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def shapes(text: str) -> list[tuple[int, int, str]]:
    """(start, end, kind) of every resident ID, bank card, mobile number and e-mail address in ``text``."""
    found: list[tuple[int, int, str]] = []
    taken: list[tuple[int, int]] = []

    def free(a: int, b: int) -> bool:
        return all(b <= s or a >= e for s, e in taken)

    for m in _RESIDENT_ID.finditer(text):
        if _valid_resident_id(m.group(0)):
            found.append((m.start(), m.end(), "resident_id"))
            taken.append(m.span())
    for m in _CARD.finditer(text):
        digits = re.sub(r"[ -]", "", m.group(0))
        if 16 <= len(digits) <= 19 and _luhn(digits) and free(*m.span()):
            found.append((m.start(), m.end(), "bank_card"))
            taken.append(m.span())
    for m in _MOBILE.finditer(text):
        if free(*m.span()):
            found.append((m.start(), m.end(), "mobile"))
            taken.append(m.span())
    for m in _EMAIL.finditer(text):
        if free(*m.span()):
            found.append((m.start(), m.end(), "email"))
            taken.append(m.span())
    return sorted(found)


def mask_shapes(text: str) -> str:
    """``text`` with every shaped value masked (for free text the log keeps, e.g. PostgreSQL's error
    messages, which echo literals: ``invalid input syntax for type integer: "139..."``). Never raises."""
    try:
        return _masked_shapes(text) if _SHAPE_HINT.search(text) else text
    except Exception:  # noqa: BLE001
        return "<message not logged in clear>"


def needs_redaction(sql: str, sensitive: Redaction | Mapping[str, Any]) -> bool:
    """Could anything in ``sql`` need redacting? Cheap; errs towards yes: a sensitive column's name, a
    table with sensitive columns (its columns may be renamed or read as a whole row), a shape, a secret."""
    red = _as_redaction(sensitive)
    low = sql.lower()
    return mentions_sensitive(low, red) or any(t in low for t in red.tables) or bool(_SHAPE_HINT.search(sql)) \
        or any(s in sql for s in red.salts)


def has_shapes(sql: str, sensitive: Redaction | Mapping[str, Any] | None = None) -> bool:
    """Does the text hold a shaped value or a secret (decided per text, never from a template)?"""
    red = _as_redaction(sensitive)
    return "u&" in sql.lower() or bool(_SHAPE_HINT.search(sql)) or any(s in sql for s in red.salts)


# --- hashes ----------------------------------------------------------------------------------------


def normalise_value(value: str) -> str:
    """One spelling per value: trimmed; digits without their group separators; e-mail in lower case."""
    v = value.strip()
    if re.fullmatch(r"[\d -]+", v) and re.search(r"\d", v):
        return re.sub(r"[ -]", "", v)
    return v.lower() if "@" in v else v


def value_hash(key: bytes, value: str) -> str:
    """The keyed hash a redacted literal leaves in the audit event (and ``audit search --value`` computes)."""
    return hmac.new(key, _HASH_DOMAIN + normalise_value(value).encode("utf-8"), hashlib.sha256).hexdigest()[:32]


def _hashes(key: bytes | None, text: str) -> list[str]:
    """The hashes one redacted literal leaves: itself, its pattern without wildcards, its shaped parts."""
    if key is None:
        return []
    vals = [text]
    core = text.strip("%_")
    if core and core != text:
        vals.append(core)
    vals.extend(text[a:b] for a, b, _ in shapes(text))
    return [value_hash(key, v) for v in dict.fromkeys(vals) if v.strip()]


# --- masking ---------------------------------------------------------------------------------------


def _masked_text(spec: Any, text: str) -> str:
    try:
        from masking.kinds import mask_value

        value = mask_value(spec, text) if spec is not None else None
    except Exception:  # noqa: BLE001 - a literal the mask cannot take is redacted completely
        value = None
    return "***" if value is None else str(value)


def _masked_shapes(text: str) -> str:
    parts, pos = [], 0
    for a, b, kind in shapes(text):
        parts.append(text[pos:a])
        parts.append(_masked_text(kind, text[a:b]))
        pos = b
    parts.append(text[pos:])
    return "".join(parts)


def redact(sql: str, sensitive: Redaction | Mapping[str, Any], *, catalog: Any = None,
           search_path: Sequence[str] | None = None, skip: Iterable[str] = ()) -> str | None:
    """The statement with sensitive literals masked, or None when there is nothing to redact. Never raises."""
    return redact_values(sql, sensitive, catalog=catalog, search_path=search_path, skip=skip)[0]


def redact_values(sql: str, sensitive: Redaction | Mapping[str, Any], *, catalog: Any = None,
                  search_path: Sequence[str] | None = None,
                  skip: Iterable[str] = ()) -> tuple[str | None, tuple[str, ...]]:
    """(the statement as it may be logged or None if unchanged, keyed hashes of what was redacted).

    ``skip``: SQL texts of SELECTs pgwarden built (fences): their select lists are its own masks,
    not the person's values, and are only checked for shapes and secrets.
    """
    try:
        red = _as_redaction(sensitive)
        if not needs_redaction(sql, red):
            return None, ()
        return _redact(sql, red, catalog, search_path, frozenset(skip))
    except Exception:  # noqa: BLE001 - sqlglot fails in many ways on hostile text; fail closed
        try:
            key = sensitive.key if isinstance(sensitive, Redaction) else None
            return NOT_REDACTED, tuple(dict.fromkeys(h for a, b, _ in shapes(sql) for h in _hashes(key, sql[a:b])))
        except Exception:  # noqa: BLE001
            return NOT_REDACTED, ()


#: Expression nodes in which values meet: a literal among them and a sensitive column are compared.
_CONTEXTS = (exp.Binary, exp.Func, exp.Predicate, exp.Unary, exp.Tuple, exp.Array)
_NOT_CONTEXTS = (exp.Connector, exp.Not, exp.Paren, exp.Alias, exp.Column, exp.Literal, exp.Subquery, exp.Select,
                 exp.SetOperation, exp.Exists, exp.Star, exp.Dot)
_NONE = object()


def _redact(sql: str, red: Redaction, catalog: Any, search_path: Sequence[str] | None,
            skip: frozenset[str]) -> tuple[str | None, tuple[str, ...]]:
    trees = [t for t in sqlglot.parse(sql, read="postgres") if t is not None]
    hashes: list[str] = []
    comments_shaped = _comments_have_secrets(trees, red, hashes)
    out: list[str] = []
    changed = comments_shaped
    for tree in trees:
        if "u&" in sql.lower():
            # sqlglot reads U&"..." identifiers as a bitwise AND: names cannot be trusted, redact every literal.
            for lit in list(tree.find_all(exp.Literal)):
                hashes.extend(_hashes(red.key, str(lit.this)))
                lit.replace(exp.Literal.string("***"))
            changed = True
            out.append(tree.sql(dialect="postgres", comments=False))
            continue
        targets = _lineage_targets(tree, red, catalog, search_path, skip)
        for lit in list(tree.find_all(exp.Literal)):
            text = str(lit.this)
            spec = targets.get(id(lit), _NONE)
            if spec is not _NONE:
                hashes.extend(_hashes(red.key, text))
                lit.replace(exp.Literal.string(_masked_text(spec, text)))
                changed = True
            elif any(s in text for s in red.salts):
                lit.replace(exp.Literal.string("***"))
                changed = True
            elif shapes(text):
                hashes.extend(_hashes(red.key, text))
                new = _masked_shapes(text)
                lit.replace(exp.Literal.string(new) if lit.is_string or not new.isdigit() else exp.Literal.number(new))
                changed = True
        out.append(tree.sql(dialect="postgres", comments=not comments_shaped))
    return (";\n".join(out) if changed else None), tuple(dict.fromkeys(hashes))


def _comments_have_secrets(trees: list[exp.Expression], red: Redaction, hashes: list[str]) -> bool:
    """Does a comment hold a shaped value (hashed into ``hashes``) or a secret? Then comments are dropped."""
    found = False
    for tree in trees:
        for node in tree.walk():
            for c in node.comments or ():
                parts = shapes(c)
                hashes.extend(h for a, b, _ in parts for h in _hashes(red.key, c[a:b]))
                found = found or bool(parts) or any(s in c for s in red.salts)
    return found


def _lineage_targets(tree: exp.Expression, red: Redaction, catalog: Any, search_path: Sequence[str] | None,
                     skip: frozenset[str]) -> dict[int, Any]:
    """Literal node id -> the mask its value gets (None: '***'), for literals that meet a sensitive column."""
    from .lineage import Lineage

    if not red.columns:
        return {}
    try:
        lin: Any = Lineage(tree, catalog, search_path)
    except Exception:  # noqa: BLE001 - lineage failed: fall back to the names in each expression
        lin = None
    own = _own_projections(tree, skip)
    targets: dict[int, Any] = {}

    def add(ids: Iterable[int], spec: Any) -> None:
        for i in ids:
            prev = targets.get(i, _NONE)
            targets[i] = spec if prev is _NONE or prev == spec else None

    for node in tree.walk():
        if not isinstance(node, _CONTEXTS) or isinstance(node, _NOT_CONTEXTS) or id(node) in own:
            continue
        if lin is not None:
            try:
                info = lin.info(node)
                spec = _sensitive_spec(((inst, c, lin.base(inst)) for inst, c in info.reads), red)
                lits = set(info.lits)
            except Exception:  # noqa: BLE001
                spec, lits = _names_spec(node, red), set()
        else:
            spec, lits = _names_spec(node, red), set()
        if spec is _NONE:
            continue
        lits.update(id(lit) for lit in node.find_all(exp.Literal))
        add(lits - own, spec)  # pgwarden's own masks' constants are not the person's values
    if isinstance(tree, exp.Insert):
        _insert_targets(tree, red, lin, add)
    return targets


def _own_projections(tree: exp.Expression, skip: frozenset[str]) -> set[int]:
    """Ids of every node in the select lists of the fences pgwarden built (its masks)."""
    if not skip:
        return set()
    out: set[int] = set()
    for sub in tree.find_all(exp.Subquery):
        body = sub.this
        if isinstance(body, exp.Select) and body.sql(dialect="postgres", comments=False) in skip:
            for item in body.expressions:
                out.update(id(n) for n in item.walk())
    return out


def _sensitive_spec(reads: Iterable[tuple[Any, str, Any]], red: Redaction) -> Any:
    """The mask of the sensitive column a value reads (None: several or unknown), or _NONE."""
    found: list[Any] = []
    for _inst, col, base in reads:
        c = col.lower()
        if c == "*":
            table = (base.rel.name if base is not None and base.rel is not None else
                     base.written if base is not None else "")
            if table.lower() in red.tables:
                found.append(None)
        elif c in red.columns:
            found.append(red.columns[c])
    if not found:
        return _NONE
    first = found[0]
    return first if all(f == first for f in found) else None


def _names_spec(node: exp.Expression, red: Redaction) -> Any:
    return _sensitive_spec((((), c.name, None) for c in node.find_all(exp.Column)), red)


def _insert_targets(tree: exp.Insert, red: Redaction, lin: Any, add: Any) -> None:
    """An INSERT's values for sensitive columns (by position in its column list)."""
    target = tree.this
    if not isinstance(target, exp.Schema):
        return
    names = [c.name.lower() for c in target.expressions if isinstance(c, exp.Identifier)]
    source = tree.args.get("expression")
    rows: list[list[exp.Expression]] = []
    if isinstance(source, exp.Values):
        rows = [r.expressions if isinstance(r, exp.Tuple) else [r] for r in source.expressions]
    elif source is not None and lin is not None:
        cols = lin.outputs(source) or []
        for i, (_, info) in enumerate(cols):
            if i < len(names) and names[i] in red.columns:
                add(info.lits, red.columns[names[i]])
    for row in rows:
        for i, cell in enumerate(row):
            if i < len(names) and names[i] in red.columns:
                add([id(lit) for lit in cell.find_all(exp.Literal)], red.columns[names[i]])
