"""``pgwarden audit verify|search|report`` and ``pgwarden retention plan|apply``: the security side's tools.

Kept apart from ``proxy.cli`` (which only calls ``add_commands``): each
command reads files or the database and hands the work to an I/O-free core
(``audit_verify``, ``audit_search``, ``audit_report``, ``rules.retention``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from proxy.config import Config, ConfigError, load_config


def _config_and_rules(args: argparse.Namespace) -> tuple[Config, str]:
    """The configuration and the rules file: --rules, else rules: in the configuration."""
    cfg = load_config(args.config)
    rules_path = args.rules or cfg.rules_path
    if not rules_path:
        raise ConfigError("no rules: give --rules or set rules: in the config")
    return cfg, rules_path


def _read_key(spec: str) -> bytes:
    """``env:NAME`` or ``file:PATH`` (as in the config's audit.key)."""
    import os

    from proxy.audit.chain import MIN_KEY_BYTES

    if spec.startswith("env:"):
        raw = os.environ.get(spec[4:])
        if not raw:
            raise ConfigError(f"--key {spec}: the environment variable is not set")
        key = raw.strip().encode()
    elif spec.startswith("file:"):
        try:
            with open(spec[5:], "rb") as f:
                key = f.read().strip()
        except OSError as exc:
            raise ConfigError(f"--key {spec}: {exc}") from None
    else:
        raise ConfigError(f"--key {spec!r}: give env:VARIABLE or file:/path (never the key itself on a command line)")
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"--key {spec}: an audit key has at least {MIN_KEY_BYTES} bytes")
    return key


def _verification(args: argparse.Namespace, files: list[str]) -> Any:
    """Verify ``files`` with the keys (--key, the config's audit.key) and the anchors (the config's state
    store, or --anchors-dsn) the command line gives; ConfigError / OSError for what cannot be read."""
    from proxy.audit.chain import key_id
    from proxy.audit.files import numbered_lines
    from proxy.audit.verify import verify

    keys: dict[str, bytes] = {}
    cfg = load_config(args.config) if getattr(args, "config", None) else None
    if cfg is not None and cfg.audit_key is not None:
        keys[key_id(cfg.audit_key)] = cfg.audit_key
    for spec in getattr(args, "key", None) or []:
        k = _read_key(spec)
        keys[key_id(k)] = k
    anchors = None
    anchored = ""
    dsn = getattr(args, "anchors_dsn", None)
    if not getattr(args, "no_anchors", False) and (dsn or (cfg is not None and cfg.state is not None)):
        anchors, anchored = asyncio.run(_fetch_anchors(cfg, dsn, getattr(args, "anchors_schema", None)))
    return verify(numbered_lines(files), from_start=getattr(args, "from_start", False), keys=keys or None,
                  anchors=anchors, anchored=anchored, partial=getattr(args, "partial", False))


async def _fetch_anchors(cfg: Config | None, dsn: str | None, schema: str | None) -> tuple[dict[str, Any], str]:
    import asyncpg

    from proxy.audit.anchors import load_anchors
    from proxy.guards.statestore import connect

    try:
        if dsn:
            conn = await asyncpg.connect(dsn)
            where = "the store at --anchors-dsn"
        else:
            assert cfg is not None and cfg.state is not None
            conn = await connect(cfg.state)
            where = f"the state store {cfg.state.user}@{cfg.state.host}:{cfg.state.port}/{cfg.state.database}"
        sch = schema or (cfg.state.schema if cfg is not None and cfg.state is not None else "pgwarden")
        try:
            return await load_anchors(conn, sch), f"{where} ({sch}.audit_anchors)"
        finally:
            await conn.close()
    except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as exc:
        raise ConfigError(f"the audit anchors cannot be read from the state store: {type(exc).__name__}: {exc}"
                          " (--no-anchors verifies without them)") from None


def _audit_verify(args: argparse.Namespace) -> int:
    from proxy.audit.verify import render

    try:
        result = _verification(args, args.files)
    except (OSError, ConfigError) as exc:
        print(f"pgwarden: {exc}", file=sys.stderr)
        return 2
    if not result.chains and not result.broken:
        print("pgwarden: no audit events in the files given", file=sys.stderr)
        return 1
    for line in render(result):
        print(line)
    return 0 if result.ok else 1


def _subject_keys(rules_path: str | None) -> dict[str, str]:
    """Which column names the guest in each table (from the rules), for guest searches."""
    if not rules_path:
        return {}
    from rules.model import load_rules

    rules = load_rules(rules_path)
    return {name: t.subject_key for name, t in rules.tables.items() if t.subject_key}


