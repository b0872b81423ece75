"""What one person may do with each table, resolved for one statement: the contract
between the rules model (YAML -> roles -> this) and the SQL rewriter (this -> SQL').

Everything here is a plain value. Row filters are sqlglot expressions over the
table's own column names (unqualified) that the rewriter places inside the
fenced derived table; they are built from the YAML vocabulary by the rules
model, never spliced from text at statement time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

from sqlglot import exp


class StatementKind(str, Enum):
    """Statement kinds a role may be granted (an allow-list: anything else is refused)."""

    SELECT = "select"  # SELECT / WITH / VALUES / TABLE / set operations, DECLARE/FETCH/CLOSE of those
    INSERT = "insert"
    UPDATE = "update"
    DELETE = "delete"
    COPY_TO = "copy_to"  # export: COPY (query) TO STDOUT
    COPY_FROM = "copy_from"
    SHOW = "show"
    SET = "set"  # safe session settings only
    TRANSACTION = "transaction"  # BEGIN / COMMIT / ROLLBACK / SAVEPOINT ...
    EXPLAIN = "explain"


class Treatment(str, Enum):
    CLEAR = "clear"
    MASK = "mask"
    HIDDEN = "hidden"  # projects as NULL::type in SELECT *; naming it explicitly is refused


@dataclass(frozen=True)
class ColumnRule:
    treatment: Treatment = Treatment.CLEAR
    mask: object | None = None  # masking.MaskSpec when treatment is MASK


@dataclass(frozen=True)
class TableGrant:
    """One protected table as this principal may see it in this statement."""

    table: str  # qualified root table name, e.g. "public.cs_records" (partitions inherit it)
    row_filter: exp.Expression | None  # None: every row
    columns: Mapping[str, ColumnRule] = field(default_factory=dict)  # absent column: CLEAR
    kinds: frozenset[StatementKind] = frozenset({StatementKind.SELECT})
    reason: str = ""  # which YAML rule produced it (for explain and the audit log)
    subject_key: str | None = None  # the column naming the guest a row is about (lookup quotas, R3.4)
    #: The column naming one record (``id``): picking rows by it looks a guest up (rules.lookups).
    record_key: str | None = None
    #: The columns the rules classify as personal data (``sensitive:``), masked or not for this role.
    personal: frozenset[str] = frozenset()


@dataclass(frozen=True)
class StatementGrants:
    """Everything the rewriter needs for one principal: the tables it may touch and role-wide rights.

    Default deny (R1.7): a user relation that is not in ``tables`` is refused, and a system
    relation (pg_catalog, information_schema) only if it is in ``catalog_relations``, an
    allow-list of what drivers and BI tools read to describe the schema; the catalog views
    that reveal data or statistics (pg_stats, pg_statistic, pg_stat_activity, ...) are not on it.
    """

    tables: Mapping[str, TableGrant]  # qualified root table -> grant
    kinds: frozenset[StatementKind]  # role-wide statement kinds
    catalog_relations: frozenset[str] = frozenset()  # qualified system relations readable
    row_cap: int | None = None
    export: bool = False
    allowed_functions: frozenset[str] = frozenset()  # qualified user-defined functions the rules allow
    unrestricted: bool = False  # e.g. the DBA's break-glass role: statements pass as sent (still audited)
    role: str = ""
    flags: frozenset[str] = frozenset()  # e.g. internal_audit: every statement flagged in the audit log
    guest_lookups: int | None = None  # per guest per calendar month (R3.4); None: no quota
    row_budget: tuple[int | None, int | None] | None = None  # rows per rolling (hour, day) (R3.3)
