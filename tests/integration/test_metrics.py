"""/metrics, /healthz and /readyz scraped over real TCP after real clients ran statements through pgwarden."""

from __future__ import annotations

import http.client
import socket
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Proxy, start_proxy

HOTEL = Path(__file__).resolve().parents[2] / "deploy" / "rules" / "hotel.yaml"


def get(port: int, path: str) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type") or "", r.read().decode()
    finally:
        conn.close()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    status, ctype, body = get(port, "/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    out = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def delta(a: dict, b: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return b.get(key, 0.0) - a.get(key, 0.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def metered(cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    p = start_proxy(cluster, str(tmp_path_factory.mktemp("metered")), rules=str(HOTEL),
                    metrics={"listen": "127.0.0.1:0"})
    try:
        yield p
    finally:
        p.thread.stop()


def metrics_port(p: Proxy) -> int:
    return p.thread.server.http.port


def test_statements_refusals_errors_cache_and_latency_are_counted_exactly(metered: Proxy) -> None:
    port = metrics_port(metered)
    metered.take_events(None)
    before = scrape(port)
    with psycopg.connect(metered.dsn("gina"), autocommit=True) as gina:
        for _ in range(3):
            gina.execute("SELECT count(*) FROM cs_records").fetchone()  # rewritten: sales sees consultations
        gina.execute("SELECT count(*) FROM cs_records WHERE id > 5").fetchone()
        gina.execute("SELECT count(*) FROM cs_records WHERE id > 6").fetchone()  # same shape: a template
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            gina.execute("SELECT * FROM guests")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            gina.execute("SELECT count(*) FROM cs_records FOR UPDATE")
    with psycopg.connect(metered.dsn("dave"), autocommit=True) as dave:
        with pytest.raises(psycopg.errors.DivisionByZero):
            dave.execute("SELECT 1/0")
        dave.execute("SELECT 2").fetchone()
    after = scrape(port)
    events = metered.take_events("statement")
    assert len(events) == 9
    assert delta(before, after, "pgwarden_statements_total", decision="rewritten") == 5
    assert delta(before, after, "pgwarden_statements_total", decision="refused") == 2
    assert delta(before, after, "pgwarden_statements_total", decision="allowed") == 2
    assert sum(1 for e in events if e.get("decision") == "rewrite") == 5
    assert sum(1 for e in events if e["outcome"] == "refused") == 2
    assert delta(before, after, "pgwarden_refusals_total", reason="table_not_granted") == 1
    assert delta(before, after, "pgwarden_refusals_total", reason="statement_not_granted") == 1
    assert delta(before, after, "pgwarden_refusals_total", reason="other") == 0
    assert delta(before, after, "pgwarden_statement_errors_total", sqlstate_class="22") == 1
    assert delta(before, after, "pgwarden_statement_duration_seconds_count") == 9
    assert delta(before, after, "pgwarden_statement_duration_seconds_bucket", le="+Inf") == 9
    assert delta(before, after, "pgwarden_statement_duration_seconds_sum") > 0
    # cs_records three times: one analysis, two exact hits; "id > 6" reuses the template of "id > 5"
    assert delta(before, after, "pgwarden_decision_cache_hits_total", cache="exact") == 2
    assert delta(before, after, "pgwarden_decision_cache_hits_total", cache="template") == 1
    assert delta(before, after, "pgwarden_logins_total") == 2
    assert delta(before, after, "pgwarden_connections_accepted_total") == 2
    # Label values are from fixed sets: no SQL, no user names, no messages.
    body = get(port, "/metrics")[2]
    for leak in ("guests", "gina", "cs_records", "SELECT", "may not"):
        assert leak not in body


def test_connections_gauge_and_refused_logins(metered: Proxy) -> None:
    port = metrics_port(metered)
    before = scrape(port)
    conns = [psycopg.connect(metered.dsn("alice")) for _ in range(3)]
    try:
        during = scrape(port)
        assert delta(before, during, "pgwarden_connections_open") == 3
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(metered.dsn("alice", password="wrong"))
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(metered.dsn("nobody", password="x"))
    finally:
        for c in conns:
            c.close()
    after = scrape(port)
    assert delta(before, after, "pgwarden_connections_refused_total", reason="auth_failed") == 2
    assert delta(before, after, "pgwarden_connections_accepted_total") == 5
    assert delta(before, after, "pgwarden_logins_total") == 3
    # closed connections leave the gauge (the server notices the close asynchronously)
    for _ in range(100):
        if delta(before, scrape(port), "pgwarden_connections_open") == 0:
            break
    assert delta(before, scrape(port), "pgwarden_connections_open") == 0


