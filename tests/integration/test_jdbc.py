"""pgjdbc, the PostgreSQL JDBC driver, through pgwarden.

tests/jdbc/Probe.java is compiled once per module with javac and run once per
scenario (``java -cp <classes>:<postgresql.jar> Probe <url> <user> <password>
<scenario> [arg]``). It prints one tab-separated line per result, first field a
keyword; the assertions on exact values are all here. pgjdbc exercises what
psql does not: server-side named prepared statements after prepareThreshold,
CancelRequest from a second socket, NotificationResponse with the backend pid,
pipelined batches (many Bind/Execute before one Sync), and portals read in
chunks (Execute with max_rows, PortalSuspended).
"""

from __future__ import annotations

import os
import subprocess
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Proxy
from tests.integration.fix_clients import pgjdbc_jar, program

PROBE_SRC = Path(__file__).resolve().parent.parent / "jdbc" / "Probe.java"
RUN_TIMEOUT = 90

GUEST_STMT = "SELECT id, name FROM guests WHERE id = $1"

# The escapes Probe.esc() writes.
_UNESCAPE = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}


def _unescape(field: str) -> str | None:
    if field == "\\N":
        return None
    out: list[str] = []
    i = 0
    while i < len(field):
        ch = field[i]
        if ch == "\\" and i + 1 < len(field):
            out.append(_UNESCAPE.get(field[i + 1], field[i + 1]))
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


class ProbeResult:
    """The lines Probe printed, as lists of fields, plus lookup by keyword."""

    def __init__(self, lines: list[list[str | None]], stdout: str, stderr: str) -> None:
        self.lines = lines
        self.stdout = stdout
        self.stderr = stderr

    def all(self, key: str) -> list[list[str | None]]:
        return [ln[1:] for ln in self.lines if ln and ln[0] == key]

    def one(self, key: str) -> list[str | None]:
        found = self.all(key)
        assert len(found) == 1, f"expected one {key} line, got {found}\n--- stdout:\n{self.stdout}"
        return found[0]


