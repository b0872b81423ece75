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
