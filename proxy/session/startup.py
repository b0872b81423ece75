"""The startup packet's settings: what is forwarded, what pgwarden keeps, what is refused. Pure."""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.wire.codes import SqlState
from rules.settings import setting_problem

__all__ = ["LoginError", "StartupSettings", "split_options", "parse_options", "startup_settings",
           "PGWARDEN_SETTINGS"]

#: Settings that pgwarden itself interprets (tickets and break-glass); never forwarded.
PGWARDEN_SETTINGS = frozenset({"pgwarden.ticket", "pgwarden.emergency"})


class LoginError(Exception):
    """Login ends here, with this SQLSTATE and message (or the upstream's own ErrorResponse)."""

    def __init__(self, sqlstate: str, message: str, raw: bytes | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.raw = raw  # an ErrorResponse from the upstream, relayed unchanged


@dataclass
class StartupSettings:
    forward: dict[str, str] = field(default_factory=dict)  # parameters for the upstream login
    own: dict[str, str] = field(default_factory=dict)  # pgwarden.ticket / pgwarden.emergency
    unsupported: list[str] = field(default_factory=list)  # _pq_. protocol options to decline

    def search_path(self) -> str | None:
        return next((v for k, v in self.forward.items() if k.lower() == "search_path"), None)


def split_options(options: str) -> list[str]:
    """Split the ``options`` startup parameter exactly as PostgreSQL does (pg_split_opts):
    whitespace separates words and a backslash takes the next character literally."""
    words: list[str] = []
    cur: list[str] = []
    i, n = 0, len(options)
    while i < n:
        c = options[i]
        if c.isspace():
            if cur:
                words.append("".join(cur))
                cur = []
        elif c == "\\" and i + 1 < n:
            i += 1
            cur.append(options[i])
        else:
            cur.append(c)
        i += 1
    if cur:
        words.append("".join(cur))
    return words


def parse_options(options: str) -> list[tuple[str, str]]:
    """``-c name=value`` / ``--name=value`` pairs from the libpq ``options`` parameter."""
    out: list[tuple[str, str]] = []
    words = split_options(options)
    i = 0
    while i < len(words):
        w = words[i]
        if w == "-c" and i + 1 < len(words):
            kv, i = words[i + 1], i + 2
        elif w.startswith("-c"):
            kv, i = w[2:], i + 1
        elif w.startswith("--"):
            kv, i = w[2:], i + 1
        else:
            raise LoginError(SqlState.INSUFFICIENT_PRIVILEGE,
                             f"pgwarden: startup option {w!r} is not allowed (only -c name=value settings are)")
        if "=" not in kv:
            raise LoginError(SqlState.PROTOCOL_VIOLATION, f"invalid startup option {kv!r}: expected name=value")
        name, value = kv.split("=", 1)
        out.append((name.strip().lower().replace("-", "_"), value))
    return out


def startup_settings(params: dict[str, str]) -> StartupSettings:
    """Sort a StartupMessage's parameters; refuses (LoginError) anything SET would refuse."""
    out = StartupSettings()

    def take(name: str, value: str, how: str) -> None:
        key = name.lower()
        if key in PGWARDEN_SETTINGS:
            out.own[key] = value
            return
        # Exactly what SET allows (rules.settings): one list, whichever way a setting comes.
        why = setting_problem(key, value, how)
        if why is not None:
            raise LoginError(SqlState.INSUFFICIENT_PRIVILEGE, why)
        out.forward[name] = value

    for name, value in params.items():
        low = name.lower()
        if low in ("user", "database"):
            continue
        if low == "replication":
            if value.lower() not in ("false", "0", "off", "no"):
                raise LoginError(SqlState.INSUFFICIENT_PRIVILEGE, "pgwarden: replication connections are not allowed")
            continue
        if low.startswith("_pq_."):
            out.unsupported.append(name)
            continue
        if low == "options":
            for k, v in parse_options(value):
                take(k, v, "startup option")
            continue
        take(name, value, "startup parameter")
    return out