def _value_digest(args: argparse.Namespace) -> str | None:
    """The keyed hash of --value: the key is audit.value_key (--config) or PGWARDEN_AUDIT_VALUE_KEY."""
    import os

    from rules.redact import value_hash

    key: bytes | None = None
    if args.config:
        key = load_config(args.config).audit_value_key
    elif os.environ.get("PGWARDEN_AUDIT_VALUE_KEY"):
        key = os.environ["PGWARDEN_AUDIT_VALUE_KEY"].encode()
    if key is None:
        print("pgwarden: no audit.value_key (--config, or PGWARDEN_AUDIT_VALUE_KEY): only values logged in clear "
              "are found", file=sys.stderr)
        return None
    return value_hash(key, args.value)


def _audit_search(args: argparse.Namespace) -> int:
    import orjson

    from proxy.audit.files import events
    from proxy.audit.search import Filters, parse_when, search, table_header, table_row

    try:
        keys = _subject_keys(args.rules)
        digest = _value_digest(args) if args.value is not None else None
        f = Filters(user=args.user, role=args.role, guest=args.guest, table=args.table, decision=args.decision,
                    ticket=args.ticket, receipt=args.receipt, event=args.event,
                    since=parse_when(args.since) if args.since else None,
                    until=parse_when(args.until) if args.until else None,
                    value=args.value, value_hash=digest)
    except (ConfigError, ValueError) as exc:
        print(f"pgwarden: {exc}", file=sys.stderr)
        return 2
    if args.guest and not keys:
        print("pgwarden: --guest needs --rules (the rules say which column identifies the guest in each table)",
              file=sys.stderr)
        return 2
    n = 0
    out = sys.stdout
    if not args.json:
        print(table_header())
    for ev in search(events(args.files), f, keys):
        n += 1
        if args.json:
            out.buffer.write(orjson.dumps(ev) + b"\n")
        else:
            print(table_row(ev))
    out.flush()
    if not args.json:
        print(f"({n} event{'' if n == 1 else 's'})", file=sys.stderr)
    return 0


def _audit_report(args: argparse.Namespace) -> int:
    from datetime import datetime, time, timezone
    from zoneinfo import ZoneInfo

    from proxy.audit.files import events
    from proxy.audit.report import Window, render_html, summarise
    from proxy.audit.search import parse_when

    try:
        now = datetime.now(timezone.utc)
        since = parse_when(args.since, now)
        until = parse_when(args.until, now) if args.until else now
        start, _, end = args.off_hours.partition("-")
        off = Window(time.fromisoformat(start), time.fromisoformat(end))
        keys: dict[str, str] = {}
        shifts: dict[str, Window] = {}
        tz, tz_name = timezone.utc, "UTC"
        if args.rules:
            from rules.model import load_rules

            rules = load_rules(args.rules)
            keys = {n: t.subject_key for n, t in rules.tables.items() if t.subject_key}
            shifts = {sh.name: Window(sh.start, sh.end) for sh in rules.shifts}
            tz, tz_name = ZoneInfo(rules.timezone), rules.timezone
        user_shifts: dict[str, str] = {}
        if args.config:
            cfg = load_config(args.config)
            user_shifts = {u.name: str(u.attributes["shift"]) for u in cfg.users.values() if "shift" in u.attributes}
    except (ConfigError, ValueError) as exc:
        print(f"pgwarden: {exc}", file=sys.stderr)
        return 2
    from proxy.audit.verify import render as render_verify, verdict

    try:  # R5.2 and issue 14: a report says whether what it counts was verified, and against what
        result = _verification(args, args.files)
        status, line = verdict(result)
        details = render_verify(result)
    except (OSError, ConfigError) as exc:
        status, line, details = "NOT VERIFIED", f"the chain could not be verified: {exc}", []
    summary = summarise(events(args.files), since=since, until=until, tz=tz, tz_name=tz_name, keys=keys,
                        shifts=shifts, user_shifts=user_shifts, off_hours=off)
    page = render_html(summary, verification=(status, line, details))
    with open(args.html, "w", encoding="utf-8") as f:
        f.write(page)
    print(f"{args.html}: {summary.statements} statements by {len(summary.users)} people, "
          f"{len(summary.refusals)} refused, {len(summary.off_shift)} off shift, "
          f"{len(summary.general_manager)} general-manager accesses; {line}")
    return 0


def _retention(args: argparse.Namespace) -> int:
    """Plan (dry run, the default) or apply the retention rules; every rule is audited either way."""
    import getpass

    from rules.model import load_retention

    from proxy.audit.log import AuditLog, default_replica
    from proxy.cli.retention import render, run

    try:
        cfg, rules_path = _config_and_rules(args)
        retention = load_retention(rules_path)
    except ConfigError as exc:
        print(f"pgwarden: {exc}", file=sys.stderr)
        return 2
    if not retention:
        print(f"pgwarden: {rules_path} has no retention: section", file=sys.stderr)
        return 2
    apply = args.action == "apply"

    async def go() -> list[Any]:
        import asyncpg

        up = cfg.upstream
        if args.dsn:
            conn = await asyncpg.connect(args.dsn)
        else:
            conn = await asyncpg.connect(host=up.host, port=up.port, user=up.user, password=up.password,
                                         database=args.database, ssl=False if up.sslmode == "disable" else "prefer")
        audit = AuditLog(cfg.audit_path, replica=default_replica() + ":retention", key=cfg.audit_key)
        try:
            return await run(conn, retention, apply=apply, audit=audit, batch=args.batch, actor=getpass.getuser())
        finally:
            audit.close()
            await conn.close()

    try:
        results = asyncio.run(go())
    except Exception as exc:  # noqa: BLE001 - a database problem, said plainly; each rule is its own transaction
        print(f"pgwarden: retention {args.action} failed: {exc}", file=sys.stderr)
        return 1
    for line in render(results, apply=apply):
        print(line)
    return 0


