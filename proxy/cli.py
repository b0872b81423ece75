"""The ``pgwarden`` command: serve, passwd, check, explain, demo, audit, retention."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import signal
import sys

from .config import Config, ConfigError, load_config


def _serve(args: argparse.Namespace) -> int:
    from .server import Server, new_event_loop

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"pgwarden: {exc}", file=sys.stderr)
        return 2
    if args.port is not None:
        from dataclasses import replace

        cfg = replace(cfg, listen_port=args.port)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    server = Server(cfg)
    try:
        loop.run_until_complete(server.start())
    except OSError as exc:
        print(f"pgwarden: cannot listen on {cfg.listen_host}:{cfg.listen_port}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"listening {server.port}", flush=True)
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    loop.add_signal_handler(signal.SIGHUP, server.reload_rules)
    try:
        loop.run_until_complete(stop)
    finally:
        loop.run_until_complete(server.close())
        loop.close()
    return 0


def _passwd(args: argparse.Namespace) -> int:
    from .auth import make_md5, make_scram_verifier

    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("pgwarden: passwords differ", file=sys.stderr)
            return 1
    if not password:
        print("pgwarden: empty password", file=sys.stderr)
        return 1
    if args.md5:
        if not args.user:
            print("pgwarden: --md5 needs the user name (md5 hashes include it)", file=sys.stderr)
            return 1
        print(make_md5(password, args.user))
    else:
        print(make_scram_verifier(password, iterations=args.iterations))
    return 0


def _check(args: argparse.Namespace) -> int:
    """Validate a rules file; with --config, also against the live catalog of the upstream."""
    from rules.model import load_rules

    try:
        rules = load_rules(args.rules)
    except ConfigError as exc:
        print(f"pgwarden: {exc}", file=sys.stderr)
        return 2
    print(f"{args.rules}: {len(rules.tables)} tables, {len(rules.roles)} roles: the YAML is valid")
    if not args.config:
        print("(give --config to check it against the database as well)")
        return 0
    from rules.check import check_rules

    from .server import load_catalog_for

    try:
        cfg = load_config(args.config)
        cat = asyncio.run(load_catalog_for(cfg, args.database))
    except ConfigError as exc:
        print(f"pgwarden: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - any connection problem, said plainly
        print(f"pgwarden: cannot read the catalog of {args.database!r}: {exc}", file=sys.stderr)
        return 1
    problems = check_rules(rules, cat)
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        print(f"pgwarden: {len(problems)} problem(s)", file=sys.stderr)
        return 2
    print(f"database {args.database!r}: every table, column and mask exists and fits")
    return 0


def _config_and_rules(args: argparse.Namespace) -> tuple[Config, str]:
    """The configuration and the rules file: --rules, else rules: in the configuration."""
    cfg = load_config(args.config)
    rules_path = args.rules or cfg.rules_path
    if not rules_path:
        raise ConfigError("no rules: give --rules or set rules: in the config")
    return cfg, rules_path


def _explain(args: argparse.Namespace) -> int:
    """Print the Decision for one statement as one user: the very code the proxy runs."""
    import sqlglot

    from rules.engine import Engine
    from rules.model import load_rules

    from .identity import Principal
    from .server import load_catalog_for

    try:
        cfg, rules_path = _config_and_rules(args)
        rules = load_rules(rules_path)
    except ConfigError as exc:
        print(f"pgwarden: {exc}", file=sys.stderr)
        return 2
    entry = cfg.users.get(args.user)
    if entry is None:
        print(f"pgwarden: no user {args.user!r} in {args.config}", file=sys.stderr)
        return 2
    principal = Principal(user=entry.name, role=entry.role, department=entry.department,
                          attributes=dict(entry.attributes), database=args.database)
    engine = Engine(rules)
    grants, why = engine.grants(principal)
    cat = asyncio.run(load_catalog_for(cfg, args.database))
    d = engine.decide(principal, args.sql, cat, {})
    print(f"user:     {principal.user} (role {principal.role}, department {principal.department})")
    if grants is not None:
        print(f"rules:    role {grants.role}" + (f" ({why})" if why else ""))
    print(f"decision: {d.action}")
    if d.action == "refuse":
        print(f"sqlstate: {d.sqlstate}\nmessage:  {d.message}")
        if d.reason and d.reason != d.message:
            print(f"reason:   {d.reason}")
        return 1
    if d.tables:
        print("tables:   " + ", ".join(d.tables))
    if d.action == "rewrite" and d.sql:
        print("sql:")
        for stmt in sqlglot.parse(d.sql, read="postgres"):
            if stmt is not None:
                print("  " + stmt.sql(dialect="postgres", pretty=True).replace("\n", "\n  "))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(port=args.port, tour=args.tour, records=args.records)


def _audit_verify(args: argparse.Namespace) -> int:
    from .audit_files import numbered_lines
    from .audit_verify import render, verify

    try:
        result = verify(numbered_lines(args.files), from_start=args.from_start)
    except OSError as exc:
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


def _audit_search(args: argparse.Namespace) -> int:
    import orjson

    from .audit_files import events
    from .audit_search import Filters, parse_when, search, table_header, table_row

    try:
        keys = _subject_keys(args.rules)
        f = Filters(user=args.user, role=args.role, guest=args.guest, table=args.table, decision=args.decision,
                    ticket=args.ticket, receipt=args.receipt, event=args.event,
                    since=parse_when(args.since) if args.since else None,
                    until=parse_when(args.until) if args.until else None)
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

    from .audit_files import events
    from .audit_report import Window, render_html, summarise
    from .audit_search import parse_when

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
    summary = summarise(events(args.files), since=since, until=until, tz=tz, tz_name=tz_name, keys=keys,
                        shifts=shifts, user_shifts=user_shifts, off_hours=off)
    page = render_html(summary)
    with open(args.html, "w", encoding="utf-8") as f:
        f.write(page)
    print(f"{args.html}: {summary.statements} statements by {len(summary.users)} people, "
          f"{len(summary.refusals)} refused, {len(summary.off_shift)} off shift, "
          f"{len(summary.general_manager)} general-manager accesses")
    return 0


def _retention(args: argparse.Namespace) -> int:
    """Plan (dry run, the default) or apply the retention rules; every rule is audited either way."""
    import getpass

    from rules.retention import load_retention

    from .audit import AuditLog, default_replica
    from .retention import render, run

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

    async def go() -> list:  # type: ignore[type-arg]
        import asyncpg

        up = cfg.upstream
        if args.dsn:
            conn = await asyncpg.connect(args.dsn)
        else:
            conn = await asyncpg.connect(host=up.host, port=up.port, user=up.user, password=up.password,
                                         database=args.database, ssl=False if up.sslmode == "disable" else "prefer")
        audit = AuditLog(cfg.audit_path, replica=default_replica() + ":retention")
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pgwarden", description="Access-control proxy for PostgreSQL.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run the proxy")
    s.add_argument("--config", "-c", required=True, help="pgwarden YAML configuration")
    s.add_argument("--port", type=int, help="override listen.port")
    s.set_defaults(fn=_serve)

    p = sub.add_parser("passwd", help="print a password verifier for the users section")
    p.add_argument("user", nargs="?", help="user name (needed for --md5)")
    p.add_argument("--md5", action="store_true", help="an md5 hash for legacy clients instead of SCRAM-SHA-256")
    p.add_argument("--iterations", type=int, default=4096)
    p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    p.set_defaults(fn=_passwd)

    c = sub.add_parser("check", help="validate a rules file (and, with --config, against the database)")
    c.add_argument("rules", help="rules YAML")
    c.add_argument("--config", "-c", help="pgwarden configuration, to reach the upstream")
    c.add_argument("--database", default="hotel")
    c.set_defaults(fn=_check)

    e = sub.add_parser("explain", help="show what pgwarden decides for one statement as one user")
    e.add_argument("--config", "-c", required=True)
    e.add_argument("--rules", help="rules YAML (default: rules: in the config)")
    e.add_argument("--user", "-u", required=True)
    e.add_argument("--database", default="hotel")
    e.add_argument("--sql", required=True)
    e.set_defaults(fn=_explain)

    d = sub.add_parser("demo", help="throwaway PostgreSQL with hotel sample data, pgwarden in front")
    d.add_argument("--port", type=int, default=6432, help="pgwarden's port (default 6432)")
    d.add_argument("--tour", action="store_true", help="run a scripted tour of queries as several users, then exit")
    d.add_argument("--records", type=int, default=200_000, help="customer-service records to generate")
    d.set_defaults(fn=_demo)

    a = sub.add_parser("audit", help="verify, search and report on audit files")
    asub = a.add_subparsers(dest="audit_cmd", required=True)
    v = asub.add_parser("verify", help="check the hash chains: first edited, missing or reordered event per replica")
    v.add_argument("files", nargs="+", help="audit files (.jsonl, .jsonl.gz) or directories holding them")
    v.add_argument("--from-start", action="store_true",
                   help="fail unless every replica's chain starts at its first event (seq 1)")
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
    rp.set_defaults(fn=_audit_report)

    r = sub.add_parser("retention", help="delete rows past their retention period (plan: dry run)")
    r.add_argument("action", nargs="?", choices=("plan", "apply"), default="plan")
    r.add_argument("--config", "-c", required=True, help="pgwarden configuration (upstream, audit log)")
    r.add_argument("--rules", help="rules YAML with a retention: section (default: rules: in the config)")
    r.add_argument("--database", default="hotel")
    r.add_argument("--dsn", help="connect with this DSN instead (a role allowed to DELETE)")
    r.add_argument("--batch", type=int, default=5000, help="rows per DELETE (default 5000)")
    r.set_defaults(fn=_retention)

    args = ap.parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
