"""pgwarden's server configuration: listen address, TLS, upstream, users.

A DBA reads and edits this YAML by hand, so every error names the file and
line it came from. Users carry PostgreSQL-format password verifiers (never
clear text): ``pgwarden passwd`` prints them.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from proxy.wire.codec import DEFAULT_MAX_MESSAGE
from proxy.verifiers import parse_scram_verifier
from rules.yamlfile import ConfigError, Located, expect, load_yaml, load_yaml_text, parse_networks


# --- the model -------------------------------------------------------------------------------


@dataclass(frozen=True)
class UserEntry:
    """A person (or service account) pgwarden authenticates itself."""

    name: str
    role: str
    department: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    scram: str | None = None  # "SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>"
    md5: str | None = None  # "md5" + md5(password + user), for legacy clients
    method: str = "scram-sha-256"  # or md5 / password (cleartext, TLS only)
    #: Designated devices (R3.6): the networks this person may connect from; empty: anywhere.
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    #: Second factor (R3.6): SHA-256 fingerprints (hex) of client certificates bound to this person.
    certificates: tuple[str, ...] = ()


@dataclass(frozen=True)
class UpstreamConfig:
    host: str = "127.0.0.1"
    port: int = 5432
    user: str = "pgwarden_svc"
    password: str | None = None
    sslmode: str = "prefer"  # disable | prefer | require
    connect_timeout: float = 10.0


@dataclass(frozen=True)
class TLSConfig:
    cert: str
    key: str
    client_ca: str | None = None  # CA of client certificates (the second factor of R3.6); None: none asked


@dataclass(frozen=True)
class AnalysisLimits:
    """``analysis:`` in the config: how large a restricted role's statement may be, and where it is analysed."""

    max_statement_bytes: int = 1 << 20  # refused above this, before any analysis
    max_tokens: int = 200_000  # refused above this, after tokenizing
    offload_bytes: int = 2048  # uncached statements longer than this are analysed in a worker
    timeout: float = 10.0  # seconds an analysis may take
    workers: int = 1
    queue: int = 32  # jobs waiting for a worker; more are refused at once


@dataclass(frozen=True)
class Config:
    upstream: UpstreamConfig
    users: dict[str, UserEntry]
    listen_host: str = "127.0.0.1"
    listen_port: int = 6432
    tls: TLSConfig | None = None
    trust_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    audit_path: str = "-"  # "-" is stdout; %Y and %m make it a monthly template
    audit_replica: str | None = None  # this replica's chain name; default host:listen-port
    audit_on_failure: str = "refuse"  # refuse | continue: restricted roles while the log cannot be written
    audit_key: bytes | None = None  # HMAC-SHA256 key of the chain (from env: or file:, never the file itself)
    audit_key_source: str = ""  # "env:NAME" / "file:PATH", for config show
    audit_write_ahead: bool = True  # restricted roles' statements wait until their statement_start is durable
    audit_anchor_every: int = 1000  # anchor the chain head in the state store every N events ...
    audit_anchor_seconds: float = 5.0  # ... or S seconds, whichever comes first (0: never)
    #: Keys the hashes redacted literals leave in audit events (``audit search --value``); None: no hashes.
    audit_value_key: bytes | None = None
    max_message_size: int = DEFAULT_MAX_MESSAGE
    max_connections: int = 1000
    secret: bytes = b""  # keys the fake SCRAM salts of unknown users; random per start if unset
    rules_path: str | None = None  # access rules (YAML); None: a transparent, audited relay
    source: str = "<config>"
    state: Any = None  # proxy.statestore.StateConfig: where guard state lives; None: no guards
    guards_off: bool = False  # `state: off`: run rules without lockouts and quotas, knowingly
    metrics_listen: tuple[str, int] | None = None  # /metrics, /healthz, /readyz; None: no HTTP listener
    shutdown_grace: float = 30.0  # seconds running statements may finish after SIGTERM
    env_overrides: tuple[str, ...] = ()  # environment variables that replaced values of the file
    admin_users: tuple[str, ...] = ()  # may use the admin console (database pgwarden), besides security directors
    analysis: AnalysisLimits = AnalysisLimits()


_METHODS = ("scram-sha-256", "md5", "password")
_SSLMODES = ("disable", "prefer", "require")