def _verify_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key", action="append", metavar="env:VAR|file:PATH",
                   help="an HMAC key the chain was sealed with (repeat for rotated keys)")
    if not any(a.dest == "config" for a in p._actions):
        p.add_argument("--config", "-c", help="pgwarden configuration: audit.key and the state store's anchors")
    p.add_argument("--anchors-dsn", help="read the anchors from this PostgreSQL DSN instead (a read-only login)")
    p.add_argument("--anchors-schema", help="schema of the audit_anchors table (default: the state's, or pgwarden)")
    p.add_argument("--no-anchors", action="store_true", help="do not check against the state store's anchors")


def add_commands(sub: Any) -> None:
    """Add ``audit`` and ``retention`` to the ``pgwarden`` subcommands."""
    a = sub.add_parser("audit", help="verify, search and report on audit files")
    asub = a.add_subparsers(dest="audit_cmd", required=True)
    v = asub.add_parser("verify", help="check the hash chains: first edited, missing or reordered event per replica")
    v.add_argument("files", nargs="+", help="audit files (.jsonl, .jsonl.gz) or directories holding them")
    v.add_argument("--from-start", action="store_true",
                   help="fail unless every replica's chain starts at its first event (seq 1)")
    _verify_options(v)
    v.add_argument("--partial", action="store_true",
                   help="the files are a part of the log (an old month): anchors past their end are only noted")
    v.set_defaults(fn=_audit_verify)
    se = asub.add_parser("search", help="events by user, role, guest, table, decision, ticket, time or receipt")
    se.add_argument("files", nargs="+", help="audit files (.jsonl, .jsonl.gz) or directories holding them")
    se.add_argument("--user")
    se.add_argument("--role")
    se.add_argument("--guest", help="a guest id (subject key value); needs --rules")
    se.add_argument("--table", help="e.g. cs_records or public.cs_records")
    se.add_argument("--decision", choices=("allow", "rewrite", "refuse", "error"))
    se.add_argument("--ticket")
    se.add_argument("--receipt", help="e.g. R-7f3a9c2e1b4d5e6f")
    se.add_argument("--event", help="event kind: statement, login, login_failed, ... (default: all)")
    se.add_argument("--since", help="30d, 12h or an ISO date/time")
    se.add_argument("--until", help="30d, 12h or an ISO date/time (exclusive)")
    se.add_argument("--rules", help="rules YAML: subject keys for --guest")
    se.add_argument("--value", help="a value someone searched for (an ID number, a phone, ...), redacted or not; "
                                    "redacted ones are matched by their keyed hash (needs audit.value_key)")
    se.add_argument("--config", "-c", help="pgwarden configuration: audit.value_key for --value")
    se.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    se.set_defaults(fn=_audit_search)
    rp = asub.add_parser("report", help="a self-contained HTML report for security review")
    rp.add_argument("files", nargs="+", help="audit files (.jsonl, .jsonl.gz) or directories holding them")
    rp.add_argument("--since", default="30d", help="30d (default), 12h or an ISO date/time")
    rp.add_argument("--until", help="end of the period (default: now)")
    rp.add_argument("--html", required=True, help="the page to write")
    rp.add_argument("--rules", help="rules YAML: time zone, shifts, subject keys (guests)")
    rp.add_argument("--config", "-c", help="pgwarden configuration: users' shift attributes")
    rp.add_argument("--off-hours", default="23:00-07:00",
                    help="local window counted as off shift for people without a shift (default 23:00-07:00)")
    _verify_options(rp)
    rp.set_defaults(fn=_audit_report)

    r = sub.add_parser("retention", help="delete rows past their retention period (plan: dry run)")
    r.add_argument("action", nargs="?", choices=("plan", "apply"), default="plan")
    r.add_argument("--config", "-c", required=True, help="pgwarden configuration (upstream, audit log)")
    r.add_argument("--rules", help="rules YAML with a retention: section (default: rules: in the config)")
    r.add_argument("--database", default="hotel")
    r.add_argument("--dsn", help="connect with this DSN instead (a role allowed to DELETE)")
    r.add_argument("--batch", type=int, default=5000, help="rows per DELETE (default 5000)")
    r.set_defaults(fn=_retention)

