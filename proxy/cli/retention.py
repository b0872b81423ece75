"""``pgwarden retention plan|apply``: delete what the retention rules say has been kept long enough.

``plan`` (the default) counts, per rule, the rows that would go and the
legal-hold rows that are spared; ``apply`` deletes them in batches, one
transaction per rule, so a failure leaves each rule all done or not done.
Both write an audit event per rule (``event: retention``) to the configured
audit log, chained under their own replica name (``HOST:retention``), so the
deletion is as traceable as any statement. The cutoff of a rule is computed
once by PostgreSQL (``now() - keep``) and used for its count and its deletes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from rules.retention import RetentionRule, condition, count_sql, delete_batch_sql, held_condition

from proxy.audit.log import AuditLog

BATCH = 5000


@dataclass
class RuleResult:
    rule: RetentionRule
    cutoff: datetime
    rows: int  # to delete (plan) or deleted (apply)
    held: int  # spared by legal hold
    legal_hold: str | None


async def _legal_hold_column(conn: Any, rule: RetentionRule) -> str | None:
    if rule.legal_hold:
        return rule.legal_hold
    schema, _, table = rule.table.rpartition(".")
    found = await conn.fetchval(
        "SELECT a.attname FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2 "
        "AND a.attname = 'legal_hold' AND a.atttypid = 'pg_catalog.bool'::pg_catalog.regtype AND NOT a.attisdropped",
        schema or "public", table)
    return str(found) if found else None


async def run(conn: Any, rules: tuple[RetentionRule, ...], *, apply: bool, audit: AuditLog | None,
              batch: int = BATCH, actor: str = "") -> list[RuleResult]:
    """Plan or apply every rule, in order; audit each."""
    out: list[RuleResult] = []
    for rule in rules:
        hold = await _legal_hold_column(conn, rule)
        cutoff = await conn.fetchval("SELECT now() - $1::text::interval", rule.keep)
        cond = condition(rule, hold)
        held = await conn.fetchval(count_sql(rule, held_condition(rule, hold)), cutoff) if hold else 0
        if apply:
            rows = 0
            async with conn.transaction():
                while True:
                    status = await conn.execute(delete_batch_sql(rule, cond), cutoff, batch)
                    n = int(status.split()[-1])
                    rows += n
                    if n < batch:
                        break
        else:
            rows = await conn.fetchval(count_sql(rule, cond), cutoff)
        res = RuleResult(rule, cutoff, int(rows), int(held), hold)
        out.append(res)
        if audit is not None:
            audit.emit("retention", None, mode="apply" if apply else "plan", table=rule.table, rule=rule.name,
                       keep=rule.keep, cutoff=cutoff.isoformat(), rows=res.rows, legal_hold_spared=res.held,
                       legal_hold_column=hold, rule_at=rule.where, actor=actor,
                       tables=[rule.table])
    return out


def render(results: list[RuleResult], *, apply: bool) -> list[str]:
    verb = "deleted" if apply else "to delete"
    lines = []
    for r in results:
        spared = f", {r.held} spared by legal hold" if r.legal_hold else ", no legal-hold column"
        lines.append(f"{r.rule.table}  {r.rule.name} (keep {r.rule.keep}, older than "
                     f"{r.cutoff:%Y-%m-%d %H:%M:%S%z}): {r.rows} {verb}{spared}")
    if not apply:
        lines.append("dry run: nothing deleted (pgwarden retention apply deletes)")
    return lines
