"""`pgwarden migrate` and `pgwarden unlock`: the guard state store from the command line.

Who runs `unlock` is established the way the proxy establishes it: a user of the config
with their password (PGWARDEN_PASSWORD or a prompt), whose role the rules name under
``guards.unlock_roles``. A flag anyone can type would make the circuit breaker decorative.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
from typing import Any

from proxy.config import Config, ConfigError, load_config


def add_guard_commands(sub: Any) -> None:
    m = sub.add_parser("migrate", help="create or update the guard state schema (also done at start)")
    m.add_argument("--config", required=True)
    m.set_defaults(fn=_migrate)
    u = sub.add_parser("unlock", help="lift a lockout (security only; audited)")
    u.add_argument("user", help="the person to unlock")
    add_actor_arguments(u)
    u.set_defaults(fn=_unlock, command="unlock")


def with_state(state: Any, work: Any) -> Any:
    """Run ``work(connection)`` (a coroutine) on one connection to the state store, then close it."""
    from proxy.guards.statestore import connect

    async def run() -> Any:
        conn = await connect(state)
        try:
            return await work(conn)
        finally:
            await conn.close()

    return asyncio.run(run())


def _state_config(args: argparse.Namespace) -> tuple[Config, Any] | int:
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"pgwarden: {exc}", file=sys.stderr)
        return 2
    if cfg.state is None:
        print(f"pgwarden: {args.config} has no state: section (the guard state store)", file=sys.stderr)
        return 2
    return cfg, cfg.state


def _migrate(args: argparse.Namespace) -> int:
    from proxy.guards.statestore import apply_migrations, latest_version

    got = _state_config(args)
    if isinstance(got, int):
        return got
    _, state = got

    try:
        applied = with_state(state, lambda conn: apply_migrations(conn, state.schema))
    except Exception as exc:  # noqa: BLE001 - said plainly
        print(f"pgwarden: cannot migrate the state store: {exc}", file=sys.stderr)
        return 1
    print(f"state schema {state.schema}: " + (f"applied {applied}" if applied else "up to date")
          + f" (version {latest_version(state.schema)})")
    return 0


def authenticate_actor(args: argparse.Namespace) -> tuple[Config, Any, Any, Any] | int:
    """(config, state, rules, principal) of the person running the command, password checked; else an exit code."""
    from rules.model import effective_role, load_rules

    from proxy.auth import check_cleartext
    from rules.principal import Principal

    got = _state_config(args)
    if isinstance(got, int):
        return got
    cfg, state = got
    entry = cfg.users.get(args.actor)
    password = os.environ.get("PGWARDEN_PASSWORD")
    if password is None and entry is not None:
        password = getpass.getpass(f"password for {args.actor}: ")
    if entry is None or not check_cleartext(entry, password or ""):
        print(f"pgwarden: {args.actor!r} is not a user of {args.config}, or the password is wrong", file=sys.stderr)
        return 3
    try:
        rules = load_rules(cfg.rules_path) if cfg.rules_path else None
    except ConfigError as exc:
        print(f"pgwarden: {exc}", file=sys.stderr)
        return 2
    if rules is None:
        print(f"pgwarden: {args.config} names no rules", file=sys.stderr)
        return 2
    actor = Principal(user=entry.name, role=entry.role, department=entry.department,
                      attributes=dict(entry.attributes), application=f"pgwarden {args.command}")
    role, _ = effective_role(rules, actor)
    if role is not None and role.name != actor.role:
        actor = Principal(user=actor.user, role=role.name, department=actor.department,
                          attributes=actor.attributes, application=actor.application)
    return cfg, state, rules, actor


def add_actor_arguments(p: Any) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("--as", dest="actor", default=os.environ.get("PGWARDEN_USER") or getpass.getuser(),
                   help="who you are, a user of the config (default: $PGWARDEN_USER, then your login name); "
                        "the password comes from PGWARDEN_PASSWORD or a prompt")


def _unlock(args: argparse.Namespace) -> int:
    from proxy.audit.log import AuditLog, default_replica
    from proxy.guards.statestore import unlock_on

    got = authenticate_actor(args)
    if isinstance(got, int):
        return got
    cfg, state, rules, actor = got
    allowed = rules.guards.unlock_roles
    if actor.user == args.user:
        print("pgwarden: nobody unlocks themselves; ask another person with the right", file=sys.stderr)
        return 3
    if actor.role not in allowed:
        print(f"pgwarden: role {actor.role} may not unlock users (the rules allow: "
              f"{', '.join(sorted(allowed)) or 'nobody'})", file=sys.stderr)
        return 3

    try:
        lifted = with_state(state, lambda conn: unlock_on(conn, state.schema, args.user))
    except Exception as exc:  # noqa: BLE001 - said plainly
        print(f"pgwarden: cannot reach the state store: {exc}", file=sys.stderr)
        return 1
    audit = AuditLog(cfg.audit_path, replica=default_replica() + ":unlock", key=cfg.audit_key)  # a chain of its own
    try:
        audit.emit("unlock", actor, target=args.user, lifted=lifted)
    finally:
        audit.close()
    print(f"{args.user}: " + ("unlocked" if lifted else "was not locked out"))
    return 0
