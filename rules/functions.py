"""Which functions a restricted role may call: one policy, read by both parsers.

The rewriter applies it to sqlglot's reading of a statement, :mod:`rules.pgconfirm`
to PostgreSQL's reading of the text that is sent; both ask :func:`call_problem`.
"""

from __future__ import annotations

from collections.abc import Sequence

from .catalog import Catalog
from .grants import StatementGrants

__all__ = ["REFUSED_FUNCTIONS", "refused", "call_problem"]

#: Built-in functions that run SQL text, touch files, large objects, other databases,
#: settings, other sessions, or write (names in lower case).
REFUSED_FUNCTIONS = frozenset({
    "query_to_xml", "query_to_xmlschema", "query_to_xml_and_xmlschema",
    "table_to_xml", "table_to_xmlschema", "table_to_xml_and_xmlschema",
    "cursor_to_xml", "cursor_to_xmlschema",
    "database_to_xml", "database_to_xmlschema", "database_to_xml_and_xmlschema",
    "schema_to_xml", "schema_to_xmlschema", "schema_to_xml_and_xmlschema",
    "ts_stat", "ts_rewrite", "pg_read_file", "pg_read_binary_file", "pg_stat_file", "set_config",
    "pg_terminate_backend", "pg_cancel_backend", "pg_reload_conf", "pg_rotate_logfile", "pg_promote",
    "pg_switch_wal", "pg_create_restore_point", "pg_notify", "setval", "nextval",
    "pg_import_system_collations", "pg_log_backend_memory_contexts", "loread", "lowrite",
    "pg_backup_start", "pg_backup_stop", "pg_start_backup", "pg_stop_backup", "pg_drop_replication_slot",
    "pg_replication_origin_create", "pg_get_backend_memory_contexts", "pg_current_logfile",
    # the text of the statement as the server runs it: the rewritten form, mask parameters included
    "current_query",
    # statistics of rows the role may not see
    "pg_sequence_last_value",
})
_REFUSED_PREFIXES = ("dblink", "lo_", "pg_ls_", "pg_file_", "pg_logical_", "pg_replication_",
                     "pg_create_", "pg_copy_", "pg_stat_reset", "pg_stat_get_", "pg_wal_replay_")


def refused(name: str) -> bool:
    """A built-in no restricted role may call, whatever the rules say (``name`` in lower case)."""
    return name in REFUSED_FUNCTIONS or name.startswith(_REFUSED_PREFIXES)


def call_problem(name: Sequence[str], catalog: Catalog, search_path: Sequence[str] | None,
                 grants: StatementGrants) -> str | None:
    """Why a call of ``name`` (schema parts, then the name) is not allowed; None if it is.

    An empty answer from the catalog is "unknown": refused, as is every candidate that is
    neither built in nor allowed by the rules (PostgreSQL picks among them by argument types).
    """
    if not name:
        return "a function call without a name"
    base = name[-1].lower()
    if refused(base):
        return f"function {base} is not allowed"
    cands = catalog.resolve_function(tuple(name), search_path)
    if not cands:
        return f"function {'.'.join(name)} is unknown to pgwarden's catalog"
    for f in cands:
        if not f.is_builtin and f.qualified_name not in grants.allowed_functions:
            return f"function {f.qualified_name} is not allowed"
    return None
