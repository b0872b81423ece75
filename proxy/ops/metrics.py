"""Prometheus metrics: plain counters on the relay's path, turned into metric families at scrape time.

Theory of operation. The relay pays for every statement, so it never touches
prometheus_client's locked ``Counter.inc``: the session bumps plain integers on
one ``Stats`` object (one loop thread writes them; a scrape on the same loop
reads them), and a custom collector renders them in Prometheus's exposition
format only when /metrics is asked for. With no ``metrics:`` section the
server has no Stats at all and the relay skips even that.

Label values are always from a fixed, small set (decisions, refusal reasons,
SQLSTATE classes): never a message, a user name or SQL text.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

# Seconds; a statement through pgwarden takes from ~100 us (cached decision) to minutes.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0)

# Refusal reasons, in the order they are tested against the refusal's message. Bounded by construction.
_REFUSAL_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("row_cap", ("row cap",)),
    ("no_grants", ("may not run statements here",)),
    ("encoding", ("client_encoding", "standard_conforming_strings", "is not valid")),
    ("not_understood", ("not understood", "could not be analysed", "failed verification")),
    ("unknown_object", ("unknown to pgwarden's catalog",)),
    ("catalog_unavailable", ("catalog is not loaded",)),
    ("column_not_granted", ("may not read column", "may not use column", "on protected table",
                            "hidden columns", "RETURNING")),
    ("function_not_granted", ("may not call function",)),
    ("table_not_granted", ("may not read table", "may not read view", "may not read system relation",
                           "may not INSERT", "may not UPDATE", "may not DELETE")),
    ("statement_not_granted", ("may not run", "may not lock", "may not use ON CONFLICT", "may not export",
                               "COPY", "only a query may follow")),
    ("protocol", ("FunctionCall",)),
)
REFUSAL_REASONS = tuple(r for r, _ in _REFUSAL_PATTERNS) + ("other",)
LOGIN_RESULTS = ("ok", "auth_failed", "too_many_clients", "not_allowed", "upstream_failed", "shutting_down",
                 "other")
_LOGIN_BY_SQLSTATE = {"28P01": "auth_failed", "28000": "auth_failed", "53300": "too_many_clients",
                      "42501": "not_allowed", "57P01": "shutting_down", "57P03": "upstream_failed",
                      "08006": "upstream_failed", "08001": "upstream_failed", "3D000": "upstream_failed"}


def refusal_reason(message: str) -> str:
    """The bounded label for a refusal, from pgwarden's own message (never the message itself)."""
    for reason, needles in _REFUSAL_PATTERNS:
        for n in needles:
            if n in message:
                return reason
    return "other"


def login_result(sqlstate: str) -> str:
    return _LOGIN_BY_SQLSTATE.get(sqlstate, "other")