def test_health_and_readiness(metered: Proxy) -> None:
    port = metrics_port(metered)
    assert get(port, "/healthz") == (200, "text/plain", "ok\n")
    assert get(port, "/readyz") == (200, "text/plain", "ready\n")
    assert get(port, "/nothing")[0] == 404
    scraped = scrape(port)
    assert scraped[("pgwarden_lockouts_total", ())] == 0  # defined for the guards, zero until they lock anyone
    assert ("process_cpu_seconds_total", ()) in scraped


def test_not_ready_when_the_upstream_is_down(cluster, tmp_path: Path) -> None:
    from proxy.demo.run import demo_config
    from proxy.net.server import ServerThread

    dead = free_port()  # nothing listens there
    cfg = demo_config(upstream_host="127.0.0.1", upstream_port=dead, service_user="x", service_password="x",
                      audit_path=str(tmp_path / "a.jsonl"), extra={"metrics": {"listen": "127.0.0.1:0"}})
    t = ServerThread(cfg)
    t.start()
    try:
        status, _, body = get(t.server.http.port, "/readyz")
        assert status == 503
        assert body.startswith(f"upstream 127.0.0.1:{dead} unreachable")
        assert get(t.server.http.port, "/healthz")[0] == 200
    finally:
        t.stop()


def test_no_metrics_section_no_listener_and_no_counting(proxy: Proxy) -> None:
    assert proxy.thread.server.http is None
    assert proxy.thread.server.stats is None


# ---------------------------------------------------------------------------
# every metric the operations guide lists, each moved by what it counts
# ---------------------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def documented_metrics() -> list[str]:
    """The metric names in docs/operations.md's list ("Metrics (all `pgwarden_`): ...")."""
    import re

    text = DOCS.read_text(encoding="utf-8")
    start = text.index("Metrics (all `pgwarden_`):")
    listing = text[start:text.index("Labels never carry", start)]
    names = [re.sub(r"\{.*\}", "", n) for n in re.findall(r"`([a-z_]+(?:\{[a-z_]+\})?)`", listing)]
    return ["pgwarden_" + n for n in names if n != "pgwarden_"]


