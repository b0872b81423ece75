"""Environment variables override the file (12-factor); `pgwarden config show` hides every secret."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy.verifiers import make_md5, make_scram_verifier
from proxy.config import ENV_OVERRIDES, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
SCRAM = make_scram_verifier("s3cret-user-pw")
MD5 = make_md5("s3cret-pms-pw", "pms")


def config_file(tmp_path: Path) -> Path:
    p = tmp_path / "pgwarden.yaml"
    p.write_text(
        "listen: {host: 127.0.0.1, port: 6432}\n"
        "upstream:\n  host: db.internal\n  port: 5432\n  user: pgwarden_svc\n  password: file-password\n"
        "audit: {path: /var/log/pgwarden/audit.jsonl}\n"
        "secret: file-secret-value\n"
        "users:\n"
        f"  alice: {{role: front_desk, department: FO, password: '{SCRAM}'}}\n"
        f"  pms: {{role: pms_integration, method: md5, md5: '{MD5}'}}\n",
        encoding="utf-8")
    return p


def test_file_alone(tmp_path: Path) -> None:
    cfg = load_config(config_file(tmp_path), environ={})
    assert (cfg.upstream.host, cfg.upstream.port, cfg.upstream.password) == ("db.internal", 5432, "file-password")
    assert cfg.env_overrides == ()
    assert cfg.metrics_listen is None and cfg.shutdown_grace == 30.0


def test_environment_overrides_connection_settings_and_secrets(tmp_path: Path) -> None:
    env = {
        "PGWARDEN_UPSTREAM_HOST": "10.0.0.7", "PGWARDEN_UPSTREAM_PORT": "6543", "PGWARDEN_UPSTREAM_USER": "svc2",
        "PGWARDEN_UPSTREAM_PASSWORD": "env-password", "PGWARDEN_UPSTREAM_SSLMODE": "require",
        "PGWARDEN_LISTEN_HOST": "0.0.0.0", "PGWARDEN_LISTEN_PORT": "7432",
        "PGWARDEN_AUDIT_PATH": "-", "PGWARDEN_SECRET": "env-secret",
        "PGWARDEN_METRICS_LISTEN": "0.0.0.0:9187", "PGWARDEN_SHUTDOWN_GRACE": "5",
        "PGWARDEN_MAX_CONNECTIONS": "77", "PGWARDEN_UNRELATED": "x", "PGWARDEN_UPSTREAM_HOST_EXTRA": "y",
    }
    cfg = load_config(config_file(tmp_path), environ=env)
    assert (cfg.upstream.host, cfg.upstream.port, cfg.upstream.user, cfg.upstream.password,
            cfg.upstream.sslmode) == ("10.0.0.7", 6543, "svc2", "env-password", "require")
    assert (cfg.listen_host, cfg.listen_port, cfg.audit_path) == ("0.0.0.0", 7432, "-")
    assert cfg.secret == b"env-secret"
    assert cfg.metrics_listen == ("0.0.0.0", 9187)
    assert cfg.shutdown_grace == 5.0
    assert cfg.max_connections == 77
    assert cfg.env_overrides == tuple(sorted(k for k in env if k in ENV_OVERRIDES))


def test_empty_variables_are_ignored(tmp_path: Path) -> None:
    cfg = load_config(config_file(tmp_path), environ={"PGWARDEN_UPSTREAM_HOST": ""})
    assert cfg.upstream.host == "db.internal"


def test_invalid_values_name_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(config_file(tmp_path), environ={"PGWARDEN_UPSTREAM_PORT": "70000"})
    assert str(e.value) == "environment variable PGWARDEN_UPSTREAM_PORT: port must be between 1 and 65535"
    with pytest.raises(ConfigError) as e:
        load_config(config_file(tmp_path), environ={"PGWARDEN_UPSTREAM_SSLMODE": "maybe"})
    assert str(e.value) == ("environment variable PGWARDEN_UPSTREAM_SSLMODE: sslmode must be one of "
                            "disable, prefer, require")
    with pytest.raises(ConfigError) as e:
        load_config(config_file(tmp_path), environ={"PGWARDEN_TLS_CERT": str(tmp_path / "none.pem")})
    assert str(e.value) == "environment variable PGWARDEN_TLS_CERT: tls needs both cert and key"


def test_config_show_prints_the_effective_configuration_with_secrets_hidden(tmp_path: Path) -> None:
    path = config_file(tmp_path)
    env = {"PATH": "/usr/bin:/bin", "PGWARDEN_UPSTREAM_PASSWORD": "env-password", "PGWARDEN_LISTEN_PORT": "7000"}
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "config", "show", "--config", str(path)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    for secret in ("env-password", "file-password", "file-secret-value", SCRAM, MD5, SCRAM.split("$")[2]):
        assert secret not in r.stdout
    shown = yaml.safe_load(r.stdout)
    assert shown["listen"] == {"host": "127.0.0.1", "port": 7000}
    assert shown["upstream"] == {"host": "db.internal", "port": 5432, "user": "pgwarden_svc",
                                 "password": "<hidden>", "sslmode": "prefer", "connect_timeout": 10.0}
    assert shown["secret"] == "<hidden>"
    assert shown["users"] == {
        "alice": {"role": "front_desk", "department": "FO", "method": "scram-sha-256", "password": "<hidden>"},
        "pms": {"role": "pms_integration", "method": "md5", "md5": "<hidden>"},
    }
    assert shown["from_environment"] == ["PGWARDEN_LISTEN_PORT", "PGWARDEN_UPSTREAM_PASSWORD"]
    assert shown["audit"] == {"path": "/var/log/pgwarden/audit.jsonl", "key": None, "write_ahead": True,
                              "anchor_every": 1000, "anchor_seconds": 5.0}


def test_config_show_reports_errors_with_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstream: {host: x}\nmetrics: {listen: 'nowhere:port'}\n", encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "config", "show", "--config", str(bad)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2
    assert r.stderr == f"pgwarden: {bad}:2: expected host:port, not 'nowhere:port'\n"


def test_audit_value_key_from_the_environment_and_hidden(tmp_path: Path) -> None:
    from proxy.config import effective_config

    assert load_config(config_file(tmp_path), environ={}).audit_value_key is None
    cfg = load_config(config_file(tmp_path), environ={"PGWARDEN_AUDIT_VALUE_KEY": "a-long-audit-value-key"})
    assert cfg.audit_value_key == b"a-long-audit-value-key"
    assert effective_config(cfg)["audit"]["value_key"] == "<hidden>"
    with pytest.raises(ConfigError) as ei:
        load_config(config_file(tmp_path), environ={"PGWARDEN_AUDIT_VALUE_KEY": "short"})
    assert "value_key" in str(ei.value) and "16 characters" in str(ei.value)