def _number(d: dict[str, Any], key: str, default: float, loc: Located, path: tuple[Any, ...], *,
            integer: bool = True, low: float = 0, high: float = 2**31 - 1) -> Any:
    v = d.get(key, default)
    try:
        if isinstance(v, bool):
            raise ValueError
        n = int(v) if integer else float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{loc.where(*path, key)}: {key} must be a {'whole ' if integer else ''}number, "
                          f"not {v!r}") from None
    expect(low <= n <= high, loc, path + (key,), f"{key} must be between {low} and {high}")
    return n


def _check_keys(d: Any, allowed: set[str], loc: Located, path: tuple[Any, ...]) -> dict[str, Any]:
    expect(isinstance(d, dict), loc, path, f"'{'.'.join(map(str, path)) or 'config'}' must be a mapping")
    for k in d:
        expect(k in allowed, loc, path + (k,), f"unknown key {k!r} (expected one of: {', '.join(sorted(allowed))})")
    return d


def _parse_user(name: str, d: Any, loc: Located) -> UserEntry:
    p = ("users", name)
    d = _check_keys(d, {"password", "md5", "role", "department", "attributes", "method", "networks",
                        "certificates"}, loc, p)
    expect(isinstance(d.get("role"), str) and d["role"], loc, p, f"user {name!r} needs a role")
    scram = md5 = None
    for key in ("password", "md5"):
        v = d.get(key)
        if v is None:
            continue
        expect(isinstance(v, str), loc, p + (key,), "password verifiers are strings")
        if v.startswith("SCRAM-SHA-256$"):
            try:
                parse_scram_verifier(v)
            except ValueError as exc:
                raise ConfigError(f"{loc.where(*p, key)}: {exc}") from exc
            scram = v
        elif len(v) == 35 and v.startswith("md5") and all(c in "0123456789abcdef" for c in v[3:]):
            md5 = v
        else:
            raise ConfigError(
                f"{loc.where(*p, key)}: user {name!r}: expected a SCRAM-SHA-256 verifier or an md5 hash "
                "(run `pgwarden passwd` to make one; clear-text passwords are not accepted)"
            )
    method = d.get("method") or ("scram-sha-256" if scram else "md5" if md5 else "scram-sha-256")
    expect(method in _METHODS, loc, p + ("method",), f"method must be one of {', '.join(_METHODS)}")
    if method == "md5":
        expect(md5 is not None, loc, p, f"user {name!r} uses md5 but has no md5 hash (pgwarden passwd --md5)")
    elif method == "scram-sha-256":
        expect(scram is not None, loc, p, f"user {name!r} has no SCRAM-SHA-256 verifier (pgwarden passwd)")
    else:
        expect(scram is not None or md5 is not None, loc, p, f"user {name!r} has no password verifier")
    attrs = d.get("attributes") or {}
    expect(isinstance(attrs, dict), loc, p + ("attributes",), "attributes must be a mapping")
    dept = d.get("department")
    return UserEntry(
        name=name, role=d["role"], department=None if dept is None else str(dept),
        attributes=dict(attrs), scram=scram, md5=md5, method=method,
        networks=parse_networks(d.get("networks"), loc, p + ("networks",)),
        certificates=_fingerprints(d.get("certificates"), loc, p + ("certificates",)),
    )


def _fingerprints(v: Any, loc: Located, path: tuple[Any, ...]) -> tuple[str, ...]:
    """SHA-256 certificate fingerprints, as `openssl x509 -fingerprint -sha256` prints them or plain hex."""
    if v is None:
        return ()
    expect(isinstance(v, list), loc, path, "certificates must be a list of SHA-256 fingerprints")
    out = []
    for i, f in enumerate(v):
        h = str(f).replace(":", "").lower()
        if h.startswith("sha256="):
            h = h[7:]
        expect(bool(re.fullmatch(r"[0-9a-f]{64}", h)), loc, path + (i,),
                "a certificate fingerprint is 64 hex digits (SHA-256), e.g. from openssl x509 -fingerprint -sha256")
        out.append(h)
    return tuple(out)


def _secret(v: Any, loc: Located, path: tuple[Any, ...]) -> Any:
    """'env:NAME' reads a secret from the environment (so the file holds no password)."""
    if isinstance(v, str) and v.startswith("env:"):
        var = v[4:]
        v = os.environ.get(var)
        expect(v is not None, loc, path, f"environment variable {var} is not set")
    return v


