"""``decide()``: the single entry point the proxy and ``pgwarden explain`` share.

Pure: a Principal, the statement, the catalog snapshot and the session's
context in, a Decision out. With no rules configured pgwarden is a
transparent, audited relay and every statement is allowed as sent; with
rules, everything not granted is refused (R1.7) and whatever cannot be
analysed is refused too (R6.4).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .principal import Principal

from .decision import ALLOW, Decision, refuse
from .redact import Redaction, has_shapes, mentions_sensitive
from .templates import TemplateCache

Context = Mapping[str, Any]  # "search_path": tuple[str, ...] | None
DECISION_CACHE = 20_000


class Engine:
    """Holds the loaded rules; ``decide`` is pure and cheap to call per statement."""

    def __init__(self, rules: Any = None, *, max_tokens: int | None = None, value_key: bytes | None = None) -> None:
        """``value_key``: the key of the hashes redacted literals leave in the audit log (``audit.value_key``)."""
        self.rules = rules
        self.max_tokens = max_tokens  # restricted roles' statements with more tokens are refused
        self._grants: dict[tuple[Any, ...], tuple[Any, str]] = {}
        self._by_principal: dict[int, tuple[Principal, tuple[Any, str]]] = {}
        self._decisions: dict[tuple[Any, ...], Decision] = {}
        self._pinned: dict[int, Any] = {}
        self._templates = TemplateCache()
        self._sensitive = Redaction(key=value_key)
        # Read by /metrics: decisions from the exact-text cache, from a verified template, and full analyses.
        self.cache_hits = 0
        self.template_hits = 0
        self.cache_misses = 0
        if rules is not None:
            from .redact import redaction_of

            self._sensitive = redaction_of(rules.tables, value_key)

    @property
    def enforcing(self) -> bool:
        return self.rules is not None

    def grants(self, principal: Principal) -> tuple[Any, str]:
        """What this person is granted (cached per identity: the rules object is immutable)."""
        fast = self._by_principal.get(id(principal))
        if fast is not None and fast[0] is principal:  # the per-statement path: one dict lookup
            return fast[1]
        key = (principal.user, principal.role, principal.department,
               tuple(sorted((k, repr(v)) for k, v in principal.attributes.items())))
        hit = self._grants.get(key)
        if hit is None:
            from .model import grants_with_scope

            hit = grants_with_scope(self.rules, principal)
            if len(self._grants) > 10_000:
                # Decisions are keyed by the id of a grants object: they go together.
                self._grants.clear()
                self._decisions.clear()
                self._by_principal.clear()
                self._templates = TemplateCache()
            self._grants[key] = hit
        if len(self._by_principal) > 10_000:
            self._by_principal.clear()
        self._by_principal[id(principal)] = (principal, hit)
        return hit

    def loggable(self, sql: str) -> str:
        """The statement as the audit log may show it: sensitive literals masked (R2.4)."""
        if not self._sensitive:
            return sql
        from .redact import redact

        return redact(sql, self._sensitive) or sql

    def restricted(self, principal: Principal) -> bool:
        """Does this person get rewritten statements and trimmed error details?"""
        if self.rules is None:
            return False
        grants, _ = self.grants(principal)
        return grants is None or not grants.unrestricted

    def decide(self, principal: Principal, sql: str, catalog: Any = None, context: Context | None = None) -> Decision:
        """allow | rewrite | refuse for one statement text; never raises (R6.4: fail closed)."""
        got = self.prepare(principal, sql, catalog, context)
        if isinstance(got, Decision):
            return got
        return self.finish(got, self.run(got))

    def prepare(self, principal: Principal, sql: str, catalog: Any = None,
                context: Context | None = None) -> Decision | Job:
        """The decision if it is known without analysing (no rules, cached, trivially refused),
        else the Job an analysis needs: the caller runs it here (:meth:`run`) or in a worker
        process (:func:`analyse`), then hands the result to :meth:`finish`."""
        if self.rules is None:
            # A transparent relay still logs no ID number, card, mobile or e-mail in clear (R2.4).
            return redacted(sql, ALLOW, self._sensitive) if has_shapes(sql) else ALLOW
        try:
            grants, why = self.grants(principal)
            if grants is None:
                return redacted(sql, refuse(f"pgwarden: {principal.user} may not run statements here: {why}"),
                                self._sensitive)
            if grants.unrestricted:
                return redacted(sql, ALLOW, self._sensitive)
            if catalog is None:
                return refuse("pgwarden: the database catalog is not loaded, so the statement cannot be checked; "
                              "try again in a moment")
            search_path = (context or {}).get("search_path")
            sp = tuple(search_path) if search_path is not None else None
            # Decisions depend only on the text, what this person is granted, the catalog and the
            # search_path: time windows are evaluated by PostgreSQL, not here.
            key = (sql, id(grants), id(catalog), sp)
            hit = self._decisions.get(key)
            if hit is not None:
                self.cache_hits += 1
                return hit
            return Job(key, sql, grants, catalog, sp, self._sensitive, self.max_tokens)
        except Exception as exc:  # noqa: BLE001 - a bug or a library failure on hostile text refuses
            return _engine_error(exc)

    def run(self, job: Job) -> Decision:
        """Analyse here, reusing verified templates of statements that differ only in literals."""
        try:
            if mentions_sensitive(job.sql.lower(), self._sensitive) or has_shapes(job.sql, self._sensitive):
                self.cache_misses += 1
                return analyse(job)  # literals to redact: decided on their own
            analyses = self.cache_misses

            def full(text: str) -> Decision:
                # Redacted by lineage too (a renamed sensitive column): such a shape is never templated.
                self.cache_misses += 1
                return redacted(text, _rewritten(text, job), job.sensitive, job.catalog, job.search_path)

            d = self._templates.decide(job.sql, (id(job.grants), id(job.catalog), job.search_path), full)
            if self.cache_misses == analyses:
                self.template_hits += 1
            return with_lookups(job, d)
        except Exception as exc:  # noqa: BLE001 - fail closed
            return _engine_error(exc)

    def finish(self, job: Job, d: Decision) -> Decision:
        """Keep the decision for the next time this text comes, with what it was decided against."""
        if len(self._decisions) >= DECISION_CACHE:
            # Templates are keyed by object ids too: they go with the pins that keep ids unique.
            self._decisions.clear()
            self._pinned.clear()
            self._templates = TemplateCache()
        self._pinned[id(job.catalog)] = job.catalog  # keeps the id from being reused while cached
        self._decisions[job.key] = d
        return d


@dataclass(frozen=True, slots=True)
class Job:
    """One uncached analysis: everything it depends on, so it can run in another process."""

    key: tuple[Any, ...]
    sql: str
    grants: Any  # rules.grants.StatementGrants
    catalog: Any  # rules.catalog.Catalog
    search_path: tuple[str, ...] | None
    sensitive: Redaction
    max_tokens: int | None = None


def analyse(job: Job) -> Decision:
    """The full analysis of one statement: rewrite (with PostgreSQL's parser confirming it), the
    masks and flags for the audit log, guest lookups, redaction. Pure; never raises."""
    try:
        d = redacted(job.sql, _rewritten(job.sql, job), job.sensitive, job.catalog, job.search_path)
        return with_lookups(job, d)
    except Exception as exc:  # noqa: BLE001 - fail closed
        return _engine_error(exc)


def _engine_error(exc: Exception) -> Decision:
    return refuse(f"pgwarden: statement could not be analysed ({type(exc).__name__}); refused",
                  reason=f"engine error: {exc!r}"[:300])


def _rewritten(text: str, job: Job) -> Decision:
    from .rewrite import rewrite

    try:
        d = rewrite(text, job.grants, job.catalog, job.search_path, max_tokens=job.max_tokens)
    except Exception as exc:  # noqa: BLE001 - fail closed (R6.4), never pass what was not analysed
        d = _engine_error(exc)
    return annotated(d, job.grants, job.catalog)


def with_lookups(job: Job, d: Decision) -> Decision:
    """The guests this statement looks up, for a role with a per-guest quota (R3.4)."""
    grants = job.grants
    if not grants.guest_lookups or d.action != "rewrite":
        return d
    from .lookups import UnclearLookup, find_lookups

    try:
        found = find_lookups(job.sql, grants, job.catalog, job.search_path)
    except UnclearLookup as u:
        keys = sorted({g.subject_key for g in grants.tables.values() if g.subject_key})
        hint = u.hint or f"look guests up with {' / '.join(keys)} = value or IN (values)"
        return redacted(job.sql, refuse(
            f"pgwarden: role {grants.role} has a per-guest lookup quota, and this statement constrains a "
            f"guest key in a way that cannot be counted ({u}); {hint}", reason=f"unclear guest lookup: {u}"),
            job.sensitive, job.catalog, job.search_path)
    return dataclasses.replace(d, lookups=found) if found else d


def annotated(d: Decision, grants: Any, catalog: Any) -> Decision:
    """What the audit event says beyond the verdict: the masks and hidden columns the statement
    read (all of its tables' when that is not known), role flags."""
    from .grants import Treatment

    masked, hidden = [], []
    read = d.columns_read
    for t in d.tables:
        g = grants.tables.get(t)
        rel = catalog.relations.get(t) if g is None else None
        named = t
        if rel is not None:  # a partition or inheritance child: its root's grant applies
            t = catalog.root_of(rel).qualified_name
            g = grants.tables.get(t)
        for col, rule in (g.columns.items() if g is not None else ()):
            if read is not None and f"{named}.{col}" not in read and f"{t}.{col}" not in read:
                continue
            if rule.treatment == Treatment.MASK:
                masked.append(f"{t}.{col}")
            elif rule.treatment == Treatment.HIDDEN:
                hidden.append(f"{t}.{col}")
    flags = tuple(sorted(grants.flags))
    masked, hidden = list(dict.fromkeys(masked)), list(dict.fromkeys(hidden))
    if not (masked or hidden or flags):
        return d
    return dataclasses.replace(d, masked=tuple(masked), hidden=tuple(hidden), flags=flags)


def redacted(sql: str, d: Decision, sensitive: Redaction | Mapping[str, Any], catalog: Any = None,
             search_path: Sequence[str] | None = None) -> Decision:
    """Attach the statement and the text sent as they may be logged (R2.4), if either differs,
    with the keyed hashes of what was redacted."""
    from .redact import redact_values

    text, hashes = redact_values(sql, sensitive, catalog=catalog, search_path=search_path)
    sent = None
    # The text sent holds the client's literals (where the client's text needs none redacted, neither does
    # it) and pgwarden's own constants: only a mask salt or a shaped value there needs a look of its own.
    if d.sql and (text is not None or has_shapes(d.sql, sensitive)):
        skip = d.reading.bodies if d.reading is not None else ()
        sent, more = redact_values(d.sql, sensitive, catalog=catalog, search_path=search_path, skip=skip)
        hashes += more
    if text is None and sent is None:
        return d
    return dataclasses.replace(d, redacted=text or sql, redacted_sql=sent or d.sql,
                               value_hashes=tuple(dict.fromkeys(hashes)))


def decide(principal: Principal, sql: str, catalog: Any = None, context: Context | None = None, *,
           engine: Engine | None = None) -> Decision:
    return (engine or Engine()).decide(principal, sql, catalog, context)
