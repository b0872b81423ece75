"""Random and mutated frontend messages after login, through a running pgwarden (issue 14).

Raw sockets against pgwarden in-process (hotel rules; bob is a restricted role, so write-ahead, rewriting and
refusals are all on the path) in front of the real PostgreSQL. For each session: log in, send a burst of
valid, mutated and random messages, then Sync and a marker query. Whatever happens, pgwarden must answer
(the marker's rows, or a FATAL ErrorResponse before the EOF; a bare EOF only after a Terminate), never with
an internal error (XX000), never print a traceback, and keep serving the other sessions. Seeded and bounded
in time (FUZZ_SECONDS), so CI stays predictable.
"""

from __future__ import annotations

import asyncio
import os
import random
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from proxy.demo.pgcluster import PgCluster
from proxy.wire import codec
from proxy.wire.codes import B, F
from tests.conftest import Proxy, start_proxy
from tests.integration.fix_wire import data_rows, errors, login

ROOT = Path(__file__).resolve().parents[2]
FUZZ_SECONDS = float(os.environ.get("PGWARDEN_FUZZ_SECONDS", "15"))
SEED = int(os.environ.get("PGWARDEN_FUZZ_SEED", "14"))
MARKER = "SELECT 'fuzz-end-marker'"


def frame(t: int, payload: bytes) -> bytes:
    return bytes([t]) + struct.pack("!i", len(payload) + 4) + payload


def templates(rng: random.Random) -> list[bytes]:
    name = rng.choice([b"", b"s1", b"s2"])
    portal = rng.choice([b"", b"p1"])
    sql = rng.choice([b"SELECT 1", b"SELECT $1::int", b"SELECT id, phone FROM cs_records LIMIT 2",
                      b"SELECT count(*) FROM cs_records", b"SELECT 1/0", b"BEGIN", b"COMMIT", b"SELECT 1; SELECT 2",
                      b"SET application_name = 'x'", b"DROP TABLE cs_records", b"SELECT pg_sleep(0.01)"])
    return [
        frame(F.QUERY, sql + b"\x00"),
        frame(F.PARSE, name + b"\x00" + sql + b"\x00" + struct.pack("!hI", 1, 23)),
        frame(F.BIND, portal + b"\x00" + name + b"\x00" + struct.pack("!hhh", 1, 0, 1) + struct.pack("!i", 1) + b"7"
              + struct.pack("!h", 0)),
        frame(F.DESCRIBE, rng.choice([b"S", b"P"]) + rng.choice([name, portal]) + b"\x00"),
        frame(F.EXECUTE, portal + b"\x00" + struct.pack("!i", rng.choice([0, 1, 5]))),
        frame(F.CLOSE, rng.choice([b"S", b"P"]) + rng.choice([name, portal]) + b"\x00"),
        frame(F.SYNC, b""), frame(F.FLUSH, b""),
        frame(F.COPY_DATA, b"junk"), frame(F.FUNCTION_CALL, struct.pack("!I", 1234) + b"\x00\x00\x00\x00\x00\x00"),
    ]


def mutate(rng: random.Random, msg: bytes) -> bytes:
    data = bytearray(msg)
    for _ in range(rng.randint(1, 3)):
        # Mostly payload damage with consistent framing (it reaches the decoders), sometimes framing itself.
        how = rng.choice(["flip", "cut", "insert", "truncate-payload"] * 3 + ["type", "length"])
        if how == "flip":
            i = rng.randrange(len(data))
            data[i] = rng.randrange(256)
        elif how == "cut" and len(data) > 5:
            del data[rng.randrange(5, len(data)):]
            data[1:5] = struct.pack("!i", len(data) - 1)  # consistent framing, broken payload
        elif how == "insert":
            i = rng.randrange(5, len(data) + 1)
            data[i:i] = rng.randbytes(rng.randint(1, 6))
            data[1:5] = struct.pack("!i", len(data) - 1)
        elif how == "type":
            data[0] = rng.choice(b"PBDECSHQFXdcfz\x00\xff")
        elif how == "length":
            data[1:5] = struct.pack("!i", rng.choice([-1, 0, 3, 4, len(data) + 100, 2**31 - 1]))
        elif how == "truncate-payload" and len(data) > 6:
            data[5:] = data[5:5 + rng.randrange(len(data) - 5)]
            data[1:5] = struct.pack("!i", len(data) - 1)
    return bytes(data)


def burst(rng: random.Random) -> list[bytes]:
    out = []
    for _ in range(rng.randint(1, 8)):
        msg = rng.choice(templates(rng))
        r = rng.random()
        if r < 0.35:
            msg = mutate(rng, msg)
        elif r < 0.37:
            msg = rng.randbytes(rng.randint(1, 30))
        out.append(msg)
    return out