def _audit_key(v: Any, audit_path: str, loc: Located) -> tuple[bytes | None, str]:
    """The chain's HMAC key: ``env:NAME`` or ``file:PATH``; never written in the config itself, and never
    a file beside the log (whoever can write the log must not be able to read the key)."""
    from proxy.audit.chain import MIN_KEY_BYTES

    path = ("audit", "key")
    if v is None:
        return None, ""
    expect(isinstance(v, str) and (v.startswith("env:") or v.startswith("file:")), loc, path,
           "key must be env:VARIABLE or file:/path/to/key (the key itself never goes in the config)")
    if v.startswith("env:"):
        raw = os.environ.get(v[4:])
        expect(bool(raw), loc, path, f"environment variable {v[4:]} is not set (it holds the audit key)")
        key = str(raw).strip().encode()
    else:
        kp = Path(v[5:])
        if not kp.is_absolute() and loc.source not in ("<config>", "<demo>"):
            kp = Path(loc.source).parent / kp
        if audit_path not in ("-", "") and kp.resolve().parent == Path(audit_path).resolve().parent:
            raise ConfigError(f"{loc.where(*path)}: the audit key file must not live beside the audit log "
                              f"({kp.parent}): whoever can write the log could read the key")
        try:
            key = kp.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"{loc.where(*path)}: cannot read the audit key file: {exc}") from None
        v = f"file:{kp}"
    expect(len(key) >= MIN_KEY_BYTES, loc, path,
           f"the audit key must be at least {MIN_KEY_BYTES} bytes (e.g. openssl rand -base64 48)")
    return key, v


