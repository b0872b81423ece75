"""Finding the real clients the suite drives outside Python: psql, pgbench, a JDK with pgjdbc, Chromium.

A developer without one of them gets a skip that names what to install; CI (``CI=true``, as
.ci/run runs) gets a failure instead, so a client that CI forgot to install can never turn into
a green run that tested nothing. The Python drivers (psycopg, asyncpg, pg8000, SQLAlchemy,
pandas) are imported directly: they come with the ``test`` extra, and a missing one is an error.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest

#: The pgjdbc release the JDBC probe was written against, where Maven puts it.
PGJDBC_VERSION = "42.7.13"
_M2_JAR = (Path.home() / ".m2/repository/org/postgresql/postgresql" / PGJDBC_VERSION
           / f"postgresql-{PGJDBC_VERSION}.jar")
#: Debian's libpostgresql-jdbc-java (what .ci/run installs).
_DEBIAN_JAR = Path("/usr/share/java/postgresql.jar")


def in_ci() -> bool:
    """True when the suite runs in CI, where every real client must be present."""
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def missing(what: str) -> NoReturn:
    """A real client is not installed: fail in CI, skip (saying what to install) elsewhere."""
    if in_ci():
        pytest.fail(f"{what} (CI=true: .ci/run must install it)", pytrace=False)
    pytest.skip(what)


def program(name: str, *alternatives: str, install: str) -> str:
    """The path of an executable on PATH (the first of ``name`` and ``alternatives`` found)."""
    for n in (name, *alternatives):
        found = shutil.which(n)
        if found:
            return found
    missing(f"{name} is not on PATH (install {install})")


def pgjdbc_jar() -> Path:
    """The pgjdbc jar: $PGWARDEN_PGJDBC_JAR, else Maven's copy of PGJDBC_VERSION, else Debian's."""
    explicit = os.environ.get("PGWARDEN_PGJDBC_JAR")
    if explicit:
        if not Path(explicit).is_file():
            missing(f"PGWARDEN_PGJDBC_JAR={explicit} is not a file")
        return Path(explicit)
    for jar in (_M2_JAR, _DEBIAN_JAR):
        if jar.is_file():
            return jar
    missing(f"the pgjdbc jar was found neither at {_M2_JAR} nor at {_DEBIAN_JAR} (apt-get install "
            f"libpostgresql-jdbc-java, or mvn dependency:get -Dartifact=org.postgresql:postgresql:{PGJDBC_VERSION})")