class Probe:
    def __init__(self, java: str, classes: Path, jar: Path) -> None:
        self.java = java
        self.classpath = f"{classes}{os.pathsep}{jar}"

    def run(self, proxy: Proxy, scenario: str, *args: str, params: str = "", user: str = "dave",
            password: str = "demo", timeout: float = RUN_TIMEOUT) -> ProbeResult:
        url = f"jdbc:postgresql://127.0.0.1:{proxy.port}/hotel"
        if params:
            url += "?" + params
        argv = [self.java, "-cp", self.classpath, "Probe", url, user, password, scenario, *args]
        try:
            proc = subprocess.run(argv, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"").decode("utf-8", "replace")
            err = (exc.stderr or b"").decode("utf-8", "replace")
            pytest.fail(f"Probe {scenario} ({params}) did not finish in {timeout}s\n"
                        f"--- stdout:\n{out}\n--- stderr:\n{err}")
        stdout = proc.stdout.decode("utf-8")
        stderr = proc.stderr.decode("utf-8", "replace")
        lines = [[_unescape(f) for f in ln.split("\t")] for ln in stdout.splitlines()]
        assert proc.returncode == 0 and lines and lines[-1] == ["DONE"], (
            f"Probe {scenario} ({params}) failed with exit code {proc.returncode}\n"
            f"--- stdout:\n{stdout}\n--- stderr:\n{stderr}")
        return ProbeResult(lines, stdout, stderr)


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Probe:
    """The probe compiled against the pgjdbc jar found; without a JDK or the jar: skip, or fail under CI=true."""
    javac = program("javac", install="a JDK: apt-get install default-jdk-headless")
    java = program("java", install="a JDK: apt-get install default-jdk-headless")
    jar = pgjdbc_jar()
    classes = tmp_path_factory.mktemp("jdbc-probe")
    proc = subprocess.run([javac, "-encoding", "UTF-8", "-Xlint:all", "-d", str(classes), "-cp", str(jar),
                           str(PROBE_SRC)], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"javac failed:\n{proc.stdout}\n{proc.stderr}"
    return Probe(java, classes, jar)


def direct_table(cluster: Any, name: str, ddl: str) -> None:
    """A fresh table created directly on the cluster (not through pgwarden), usable by the service login."""
    cluster.psql(f"DROP TABLE IF EXISTS {name}; CREATE TABLE {name} ({ddl}); GRANT ALL ON {name} TO pgwarden_svc")


def guests_direct(cluster: Any, ids: range) -> dict[int, str]:
    out = cluster.psql(f"SELECT id, name FROM guests WHERE id BETWEEN {ids.start} AND {ids.stop - 1} ORDER BY id")
    rows = dict((int(i), name) for i, name in (ln.split("|", 1) for ln in out.strip().splitlines()))
    assert sorted(rows) == list(ids), "the sample data must have guests with these ids"
    return rows


# --- 1. prepared statements -------------------------------------------------------------------------------

@pytest.mark.parametrize("params", ["", "prepareThreshold=1", "preferQueryMode=simple",
                                    "preferQueryMode=extendedForPrepared"])
def test_prepared_statement_reexecuted(probe: Probe, proxy: Proxy, cluster: Any, params: str) -> None:
    expected = guests_direct(cluster, range(1, 11))
    r = probe.run(proxy, "prepared", params=params)
    simple = "simple" in params

    rows = r.all("ROW")
    got = [(int(i), int(gid), name) for i, _srv, gid, name in rows]  # type: ignore[arg-type]
    assert got == [(i, i, expected[i]) for i in range(1, 11)]
    assert r.all("N") == [[str(i), "1"] for i in range(1, 11)]
    if not simple:
        # pgjdbc's own view of the switch to a named server-side statement ...
        threshold = 1 if "prepareThreshold=1" in params else 5
        assert [srv for _i, srv, _g, _n in rows] == ["true" if i >= threshold else "false" for i in range(1, 11)]
    # ... and the server's: one named statement for this session, none in simple query mode.
    assert r.all("PREPARED") == ([] if simple else [["S_1", GUEST_STMT]])
    assert r.all("CALC") == [[str(i), str(i + 100), f"X{i}", str(Decimal(f"{i}.25") * 2)] for i in range(1, 8)]

    events = proxy.take_events()
    guest_events = [e for e in events if "FROM guests WHERE id" in e["statement"]]
    if simple:
        # Parameters are inlined by pgjdbc: the audit log shows each literal statement.
        assert [e["statement"] for e in guest_events] == [
            f"SELECT id, name FROM guests WHERE id = ('{i}'::int8)" for i in range(1, 11)]
    else:
        assert [e["statement"] for e in guest_events] == [GUEST_STMT] * 10
    assert all(e["outcome"] == "ok" and e["rows"] == 1 and e["user"] == "dave" and e["statement_type"] == "SELECT"
               for e in guest_events), guest_events
    calc = [e for e in events if e["statement"].startswith("SELECT ") and "upper(" in e["statement"]]
    assert len(calc) == 7 and all(e["outcome"] == "ok" and e["rows"] == 1 for e in calc), calc
    assert all(e["outcome"] == "ok" for e in events), [e for e in events if e["outcome"] != "ok"]


# --- 2. cancel --------------------------------------------------------------------------------------------

def test_cancel_from_another_thread(probe: Probe, proxy: Proxy) -> None:
    r = probe.run(proxy, "cancel")
    state, elapsed_ms, message = r.one("CANCEL")
    assert state == "57014", r.stdout
    assert message is not None and "canceling statement due to user request" in message
    assert 900 <= int(elapsed_ms) < 10_000  # type: ignore[arg-type]
    assert r.all("CANCEL_CALL_FAILED") == []
    assert r.one("AFTER") == ["42"]  # the session survives the cancel

    events = proxy.take_events(None)
    sleep = [e for e in events if e.get("statement") == "SELECT pg_sleep(30)"]
    assert [(e["outcome"], e["sqlstate"]) for e in sleep] == [("error", "57014")]
    cancels = [e for e in events if e["event"] == "cancel"]
    assert len(cancels) == 1 and cancels[0]["user"] == "dave"


# --- 3. COPY FROM STDIN -----------------------------------------------------------------------------------

def test_copy_manager_copy_in_and_out(probe: Probe, proxy: Proxy, cluster: Any) -> None:
    direct_table(cluster, "jdbc_copy", "id int PRIMARY KEY, note text")
    r = probe.run(proxy, "copy", "jdbc_copy")
    assert r.one("COPIED") == ["5000"]
    assert r.one("COUNT") == ["5000", "12502500", "note 7 客人"]
    assert r.one("COPYOUT") == ["3", "".join(f"{i}\tnote {i} 客人\n" for i in (1, 2, 3))]
    assert cluster.psql("SELECT count(*), sum(id) FROM jdbc_copy").strip() == "5000|12502500"

    events = proxy.take_events()
    copies = [(e["statement"], e["outcome"], e["rows"]) for e in events if e["statement_type"] == "COPY"]
    assert copies == [("COPY jdbc_copy (id, note) FROM STDIN", "ok", 5000),
                      ("COPY (SELECT id, note FROM jdbc_copy WHERE id <= 3 ORDER BY id) TO STDOUT", "ok", 3)]


# --- 4. LISTEN / NOTIFY -----------------------------------------------------------------------------------

def test_listen_notify_carries_the_real_backend_pid(probe: Probe, proxy: Proxy) -> None:
    r = probe.run(proxy, "notify", "ch")
    b_pid, b_sql_pid = r.one("BPID")
    a_pid, a_sql_pid = r.one("APID")
    # pgwarden hands out the upstream's real pid in BackendKeyData ...
    assert b_pid == b_sql_pid and a_pid == a_sql_pid and a_pid != b_pid
    # ... so the NotificationResponse's pid is the one pgjdbc knows for B.
    assert r.all("NONE") == [], "no notification within 5 s"
    assert r.all("NOTIFY") == [["ch", "hello", b_pid]]
    assert r.one("AFTER") == ["7"]
    events = proxy.take_events()
    assert [(e["statement"], e["outcome"]) for e in events if e["statement"].startswith(("LISTEN", "NOTIFY"))] == [
        ("LISTEN ch", "ok"), ("NOTIFY ch, 'hello'", "ok")]


# --- 5. errors inside a transaction -----------------------------------------------------------------------

def test_error_aborts_transaction_until_rollback(probe: Probe, proxy: Proxy) -> None:
    r = probe.run(proxy, "txerror")
    assert r.one("FIRST") == ["1"]
    assert r.one("ERR1")[:1] == ["22012"]
    assert r.one("ERR2")[:1] == ["25P02"]
    assert r.one("AFTER") == ["3"]
    assert r.one("ERR3")[:1] == ["22012"]  # the same through a PreparedStatement with a parameter
    assert r.one("ERR4")[:1] == ["25P02"]
    assert r.one("AFTER2") == ["2"]

    # pgjdbc's own settings at login (which ones depends on its version) are not part of the scenario.
    events = [(e["statement"], e["outcome"], e.get("sqlstate")) for e in proxy.take_events()
              if not e["statement"].startswith("SET ")]
    assert events == [
        ("BEGIN", "ok", None), ("SELECT 1", "ok", None),
        ("SELECT 1/0", "error", "22012"), ("SELECT 2", "error", "25P02"), ("ROLLBACK", "ok", None),
        ("BEGIN", "ok", None), ("SELECT 3", "ok", None),
        ("SELECT 10 / $1", "error", "22012"), ("SELECT 10 / $1", "error", "25P02"), ("ROLLBACK", "ok", None),
        ("BEGIN", "ok", None), ("SELECT 10 / $1", "ok", None), ("COMMIT", "ok", None)]


# --- 6. batch ---------------------------------------------------------------------------------------------

BATCH_INSERT = "INSERT INTO jdbc_batch (id, note) VALUES ($1, $2)"


@pytest.mark.parametrize("params", ["", "reWriteBatchedInserts=true"])
def test_batch_insert(probe: Probe, proxy: Proxy, cluster: Any, params: str) -> None:
    direct_table(cluster, "jdbc_batch", "id int PRIMARY KEY, note text")
    r = probe.run(proxy, "batch", "jdbc_batch", params=params)
    rewrite = bool(params)
    # Without rewriting every row reports 1; rewritten multi-row INSERTs report SUCCESS_NO_INFO.
    assert r.one("BATCH") == (["1000", "0", "1000"] if rewrite else ["1000", "1000", "0"])
    assert r.one("COUNT") == ["1000", "500500"]
    assert r.one("BATCHERR") == ["23505", "23505"]  # duplicate key in the 6th row of the second batch
    assert r.one("COUNT2") == ["1000", "500500"]  # nothing of the failed batch stays after rollback
    assert cluster.psql("SELECT count(*), sum(id), count(*) FILTER (WHERE note = 'row ' || id) FROM jdbc_batch"
                        ).strip() == "1000|500500|1000"

    events = proxy.take_events()
    inserts = [e for e in events if e["statement_type"] == "INSERT"]
    ok = [e for e in inserts if e["outcome"] == "ok"]
    failed = [e for e in inserts if e["outcome"] != "ok"]
    if not rewrite:
        # 1000 rows of the first batch, then rows 1-5 of the second (run, later rolled back); the 6th fails
        # and the server skips the last 4 up to the Sync: they never run, and each is logged as skipped.
        assert len(ok) == 1005 and all(e["statement"] == BATCH_INSERT and e["rows"] == 1 for e in ok)
        assert [(e["statement"], e["outcome"], e.get("sqlstate")) for e in failed] == [
            (BATCH_INSERT, "error", "23505")] + [(BATCH_INSERT, "skipped", None)] * 4
    else:
        # Multi-row INSERTs of 512+256+128+64+32+8 rows; the second batch is an 8-row INSERT that fails and
        # a 2-row one the server skips to the Sync.
        assert sum(e["rows"] for e in ok) == 1000
        assert [(e["outcome"], e.get("sqlstate")) for e in failed] == [("error", "23505"), ("skipped", None)]


# --- 7. large result read in chunks -----------------------------------------------------------------------

FETCH_SQL = "SELECT g FROM generate_series(1,100000) g"


def test_fetch_size_reads_portal_in_chunks(probe: Probe, proxy: Proxy) -> None:
    r = probe.run(proxy, "fetch")
    assert r.one("FETCH") == ["100000", "5000050000"]
    assert r.one("AFTER") == ["5"]
    events = [e for e in proxy.take_events() if e["statement"] == FETCH_SQL]
    # 100 Executes of 1000 rows end in PortalSuspended, the 101st finds no more rows ("SELECT 0").
    assert [e["outcome"] for e in events] == ["suspended"] * 100 + ["ok"]


# --- audit row counts -------------------------------------------------------------------------------------

def test_audit_rows_per_fetch_chunk(probe: Probe, proxy: Proxy) -> None:
    # Each later Execute is sent alone (Execute + Sync, the queue empty): its rows are that chunk's, not the
    # session's running DataRow count.
    probe.run(proxy, "fetch")
    events = [e for e in proxy.take_events() if e["statement"] == FETCH_SQL]
    assert [e["rows"] for e in events] == [1000] * 100 + [0]


def test_audit_rows_of_begin_is_zero(probe: Probe, proxy: Proxy) -> None:
    # pgjdbc sends BEGIN as a simple Query in front of Parse/Bind/Execute of the statement, after earlier rows.
    probe.run(proxy, "txerror")
    begins = [e for e in proxy.take_events() if e["statement"] == "BEGIN"]
    assert [e["rows"] for e in begins] == [0, 0, 0]


# --- who the DBA sees -------------------------------------------------------------------------------------

APP_SQL = ("SELECT current_setting('application_name'), "
           "(SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid())")


def test_application_name_from_startup_shows_the_person(probe: Probe, proxy: Proxy) -> None:
    # With assumeMinServerVersion >= 9.0 pgjdbc sends application_name in the StartupMessage.
    r = probe.run(proxy, "query", APP_SQL, params="assumeMinServerVersion=16")
    assert r.all("ROW") == [["dave/PostgreSQL JDBC Driver"] * 2]
    assert proxy.take_events("login")[0]["application"] == "PostgreSQL JDBC Driver"


def test_application_name_set_after_login_still_shows_the_person(probe: Probe, proxy: Proxy) -> None:
    # By default pgjdbc sends `SET application_name = 'PostgreSQL JDBC Driver'` after login: the DBA
    # must still see the person behind pgwarden_svc.
    r = probe.run(proxy, "query", APP_SQL)
    assert r.all("ROW") == [["dave/PostgreSQL JDBC Driver"] * 2]