class Stats:
    """Plain counters the relay increments; read by ``StatsCollector`` at scrape time."""

    def __init__(self) -> None:
        self.accepted = 0
        self.logins: dict[str, int] = dict.fromkeys(LOGIN_RESULTS, 0)
        self.allowed = 0
        self.rewritten = 0
        self.refused = 0
        self.refusals: dict[str, int] = dict.fromkeys(REFUSAL_REASONS, 0)
        self.errors: dict[str, int] = {}  # SQLSTATE class (2 chars) -> statements that failed upstream
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.upstream_errors: dict[str, int] = {"connect": 0, "lost": 0}
        self.lockouts = 0  # incremented by the guard that locks a person out
        self.cancels = 0
        self.reloads: dict[str, int] = {"ok": 0, "failed": 0}
        self.tls_reloads: dict[str, int] = {"ok": 0, "failed": 0}

    def statement(self, outcome: str, decision: Any, seconds: float, sqlstate: str | None = None) -> None:
        """One statement's audit event was written: count its decision and time (the hot path)."""
        if outcome == "refused":
            self.refused += 1
            msg = decision.message if decision is not None else "FunctionCall"
            r = refusal_reason(msg)
            self.refusals[r] += 1
        else:
            if decision is not None and decision.action == "rewrite":
                self.rewritten += 1
            else:
                self.allowed += 1
            if sqlstate is not None:
                c = sqlstate[:2]
                if c.isalnum() and len(c) == 2:
                    self.errors[c] = self.errors.get(c, 0) + 1
        self.latency[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def login(self, sqlstate: str | None) -> None:
        self.logins["ok" if sqlstate is None else login_result(sqlstate)] += 1


class StatsCollector(Collector):
    """Renders one server's Stats (and its engine's cache counters) as metric families."""

    def __init__(self, stats: Stats, open_connections: Callable[[], int],
                 cache_counts: Callable[[], dict[str, int]]) -> None:
        self._s = stats
        self._open = open_connections
        self._cache = cache_counts

    def collect(self) -> Iterator[Any]:
        s = self._s
        g = GaugeMetricFamily("pgwarden_connections_open", "Client connections open now (logging in or relaying).")
        g.add_metric([], self._open())
        yield g
        c = CounterMetricFamily("pgwarden_connections_accepted", "Client connections accepted (TCP).")
        c.add_metric([], s.accepted)
        yield c
        c = CounterMetricFamily("pgwarden_connections_refused",
                                "Client connections refused at login, by reason.", labels=["reason"])
        for k, v in s.logins.items():
            if k != "ok":
                c.add_metric([k], v)
        yield c
        c = CounterMetricFamily("pgwarden_logins", "Successful logins (the person is relayed upstream).")
        c.add_metric([], s.logins["ok"])
        yield c
        c = CounterMetricFamily("pgwarden_statements", "Statements audited, by the policy decision.",
                                labels=["decision"])
        c.add_metric(["allowed"], s.allowed)
        c.add_metric(["rewritten"], s.rewritten)
        c.add_metric(["refused"], s.refused)
        yield c
        c = CounterMetricFamily("pgwarden_refusals", "Statements refused, by reason.", labels=["reason"])
        for k, v in s.refusals.items():
            c.add_metric([k], v)
        yield c
        c = CounterMetricFamily("pgwarden_statement_errors",
                                "Statements the database answered with an error, by SQLSTATE class.",
                                labels=["sqlstate_class"])
        for k, v in sorted(s.errors.items()):
            c.add_metric([k], v)
        yield c
        buckets: list[tuple[str, float]] = []
        acc = 0
        for bound, n in zip(LATENCY_BUCKETS, s.latency, strict=False):
            acc += n
            buckets.append((_fmt(bound), acc))
        acc += s.latency[-1]
        buckets.append(("+Inf", acc))
        h = HistogramMetricFamily("pgwarden_statement_duration_seconds",
                                  "Time from a statement's request to its completion, as audited.")
        h.add_metric([], buckets, s.latency_sum)
        yield h
        cache = self._cache()
        c = CounterMetricFamily("pgwarden_decision_cache_hits",
                                "Policy decisions served from a cache (exact text, or a verified template).",
                                labels=["cache"])
        c.add_metric(["exact"], cache["exact"])
        c.add_metric(["template"], cache["template"])
        yield c
        c = CounterMetricFamily("pgwarden_decision_cache_misses",
                                "Policy decisions that needed a full parse and rewrite.")
        c.add_metric([], cache["misses"])
        yield c
        c = CounterMetricFamily("pgwarden_upstream_errors",
                                "Failures talking to the database server, by kind.", labels=["kind"])
        for k, v in s.upstream_errors.items():
            c.add_metric([k], v)
        yield c
        c = CounterMetricFamily("pgwarden_lockouts", "People locked out by a guard.")
        c.add_metric([], s.lockouts)
        yield c
        c = CounterMetricFamily("pgwarden_cancel_requests", "Cancel requests forwarded to the database.")
        c.add_metric([], s.cancels)
        yield c
        c = CounterMetricFamily("pgwarden_rules_reloads", "Rules reloads, by result.", labels=["result"])
        for k, v in s.reloads.items():
            c.add_metric([k], v)
        yield c
        c = CounterMetricFamily("pgwarden_tls_reloads", "TLS certificate reloads, by result.", labels=["result"])
        for k, v in s.tls_reloads.items():
            c.add_metric([k], v)
        yield c


def _fmt(bound: float) -> str:
    return repr(float(bound))


def make_registry(stats: Stats, open_connections: Callable[[], int],
                  cache_counts: Callable[[], dict[str, int]]) -> CollectorRegistry:
    """A registry per server (several servers in one test process never share metrics)."""
    from prometheus_client.process_collector import ProcessCollector

    reg = CollectorRegistry(auto_describe=False)
    reg.register(StatsCollector(stats, open_connections, cache_counts))
    ProcessCollector(registry=reg)
    return reg