@pytest.fixture(scope="module")
def rules_proxy(cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    p = start_proxy(cluster, str(tmp_path_factory.mktemp("fuzz")), rules=str(ROOT / "deploy" / "rules" / "hotel.yaml"),
                    auth={"trust": ["127.0.0.1/32"]})  # quick logins: the time goes to the messages
    try:
        yield p
    finally:
        p.thread.stop()


def framing_waits(stream: bytes, max_size: int) -> bool:
    """Does the stream end inside a message (a length that claims more than was sent)? Then any server waits."""
    reader = codec.MessageReader(max_size)
    try:
        reader.feed(stream)
    except codec.ProtocolError:
        return False
    return reader.buffered > 0


async def read_answer(conn, timeout: float) -> tuple[list[tuple[int, bytes]], bool]:  # type: ignore[no-untyped-def]
    """Messages until the marker's ReadyForQuery, or EOF; (messages, whether it ended in time)."""
    out: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + timeout
    seen_marker = False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return out, False
        try:
            m = await conn.recv(left)
        except (asyncio.TimeoutError, TimeoutError):
            return out, False
        if m is None:
            return out, True
        out.append(m)
        if m[0] == B.DATA_ROW and data_rows([m]) == [[b"fuzz-end-marker"]]:
            seen_marker = True
        if seen_marker and m[0] == B.READY_FOR_QUERY:
            return out, True


async def one_session(port: int, rng: random.Random, max_size: int, rounds: int = 5) -> list[str]:
    """Bursts on one connection, each followed by Sync and the marker, until the connection ends; each
    answer classified (raises on a wrong one)."""
    conn = await login(port, user="bob")
    outcomes: list[str] = []
    try:
        for _ in range(rounds):
            msgs = burst(rng)
            # ROLLBACK first: the burst may have left a transaction aborted, where the marker would fail.
            stream = b"".join(msgs) + frame(F.SYNC, b"") + codec.query_message("ROLLBACK") + codec.query_message(MARKER)
            conn.send(stream)
            waits = framing_waits(stream, max_size)
            if waits:
                conn.writer.write_eof()  # the stream ends inside a message: any server waits; the client gives up
            got, ended = await read_answer(conn, 6)
            assert ended, f"no answer within 6 s to {msgs!r}; got {got!r}"
            errs = errors(got)
            assert not any(e.sqlstate == "XX000" for e in errs), f"internal error for {msgs!r}: {errs}"
            if not conn.eof and any(r == [b"fuzz-end-marker"] for r in data_rows(got)):
                outcomes.append("served")
                continue
            assert conn.eof, f"neither the marker nor EOF for {msgs!r}; got {got!r}"
            if got and got[-1][0] == B.ERROR_RESPONSE and errs[-1].severity == "FATAL":
                outcomes.append("fatal")
            else:
                assert waits or any(m[:1] == b"X" for m in msgs), f"a bare EOF without a FATAL for {msgs!r}: {got!r}"
                outcomes.append("ended")
            break
    finally:
        await conn.close()
    return outcomes


def test_random_and_mutated_messages_after_login(rules_proxy: Proxy, capfd: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(SEED)
    outcomes: dict[str, int] = {}
    deadline = time.monotonic() + FUZZ_SECONDS
    sessions = 0

    async def batch(n: int) -> list[list[str]]:
        size = rules_proxy.thread.config.max_message_size
        return await asyncio.gather(*(one_session(rules_proxy.port, random.Random(rng.random()), size)
                                      for _ in range(n)))

    while time.monotonic() < deadline:
        for outs in asyncio.run(batch(4)):
            for o in outs:
                outcomes[o] = outcomes.get(o, 0) + 1
        sessions += 4
        with psycopg.connect(rules_proxy.dsn("bob"), autocommit=True, connect_timeout=10) as c:
            assert c.execute("SELECT 40 + 2").fetchone() == (42,)  # the proxy keeps serving others
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Fatal error on" not in err and "exception was never retrieved" not in err, err
    assert sessions >= 8 and outcomes.get("served", 0) and outcomes.get("fatal", 0), outcomes
    evs = rules_proxy.take_events(None)
    assert not [e for e in evs if e.get("event") == "internal_error"]
    per_session: dict[str, int] = {}
    for e in evs:
        if e.get("event") == "protocol_error":
            per_session[e["session"]] = per_session.get(e["session"], 0) + 1
    assert set(per_session.values()) <= {1}, per_session  # one protocol_error event per session, at most
