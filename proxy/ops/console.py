"""The admin console: database ``pgwarden``, answered by pgwarden itself, in the spirit of pgbouncer's.

A security director (role ``security_director``) or a user listed in ``admin_users`` connects
with any PostgreSQL client to the database ``pgwarden`` and runs ``SHOW CLIENTS``,
``SHOW SESSIONS``, ``SHOW STATS``, ``SHOW RULES``, ``SHOW LOCKOUTS`` or ``RELOAD`` over the
simple query protocol; anyone else is refused at login with 42501. Nothing here reaches the
database server, and every command is audited.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from proxy.wire import codec
from proxy.wire.codes import F, SqlState

if TYPE_CHECKING:
    from rules.principal import Principal
    from proxy.net.server import Server
    from proxy.net.client import ClientSession

DATABASE = "pgwarden"
SYNTAX_ERROR = "42601"
NOT_IN_PREREQUISITE_STATE = "55000"
ADMIN_ROLES = frozenset({"security_director"})
COMMANDS = ("SHOW CLIENTS", "SHOW SESSIONS", "SHOW STATS", "SHOW RULES", "SHOW LOCKOUTS", "RELOAD")

# What psql and drivers look at after login; pgwarden answers as a PostgreSQL of the same major version.
_PARAMETERS = (("server_version", "15.0 (pgwarden console)"), ("server_encoding", "UTF8"),
               ("client_encoding", "UTF8"), ("DateStyle", "ISO, MDY"), ("integer_datetimes", "on"),
               ("standard_conforming_strings", "on"), ("TimeZone", "UTC"), ("application_name", ""))


def may_use(server: Server, principal: Principal) -> bool:
    return principal.role in ADMIN_ROLES or principal.user in server.config.admin_users


def greeting() -> bytes:
    """AuthenticationOk, parameters, a key nobody can cancel with, ReadyForQuery."""
    return (codec.auth_request(0) + b"".join(codec.parameter_status(k, v) for k, v in _PARAMETERS)
            + codec.backend_key_data(0, secrets.token_bytes(4)) + codec.ready_for_query("I"))


async def run(session: ClientSession) -> None:
    """Answer the admin's queries until the client leaves."""
    while True:
        try:
            t, payload = await session._recv()
        except (ConnectionError, codec.ProtocolError):
            session._close_client()
            return
        if t == F.QUERY:
            text = payload.rstrip(b"\x00").decode("utf-8", "replace")
            session._send(answer(session.server, session.principal, text))
        elif t == F.TERMINATE:
            session._close_client()
            return
        else:
            session._send(codec.error_response(
                SqlState.FEATURE_NOT_SUPPORTED, "the pgwarden console speaks the simple query protocol only",
                severity="FATAL"))
            session._close_client()
            return


def answer(server: Server, principal: Principal | None, text: str) -> bytes:
    """Every command of one Query message, then ReadyForQuery (like a server: stop at the first error)."""
    out: list[bytes] = []
    commands = [" ".join(c.split()).upper() for c in text.split(";")]
    commands = [c for c in commands if c] or [""]
    for cmd in commands:
        if not cmd:
            out.append(codec.empty_query_response())
            continue
        known = cmd if cmd in COMMANDS else "unknown"
        server.audit.emit("admin_command", principal, command=known)
        if known == "unknown":
            out.append(codec.error_response(
                SYNTAX_ERROR, f"pgwarden console: unknown command; use one of: {', '.join(COMMANDS)}"))
            break
        try:
            out.append(_COMMANDS[cmd](server))
        except _Failed as exc:
            out.append(codec.error_response(exc.sqlstate, str(exc)))
            break
    out.append(codec.ready_for_query("I"))
    return b"".join(out)


class _Failed(Exception):
    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def _table(names: list[str], rows: list[list[Any]]) -> bytes:
    body = [codec.row_description(names)]
    body.extend(codec.data_row([None if v is None else str(v) for v in r]) for r in rows)
    body.append(codec.command_complete("SHOW"))
    return b"".join(body)