def test_every_documented_metric_is_exported_and_moves(cluster, tmp_path: Path) -> None:  # noqa: ANN001
    import asyncio
    import os
    import threading
    import time

    from tests.integration.fix_tls import make_self_signed
    from proxy.wire import codec
    from tests.integration.fix_wire import login_refusal, open_raw
    from tests.integration.test_attacks import call_by_oid
    from tests.conftest import state_config

    names = documented_metrics()
    assert len(names) == 15 and "pgwarden_lockouts_total" in names, names
    rules = tmp_path / "rules.yaml"
    text = HOTEL.read_text(encoding="utf-8")
    rules.write_text(text.replace("    row_cap: 5000\n", "    row_cap: 10\n", 1), encoding="utf-8")  # supervisor
    cert, key = make_self_signed(str(tmp_path))
    schema = "pgwarden_metrics"
    cluster.psql(f"DROP SCHEMA IF EXISTS {schema} CASCADE", user=cluster.superuser)
    p = start_proxy(cluster, str(tmp_path / "p"), rules=str(rules), state=state_config(cluster, schema),
                    metrics={"listen": "127.0.0.1:0"}, tls={"cert": cert, "key": key}, limits={"max_connections": 3})
    try:
        port = metrics_port(p)
        server = p.thread.server
        before = scrape(port)

        # connections: three open, a fourth refused (too_many_clients)
        held = [psycopg.connect(p.dsn("dave"), autocommit=True) for _ in range(3)]
        assert delta(before, scrape(port), "pgwarden_connections_open") == 3

        async def fourth() -> None:
            c = await open_raw(p.port)
            c.send(codec.startup_message({"user": "dave", "database": "hotel"}))
            await c.read_to_eof()
            await c.close()

        asyncio.run(fourth())
        # the upstream lost: the DBA ends one session's backend
        pid = held[0].execute("SELECT pg_backend_pid()").fetchone()[0]
        cluster.psql(f"SELECT pg_terminate_backend({pid})", database="postgres")
        with pytest.raises(psycopg.OperationalError):
            held[0].execute("SELECT 1")
        # a cancel request, forwarded
        timer = threading.Timer(0.5, held[1].cancel_safe)
        timer.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            held[1].execute("SELECT pg_sleep(30)")
        for c in held:
            c.close()
        deadline = time.monotonic() + 10
        while server.sessions and time.monotonic() < deadline:
            time.sleep(0.05)
        # logins refused: not allowed (42501), and an unknown database (the upstream refuses it)
        assert login_refusal(p.port, "dave", options="-c role=postgres").sqlstate == "42501"
        # (with rules, pgwarden's catalog read fails first: 57P03 today, where PostgreSQL says 3D000; either
        # counts as upstream_failed)
        err = login_refusal(p.port, "dave", database="nosuchdb")
        assert err.sqlstate in ("57P03", "3D000") and 'database "nosuchdb" does not exist' in err.message, err.fields
        # the upstream refuses the service login (its connection limit is 0 for a moment): a connect error
        svc = cluster.service_user
        (limit,), = cluster_rows(cluster, f"SELECT rolconnlimit FROM pg_roles WHERE rolname = '{svc}'")
        cluster.psql(f"ALTER ROLE {svc} CONNECTION LIMIT 0")
        try:
            err = login_refusal(p.port, "dave")
        finally:
            cluster.psql(f"ALTER ROLE {svc} CONNECTION LIMIT {limit}")
        assert err.sqlstate == "53300" and f'too many connections for role "{svc}"' in err.message, err.message
        # refusals by reason (one user each: three in a row would lock a person out)
        for user, sql in (("carol", "SELECT * FROM guests"), ("alice", "COPY cs_records TO STDOUT"),
                          ("erin", "DROP TABLE guests"),
                          ("frank", "SELECT pg_read_file('/etc/passwd')"), ("bob", "SELECT id FROM cs_records")):
            with psycopg.connect(p.dsn(user), autocommit=True) as c, pytest.raises(psycopg.Error) as ei:
                c.execute(sql)
            assert ei.value.sqlstate == "42501", (user, str(ei.value))
        (oid,), = cluster_rows(cluster, "SELECT 'pg_catalog.nextval(regclass)'::regprocedure::oid::int")
        answer, _ = asyncio.run(call_by_oid(p.port, "judy", "demo", oid, "x"))  # a FunctionCall message
        assert [codec.decode_error(m).sqlstate for t, m in answer if t == ord("E")] == ["42501"]
        # a lockout: three refusals in a row
        for _ in range(3):
            with psycopg.connect(p.dsn("gina"), autocommit=True) as c, pytest.raises(psycopg.Error):
                c.execute("SELECT * FROM guests")
        # a decision never made before, then the same again: one miss, one exact hit
        with psycopg.connect(p.dsn("dave"), autocommit=True) as c:
            around = scrape(port)
            for _ in range(2):
                assert c.execute("SELECT 'metrics' AS m, count(*) FROM crisis_reports WHERE id < 0").fetchall() == [
                    ("metrics", 0)]
            now = scrape(port)
            # a shape with literals seen for the first time is analysed twice: as sent, and with sentinel
            # literals to verify it as a template; the second run is an exact hit
            assert delta(around, now, "pgwarden_decision_cache_misses_total") == 2
            assert delta(around, now, "pgwarden_decision_cache_hits_total", cache="exact") == 1
            assert delta(around, now, "pgwarden_decision_cache_hits_total", cache="template") == 0
        # reloads, each once: good rules and a good certificate, then broken ones (the files' times are
        # put back so that the watchers, which poll them, do not reload them a second time)
        for path, broken in ((rules, "roles: [broken\n"), (Path(key), "not a key\n")):
            st = os.stat(path)
            assert p.thread.call(server.reload_rules if path == rules else server.reload_tls) is True
            good = path.read_text(encoding="utf-8")
            path.write_text(broken, encoding="utf-8")
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
            assert p.thread.call(server.reload_rules if path == rules else server.reload_tls) is False
            path.write_text(good, encoding="utf-8")
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        deadline = time.monotonic() + 10
        while delta(before, scrape(port), "pgwarden_lockouts_total") == 0 and time.monotonic() < deadline:
            time.sleep(0.1)  # the lockout is counted when the store has answered
        after = scrape(port)
    finally:
        p.thread.stop()
        cluster.psql(f"DROP SCHEMA IF EXISTS {schema} CASCADE", user=cluster.superuser)
    moved = {
        ("pgwarden_connections_accepted_total", ()): 3 + 1 + 1 + 3 + 5 + 1 + 3 + 1,  # the cancel's too
        ("pgwarden_connections_refused_total", (("reason", "too_many_clients"),)): 1 + 1,  # ours, the upstream's
        ("pgwarden_connections_refused_total", (("reason", "not_allowed"),)): 1,
        ("pgwarden_connections_refused_total", (("reason", "upstream_failed"),)): 1,
        ("pgwarden_connections_refused_total", (("reason", "auth_failed"),)): 0,
        ("pgwarden_logins_total", ()): 3 + 5 + 1 + 3 + 1,
        ("pgwarden_upstream_errors_total", (("kind", "lost"),)): 1,
        ("pgwarden_upstream_errors_total", (("kind", "connect"),)): 1,
        ("pgwarden_cancel_requests_total", ()): 1,
        ("pgwarden_statement_errors_total", (("sqlstate_class", "57"),)): 1,
        ("pgwarden_refusals_total", (("reason", "table_not_granted"),)): 1 + 3,
        ("pgwarden_refusals_total", (("reason", "statement_not_granted"),)): 1,
        ("pgwarden_refusals_total", (("reason", "not_understood"),)): 1,
        ("pgwarden_refusals_total", (("reason", "function_not_granted"),)): 1,
        ("pgwarden_refusals_total", (("reason", "row_cap"),)): 1,
        ("pgwarden_refusals_total", (("reason", "protocol"),)): 1,
        ("pgwarden_refusals_total", (("reason", "other"),)): 0,
        ("pgwarden_statements_total", (("decision", "refused"),)): 5 + 1 + 3,
        ("pgwarden_decision_cache_misses_total", ()): None,  # checked below
        ("pgwarden_decision_cache_hits_total", (("cache", "exact"),)): None,
        ("pgwarden_lockouts_total", ()): 1,
        ("pgwarden_rules_reloads_total", (("result", "ok"),)): 1,
        ("pgwarden_rules_reloads_total", (("result", "failed"),)): 1,
        ("pgwarden_tls_reloads_total", (("result", "ok"),)): 1,
        ("pgwarden_tls_reloads_total", (("result", "failed"),)): 1,
        ("pgwarden_connections_open", ()): 0,
    }
    # what the guide lists is what is exported, no more, no less (the histogram as _bucket/_count/_sum;
    # statement_errors_total has samples once a statement failed)
    exported = {n for n, _ in after}
    families = {n.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")
                for n in exported if n.startswith("pgwarden_")}
    assert families == set(names)
    assert any(n.startswith("process_") for n in exported)
    got = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in moved}
    assert {k: v for k, v in got.items() if moved[k] is not None} == {k: v for k, v in moved.items() if v is not None}
    assert got[("pgwarden_decision_cache_misses_total", ())] >= 2  # (exactly 2 for dave's new statement, above)
    assert delta(before, after, "pgwarden_statement_duration_seconds_count") == sum(
        delta(before, after, "pgwarden_statements_total", decision=d) for d in ("allowed", "rewritten", "refused"))


def cluster_rows(cluster, sql: str) -> list[tuple]:  # noqa: ANN001
    with psycopg.connect(cluster.dsn(cluster.superuser, cluster.superuser_password)) as c:
        return c.execute(sql).fetchall()
