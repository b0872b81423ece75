"""proxy.net.analysis_pool with real worker processes: decisions, time limits, lost workers, the queue."""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import replace

from proxy.config import AnalysisLimits
from proxy.net.analysis_pool import AnalysisPool
from rules.engine import Engine, Job, analyse
from rules.model import load_rules
from tests.unit.test_rewrite_fixtures import RULES, _CATALOG, grants_of

SENSITIVE = Engine(load_rules(RULES))._sensitive


def _job(sql: str, user: str = "alice") -> Job:
    return Job((), sql, grants_of(user), _CATALOG, None, SENSITIVE, 200_000)


def _in_list(n: int) -> str:
    return "SELECT count(*) FROM cs_records WHERE category IN (" + ",".join(f"'c{i}'" for i in range(n)) + ")"


async def test_a_worker_decides_as_the_event_loop_would() -> None:
    pool = AnalysisPool(AnalysisLimits(timeout=60))
    try:
        for sql, user in ((_in_list(300), "alice"), ("SELECT phone FROM guests WHERE phone = '13912345678'", "dave"),
                          ("/*/**/ SELECT '*/ SELECT phone FROM cs_records --'", "alice")):
            got = await pool.run(_job(sql, user))
            want = analyse(_job(sql, user))
            assert (got.action, got.sql, got.reason, got.redacted, got.tables) == \
                   (want.action, want.sql, want.reason, want.redacted, want.tables), sql[:60]
        assert pool.jobs == 3 and len(pool._all) == 1  # one worker, grants and catalog sent once
    finally:
        pool.close()


async def test_an_analysis_past_its_time_limit_is_refused_and_its_worker_replaced() -> None:
    pool = AnalysisPool(AnalysisLimits(timeout=0.3))
    try:
        slow = await pool.run(_job(_in_list(30_000)))
        assert slow.action == "refuse" and slow.sqlstate == "42501" and slow.reason == "analysis timed out", slow
        assert "analysis.timeout" in slow.message and pool.timeouts == 1
        pool.limits = replace(pool.limits, timeout=60)
        ok = await pool.run(_job("SELECT count(*) FROM cs_records"))
        assert ok.action == "rewrite", ok
    finally:
        pool.close()


async def test_a_worker_that_dies_refuses_its_job_and_the_next_job_gets_a_new_one() -> None:
    pool = AnalysisPool(AnalysisLimits(timeout=60))
    try:
        first = await pool.run(_job("SELECT 1"))
        assert first.action == "allow"
        (worker,) = pool._all
        task = asyncio.ensure_future(pool.run(_job(_in_list(30_000))))
        await asyncio.sleep(0.5)
        os.kill(worker.process.pid, signal.SIGKILL)
        lost = await task
        assert lost.action == "refuse" and lost.reason == "analysis worker lost", lost
        again = await pool.run(_job("SELECT 1"))
        assert again.action == "allow" and pool._all and pool._all[0] is not worker
    finally:
        pool.close()


async def test_past_the_queue_jobs_are_refused_at_once() -> None:
    pool = AnalysisPool(AnalysisLimits(timeout=60, queue=1))
    try:
        busy = asyncio.ensure_future(pool.run(_job(_in_list(3000))))
        await asyncio.sleep(0)
        waiting = asyncio.ensure_future(pool.run(_job(_in_list(2000))))
        await asyncio.sleep(0)
        full = await pool.run(_job("SELECT 1"))
        assert full.action == "refuse" and full.reason == "analysis queue full", full
        assert (await busy).action == "rewrite" and (await waiting).action == "rewrite"
    finally:
        pool.close()


async def test_closing_refuses_what_waits() -> None:
    pool = AnalysisPool(AnalysisLimits(timeout=60))
    task = asyncio.ensure_future(pool.run(_job(_in_list(20_000))))
    await asyncio.sleep(0.2)
    pool.close()
    got = await task
    assert got.action == "refuse" and got.reason == "shutting down"
    assert (await pool.run(_job("SELECT 1"))).reason == "shutting down"
