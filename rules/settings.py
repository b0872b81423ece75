"""The session settings a client may change: one list for SET and for the startup packet.

A setting can change how the server reads or authorises a statement (role,
session_authorization, standard_conforming_strings=off), so only these pass,
whether a client sends them at login (parameters, ``options=-c``) or with SET
later: a setting refused one way must not be accepted the other (it was:
search_path). search_path is on the list because pgwarden follows it: it
resolves names with the session's real path (see proxy/session), and names
every relation it resolves with its schema in the text it sends.
"""

from __future__ import annotations

__all__ = ["SESSION_SETTINGS", "setting_problem"]

SESSION_SETTINGS = frozenset({
    "application_name", "client_encoding", "datestyle", "timezone", "intervalstyle", "extra_float_digits",
    "search_path", "statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout",
    "default_transaction_isolation", "default_transaction_read_only", "bytea_output", "geqo",
    "standard_conforming_strings", "client_min_messages", "jit", "work_mem",
})
_OFF = frozenset({"off", "false", "0", "no"})
_ON = frozenset({"on", "true", "1", "yes", "'on'", "'true'", "'1'", "'yes'"})


def setting_problem(name: str, value: str | None, how: str | None = None) -> str | None:
    """Why this setting may not be changed to ``value`` (None: it may). ``name`` in lower case;
    ``how``: "startup parameter" or "startup option" at login, None for SET."""
    if name not in SESSION_SETTINGS:
        allowed = ", ".join(sorted(SESSION_SETTINGS))
        if how is not None:
            return f"pgwarden: {how} {name!r} is not allowed; allowed settings: {allowed}"
        return f"pgwarden: changing setting {name} is not allowed; refused (allowed settings: {allowed})"
    if name == "jit" and value is not None and value.strip().strip("'").lower() not in _OFF:
        return ("pgwarden: jit may only be switched off (compiling pgwarden's masked statements can keep the "
                "server busy for a minute)")
    if name == "standard_conforming_strings" and value is not None and value.strip().lower() not in _ON:
        return "pgwarden: standard_conforming_strings must stay on (backslashes in strings would be read differently)"
    return None
