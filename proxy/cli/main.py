"""The ``pgwarden`` command: serve, config show, passwd, check, explain, demo, migrate, unlock, ticket."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import signal
import sys

from proxy.config import Config, ConfigError, load_config


def _load(path: str) -> Config | None:
    """The configuration, or None after saying why not (file:line or the environment variable)."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"pgwarden: {exc}", file=sys.stderr)
        return None


def _serve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from proxy.net.server import Server, new_event_loop

    cfg = _load(args.config)
    if cfg is None:
        return 2
    if args.port is not None:
        cfg = replace(cfg, listen_port=args.port)
    if args.workers < 1:
        print("pgwarden: --workers must be at least 1", file=sys.stderr)
        return 2
    worker = None
    if args.worker:
        from proxy.net.workers import worker_config

        worker = args.worker
        cfg = worker_config(cfg, worker)
    elif args.workers > 1:
        from proxy.net.workers import supervise

        return supervise(args.config, cfg, args.workers)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    server = Server(cfg)
    if worker is not None:
        from proxy.net.workers import wire_worker

        wire_worker(server, worker, args.runtime_dir)
    try:
        loop.run_until_complete(server.start())
    except OSError as exc:
        print(f"pgwarden: cannot listen on {cfg.listen_host}:{cfg.listen_port}: {exc.strerror}", file=sys.stderr)
        return 1
    if worker is None:
        print(f"listening {server.port}", flush=True)
    else:
        print(f"worker {worker[0]} listening {server.port} pid {os.getpid()}", flush=True)
    if server.http is not None:
        print(f"metrics {server.http.port}", flush=True)
    stop: asyncio.Future[float] = loop.create_future()  # its result: how long clients may linger
    drain: list[asyncio.Task[None]] = []

    def now() -> None:
        for t in drain:
            t.cancel()
        if not stop.done():
            stop.set_result(0.2)

    def on_sigterm() -> None:
        # The first SIGTERM drains (running statements may finish); a second one stops at once.
        if drain:
            now()
            return
        task = loop.create_task(server.drain())
        task.add_done_callback(lambda _t: stop.done() or stop.set_result(0.2))
        drain.append(task)

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    loop.add_signal_handler(signal.SIGINT, now)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    linger = 0.2
    try:
        linger = loop.run_until_complete(stop)
    finally:
        loop.run_until_complete(server.close(linger))
        loop.close()
    return 0


def _config_show(args: argparse.Namespace) -> int:
    """The effective configuration (file + environment) as YAML, with secrets hidden."""
    import yaml

    from proxy.config import effective_config

    cfg = _load(args.config)
    if cfg is None:
        return 2
    sys.stdout.write(yaml.safe_dump(effective_config(cfg), sort_keys=False, allow_unicode=True))
    return 0


def _passwd(args: argparse.Namespace) -> int:
    from proxy.verifiers import make_md5, make_scram_verifier

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

    from proxy.net.server import load_catalog_for

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


def _explain(args: argparse.Namespace) -> int:
    """Print the Decision for one statement as one user: the very code the proxy runs."""
    import sqlglot

    from rules.engine import Engine
    from rules.model import load_rules

    from rules.principal import Principal
    from proxy.net.server import load_catalog_for

    try:
        cfg = load_config(args.config)
        rules_path = args.rules or cfg.rules_path
        if not rules_path:
            print("pgwarden: no rules: give --rules or set rules: in the config", file=sys.stderr)
            return 2
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
    engine = Engine(rules, max_tokens=cfg.analysis.max_tokens, value_key=cfg.audit_value_key)
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
    from proxy.demo.pgcluster import ClusterError
    from proxy.demo.run import run_demo

    try:
        return run_demo(port=args.port, tour=args.tour, records=args.records)
    except ClusterError as exc:
        # No PostgreSQL, a broken embedded package, a server that would not start: say so, no traceback.
        print(f"pgwarden demo: {exc}", file=sys.stderr)
        return 1


def _worker_arg(text: str) -> tuple[int, int]:
    i, _, n = text.partition("/")
    if not (i.isdigit() and n.isdigit() and 1 <= int(i) <= int(n)):
        raise argparse.ArgumentTypeError("expected I/N")
    return int(i), int(n)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pgwarden", description="Access-control proxy for PostgreSQL.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run the proxy")
    s.add_argument("--config", "-c", required=True, help="pgwarden YAML configuration")
    s.add_argument("--port", type=int, help="override listen.port")
    s.add_argument("--workers", type=int, default=1,
                   help="processes sharing the port (SO_REUSEPORT); one per core (default 1)")
    s.add_argument("--worker", type=_worker_arg, help=argparse.SUPPRESS)  # set by the supervisor: I/N
    s.add_argument("--runtime-dir", help=argparse.SUPPRESS)  # the supervisor's directory of worker sockets
    s.set_defaults(fn=_serve)

    cs = sub.add_parser("config", help="configuration tools")
    csub = cs.add_subparsers(dest="config_cmd", required=True)
    show = csub.add_parser("show", help="print the effective configuration (file + environment), secrets hidden")
    show.add_argument("--config", "-c", required=True, help="pgwarden YAML configuration")
    show.set_defaults(fn=_config_show)

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

    from proxy.cli.guards import add_guard_commands

    add_guard_commands(sub)
    from proxy.cli.tickets import add_ticket_commands

    add_ticket_commands(sub)

    from proxy.cli.audit import add_commands

    add_commands(sub)  # audit verify|search|report, retention plan|apply
    args = ap.parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