def _time(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def _state(s: ClientSession) -> str:
    if s.principal is not None and s.principal.database == DATABASE:
        return "console"
    if not s.relaying:
        return "login"
    if s.busy():
        return "active"
    return {"T": "idle in transaction", "E": "idle in failed transaction"}.get(s.tx_status, "idle")


def _sessions(server: Server) -> list[ClientSession]:
    return sorted(server.sessions, key=lambda s: server.connected_at.get(s, 0.0))


def show_clients(server: Server) -> bytes:
    rows = []
    for s in _sessions(server):
        p = s.principal
        rows.append([p.user if p else None, p.role if p else None, p.department if p else None, s.client_addr,
                     s.client_port, p.application if p else None, p.database if p else None,
                     "on" if s.tls else "off", p.auth_method if p else None, _state(s),
                     _time(server.connected_at.get(s)), s.statements])
    return _table(["user", "role", "department", "client_addr", "client_port", "application", "database", "tls",
                   "auth_method", "state", "connected_at", "statements"], rows)


def show_sessions(server: Server) -> bytes:
    rows = []
    for s in _sessions(server):
        p = s.principal
        rows.append([p.session_id if p else None, p.user if p else None, s.up_pid or None, s.tx_status,
                     "yes" if s.busy() else "no", s.statements, _time(server.connected_at.get(s))])
    return _table(["session", "user", "upstream_pid", "tx_status", "busy", "statements", "connected_at"], rows)


def show_stats(server: Server) -> bytes:
    cache = server.cache_counts()
    rows: list[list[Any]] = [["sessions_open", len(server.sessions)],
                             ["decision_cache_hits_exact", cache["exact"]],
                             ["decision_cache_hits_template", cache["template"]],
                             ["decision_cache_misses", cache["misses"]]]
    st = server.stats
    if st is None:
        rows.append(["statement_counters", "off (set metrics.listen to count)"])
    else:
        rows += [["connections_accepted", st.accepted], ["logins", st.logins["ok"]],
                 ["logins_refused", sum(v for k, v in st.logins.items() if k != "ok")],
                 ["statements_allowed", st.allowed], ["statements_rewritten", st.rewritten],
                 ["statements_refused", st.refused],
                 ["upstream_errors", sum(st.upstream_errors.values())], ["lockouts", st.lockouts],
                 ["cancel_requests", st.cancels]]
    return _table(["name", "value"], rows)


def show_rules(server: Server) -> bytes:
    rules = server.engine.rules
    rows = []
    if rules is not None:
        for name, role in sorted(rules.roles.items()):
            rows.append([name, ", ".join(sorted(role.grants)), role.row_cap,
                         "yes" if role.unrestricted else "no", server.config.rules_path])
    return _table(["role", "tables", "row_cap", "unrestricted", "file"], rows)


def show_lockouts(server: Server) -> bytes:
    store = server.guards.store
    lockouts = store.current_lockouts() if store is not None else {}
    rows = [[user, _time(until), why] for user, (until, why) in sorted(lockouts.items())]
    return _table(["user", "locked_until", "reason"], rows)


def reload(server: Server) -> bytes:
    if server.config.rules_path and not server.reload_rules():
        raise _Failed(NOT_IN_PREREQUISITE_STATE,
                      "pgwarden: the rules were NOT reloaded (see rules_reload_failed in the audit log); "
                      "the old rules stay")
    if server.config.tls:
        server.reload_tls()
    return codec.command_complete("RELOAD")


_COMMANDS = {"SHOW CLIENTS": show_clients, "SHOW SESSIONS": show_sessions, "SHOW STATS": show_stats,
             "SHOW RULES": show_rules, "SHOW LOCKOUTS": show_lockouts, "RELOAD": reload}