def _parse_state(d: Any, upstream: UpstreamConfig, loc: Located) -> Any:
    """The guard state store: its own login (not the service account client sessions use)."""
    from proxy.guards.statestore import StateConfig

    p = ("state",)
    d = _check_keys(d, {"host", "port", "database", "user", "password", "schema", "sslmode", "connect_timeout"},
                    loc, p)
    expect(isinstance(d.get("database"), str) and d["database"], loc, p, "state needs a database")
    expect(isinstance(d.get("user"), str) and d["user"], loc, p,
            "state needs a user of its own (not the upstream service account: clients must not reach the counters)")
    expect(d["user"] != upstream.user, loc, p + ("user",),
            "the state store user must differ from the upstream service account: sessions run as that account "
            "and could otherwise read or reset the counters")
    schema = str(d.get("schema", "pgwarden"))
    expect(bool(re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", schema)), loc, p + ("schema",),
            "schema must be a plain lower-case name")
    sslmode = d.get("sslmode", upstream.sslmode)
    expect(sslmode in _SSLMODES, loc, p + ("sslmode",), f"sslmode must be one of {', '.join(_SSLMODES)}")
    password = _secret(d.get("password"), loc, p + ("password",))
    return StateConfig(
        host=str(d.get("host", upstream.host)), port=_number(d, "port", upstream.port, loc, p, low=1, high=65535),
        database=d["database"], user=d["user"], password=None if password is None else str(password),
        schema=schema, sslmode=sslmode,
        connect_timeout=_number(d, "connect_timeout", 5.0, loc, p, integer=False, low=0.1, high=600))


def parse_config(data: Any, loc: Located) -> Config:
    d = _check_keys(data, {"listen", "tls", "upstream", "auth", "audit", "limits", "users", "secret", "rules",
                           "state", "metrics", "shutdown_grace", "admin_users", "analysis"}, loc, ())
    listen = _check_keys(d.get("listen") or {}, {"host", "port"}, loc, ("listen",))
    up = _check_keys(d.get("upstream") or {}, {"host", "port", "user", "password", "sslmode", "connect_timeout"},
                     loc, ("upstream",))
    expect("upstream" in d, loc, (), "an 'upstream' section (the real PostgreSQL) is required")
    sslmode = up.get("sslmode", "prefer")
    expect(sslmode in _SSLMODES, loc, ("upstream", "sslmode"), f"sslmode must be one of {', '.join(_SSLMODES)}")
    password = _secret(up.get("password"), loc, ("upstream", "password"))
    upstream = UpstreamConfig(
        host=str(up.get("host", "127.0.0.1")), port=_number(up, "port", 5432, loc, ("upstream",), low=1, high=65535), user=str(up.get("user", "pgwarden_svc")),
        password=None if password is None else str(password), sslmode=sslmode,
        connect_timeout=_number(up, "connect_timeout", 10.0, loc, ("upstream",), integer=False, low=0.1, high=3600),
    )
    tls = None
    if d.get("tls"):
        t = _check_keys(d["tls"], {"cert", "key", "client_ca"}, loc, ("tls",))
        expect("cert" in t and "key" in t, loc, ("tls",), "tls needs both cert and key")
        for k in ("cert", "key", "client_ca"):
            expect(k not in t or Path(t[k]).is_file(), loc, ("tls", k), f"tls {k} file {t.get(k)!r} does not exist")
        tls = TLSConfig(cert=str(t["cert"]), key=str(t["key"]),
                        client_ca=str(t["client_ca"]) if t.get("client_ca") else None)
    auth = _check_keys(d.get("auth") or {}, {"trust"}, loc, ("auth",))
    nets = []
    trust = auth.get("trust") or []
    expect(isinstance(trust, list), loc, ("auth", "trust"), "auth.trust must be a list of networks (CIDR)")
    for i, n in enumerate(trust):
        try:
            nets.append(ipaddress.ip_network(str(n), strict=False))
        except ValueError as exc:
            raise ConfigError(f"{loc.where('auth', 'trust', i)}: {exc}") from exc
    audit = _check_keys(d.get("audit") or {}, {"path", "replica", "on_failure", "key", "write_ahead", "anchor_every",
                                               "anchor_seconds", "value_key"}, loc, ("audit",))
    audit_key, audit_key_source = _audit_key(audit.get("key"), str(audit.get("path", "-")), loc)
    write_ahead = audit.get("write_ahead", True)
    expect(isinstance(write_ahead, bool), loc, ("audit", "write_ahead"),
           "write_ahead must be true (restricted roles' statements wait for their durable statement_start) or false")
    value_key = _secret(audit.get("value_key"), loc, ("audit", "value_key"))
    expect(value_key is None or (isinstance(value_key, str) and len(value_key) >= 16), loc, ("audit", "value_key"),
           "value_key must be a secret of at least 16 characters (it keys the hashes of redacted values)")
    on_failure = audit.get("on_failure", "refuse")
    expect(on_failure in ("refuse", "continue"), loc, ("audit", "on_failure"),
            "on_failure must be refuse (restricted roles' statements are refused while the audit log "
            "cannot be written) or continue")
    replica = audit.get("replica")
    expect(replica is None or (isinstance(replica, str) and replica.strip() != ""), loc, ("audit", "replica"),
            "replica must be a non-empty name")
    limits = _check_keys(d.get("limits") or {}, {"max_message_size", "max_connections"}, loc, ("limits",))
    users_raw = d.get("users") or {}
    expect(isinstance(users_raw, dict), loc, ("users",), "users must be a mapping of name -> entry")
    users = {str(name): _parse_user(str(name), u, loc) for name, u in users_raw.items()}
    secret = d.get("secret")
    rules_path = None
    if d.get("rules"):
        rp = Path(str(d["rules"]))
        if not rp.is_absolute() and loc.source not in ("<config>", "<demo>"):
            rp = Path(loc.source).parent / rp
        expect(rp.is_file(), loc, ("rules",), f"rules file {str(rp)!r} does not exist")
        rules_path = str(rp)
    raw_state = d.get("state")
    guards_off = raw_state is False or raw_state == "off"
    state = _parse_state(raw_state, upstream, loc) if raw_state is not None and not guards_off else None
    expect(state is not None or guards_off or not rules_path, loc, ("rules",),
            "rules need a guard state store for lockouts and lookup quotas (R3.4, R3.5): add a state: section "
            "(its own login and database), or `state: off` to run without those guards (not for production)")
    admins = d.get("admin_users") or []
    expect(isinstance(admins, list) and all(isinstance(a, str) for a in admins), loc, ("admin_users",),
            "admin_users must be a list of user names")
    for i, a in enumerate(admins):
        expect(a in users, loc, ("admin_users", i), f"admin_users: no user {a!r} in users")
    a = _check_keys(d.get("analysis") or {}, {"max_statement_bytes", "max_tokens", "offload_bytes", "timeout",
                                             "workers", "queue"}, loc, ("analysis",))
    defaults = AnalysisLimits()
    analysis = AnalysisLimits(
        max_statement_bytes=_number(a, "max_statement_bytes", defaults.max_statement_bytes, loc, ("analysis",),
                                    low=1024, high=1 << 30),
        max_tokens=_number(a, "max_tokens", defaults.max_tokens, loc, ("analysis",), low=100, high=10_000_000),
        offload_bytes=_number(a, "offload_bytes", defaults.offload_bytes, loc, ("analysis",), low=0, high=1 << 30),
        timeout=_number(a, "timeout", defaults.timeout, loc, ("analysis",), integer=False, low=0.1, high=3600),
        workers=_number(a, "workers", defaults.workers, loc, ("analysis",), low=1, high=64),
        queue=_number(a, "queue", defaults.queue, loc, ("analysis",), low=1, high=100_000))
    metrics_listen = None
    if d.get("metrics"):
        m = _check_keys(d["metrics"], {"listen"}, loc, ("metrics",))
        metrics_listen = _host_port(m.get("listen"), loc, ("metrics", "listen"))
    return Config(
        state=state, guards_off=guards_off, upstream=upstream, users=users, listen_host=str(listen.get("host", "127.0.0.1")),
        listen_port=_number(listen, "port", 6432, loc, ("listen",), high=65535), tls=tls, trust_networks=tuple(nets),
        audit_path=str(audit.get("path", "-")), audit_replica=replica, audit_on_failure=on_failure,
        audit_key=audit_key, audit_key_source=audit_key_source, audit_write_ahead=write_ahead,
        audit_anchor_every=_number(audit, "anchor_every", 1000, loc, ("audit",), low=1, high=10_000_000),
        audit_anchor_seconds=_number(audit, "anchor_seconds", 5.0, loc, ("audit",), integer=False, low=0, high=86400),
        audit_value_key=value_key.encode() if value_key else None,
        max_message_size=_number(limits, "max_message_size", DEFAULT_MAX_MESSAGE, loc, ("limits",), low=1024,
                                 high=1 << 30),
        max_connections=_number(limits, "max_connections", 1000, loc, ("limits",), low=1, high=1_000_000),
        secret=str(secret).encode() if secret else os.urandom(32), rules_path=rules_path, source=loc.source,
        metrics_listen=metrics_listen,
        shutdown_grace=_number(d, "shutdown_grace", 30.0, loc, (), integer=False, low=0, high=86400),
        env_overrides=tuple(sorted(set(loc.env.values()))), admin_users=tuple(admins), analysis=analysis,
    )


def _host_port(v: Any, loc: Located, path: tuple[Any, ...]) -> tuple[str, int]:
    """'host:port', '[v6]:port' or ':port' (all interfaces)."""
    expect(isinstance(v, str | int) and str(v), loc, path, "expected host:port, e.g. 0.0.0.0:9187")
    text = str(v)
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "0.0.0.0"
    expect(port.isdigit() and 0 <= int(port) <= 65535, loc, path, f"expected host:port, not {text!r}")
    return host, int(port)


# Environment variables that override the file (12-factor): connection settings and secrets.
# name -> key path in the YAML document.
ENV_OVERRIDES: dict[str, tuple[str, ...]] = {
    "PGWARDEN_LISTEN_HOST": ("listen", "host"),
    "PGWARDEN_LISTEN_PORT": ("listen", "port"),
    "PGWARDEN_UPSTREAM_HOST": ("upstream", "host"),
    "PGWARDEN_UPSTREAM_PORT": ("upstream", "port"),
    "PGWARDEN_UPSTREAM_USER": ("upstream", "user"),
    "PGWARDEN_UPSTREAM_PASSWORD": ("upstream", "password"),
    "PGWARDEN_UPSTREAM_SSLMODE": ("upstream", "sslmode"),
    "PGWARDEN_TLS_CERT": ("tls", "cert"),
    "PGWARDEN_TLS_KEY": ("tls", "key"),
    "PGWARDEN_AUDIT_PATH": ("audit", "path"),
    "PGWARDEN_AUDIT_VALUE_KEY": ("audit", "value_key"),
    "PGWARDEN_RULES": ("rules",),
    "PGWARDEN_SECRET": ("secret",),
    "PGWARDEN_METRICS_LISTEN": ("metrics", "listen"),
    "PGWARDEN_SHUTDOWN_GRACE": ("shutdown_grace",),
    "PGWARDEN_MAX_CONNECTIONS": ("limits", "max_connections"),
    "PGWARDEN_STATE_HOST": ("state", "host"),
    "PGWARDEN_STATE_PORT": ("state", "port"),
    "PGWARDEN_STATE_DATABASE": ("state", "database"),
    "PGWARDEN_STATE_USER": ("state", "user"),
    "PGWARDEN_STATE_PASSWORD": ("state", "password"),
}
_ENV_PATHS = frozenset({("rules",), ("tls", "cert"), ("tls", "key")})  # relative to the working directory


def apply_env(data: Any, loc: Located, environ: Mapping[str, str]) -> Any:
    """Replace values of the document with those of set PGWARDEN_* variables (empty ones are ignored)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return data  # parse_config reports it
    for var, path in ENV_OVERRIDES.items():
        value = environ.get(var)
        if not value:
            continue
        node = data
        for key in path[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                child = {}
                node[key] = child
            node = child
        if path in _ENV_PATHS:
            value = str(Path(value).resolve())
        node[path[-1]] = value
        loc.env[path] = var
    return data


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """The file, then the environment on top (``environ`` defaults to the process's)."""
    data, loc = load_yaml(path)
    data = apply_env(data, loc, os.environ if environ is None else environ)
    return parse_config(data, loc)


HIDDEN = "<hidden>"


def effective_config(cfg: Config) -> dict[str, Any]:
    """The configuration as pgwarden runs it, for ``pgwarden config show``: every secret hidden.

    Passwords, password verifiers and the server secret are replaced by ``<hidden>`` (or
    left out when unset); file paths (TLS key included) are shown, their contents never.
    """
    up = cfg.upstream
    out: dict[str, Any] = {
        "listen": {"host": cfg.listen_host, "port": cfg.listen_port},
        "upstream": {"host": up.host, "port": up.port, "user": up.user,
                     "password": HIDDEN if up.password else None, "sslmode": up.sslmode,
                     "connect_timeout": up.connect_timeout},
        "tls": {"cert": cfg.tls.cert, "key": cfg.tls.key} if cfg.tls else None,
        "auth": {"trust": [str(n) for n in cfg.trust_networks]},
        "audit": {"path": cfg.audit_path, "key": f"{cfg.audit_key_source} ({HIDDEN})" if cfg.audit_key else None,
                  "write_ahead": cfg.audit_write_ahead, "anchor_every": cfg.audit_anchor_every,
                  "anchor_seconds": cfg.audit_anchor_seconds,
                  **({"value_key": HIDDEN} if cfg.audit_value_key else {})},
        "limits": {"max_message_size": cfg.max_message_size, "max_connections": cfg.max_connections},
        "rules": cfg.rules_path,
        "metrics": {"listen": f"{cfg.metrics_listen[0]}:{cfg.metrics_listen[1]}"} if cfg.metrics_listen else None,
        "shutdown_grace": cfg.shutdown_grace,
        "admin_users": list(cfg.admin_users),
        "analysis": dataclasses.asdict(cfg.analysis),
        "secret": HIDDEN,
        "state": "off" if cfg.guards_off else None if cfg.state is None else {
            "host": cfg.state.host, "port": cfg.state.port, "database": cfg.state.database, "user": cfg.state.user,
            "password": HIDDEN if cfg.state.password else None, "schema": cfg.state.schema,
            "sslmode": cfg.state.sslmode},
        "users": {},
    }
    for name, u in cfg.users.items():
        entry: dict[str, Any] = {"role": u.role}
        if u.networks:
            entry["networks"] = [str(n) for n in u.networks]
        if u.department is not None:
            entry["department"] = u.department
        if u.attributes:
            entry["attributes"] = dict(u.attributes)
        entry["method"] = u.method
        if u.scram:
            entry["password"] = HIDDEN
        if u.md5:
            entry["md5"] = HIDDEN
        out["users"][name] = entry
    out["from_environment"] = list(cfg.env_overrides)
    return out
