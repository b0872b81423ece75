"""proxy.config: a valid file parses to the right values; every error names file:line of the culprit."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest

from proxy.verifiers import make_md5, make_scram_verifier
from proxy.config import (
    Config,
    ConfigError,
    TLSConfig,
    UpstreamConfig,
    UserEntry,
    load_config,
    load_yaml_text,
    parse_config,
)
from proxy.wire.codec import DEFAULT_MAX_MESSAGE

SCRAM = make_scram_verifier("pw", salt=b"0123456789abcdef")
MD5 = make_md5("pw", "bob")


def parse(text: str, source: str = "pgwarden.yaml") -> Config:
    data, loc = load_yaml_text(text, source)
    return parse_config(data, loc)


def error_of(text: str, source: str = "pgwarden.yaml") -> str:
    with pytest.raises(ConfigError) as ei:
        parse(text, source)
    return str(ei.value)


def assert_error(text: str, line: int, fragment: str, source: str = "pgwarden.yaml") -> None:
    msg = error_of(text, source)
    assert msg.startswith(f"{source}:{line}: "), msg
    assert fragment in msg, msg


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_text("cert")
    key.write_text("key")
    return cert, key


class TestValid:
    def test_full_config(self, tls_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
        cert, key = tls_files
        monkeypatch.setenv("PGWARDEN_TEST_UPSTREAM_PW", "s3cret")
        text = f"""\
# pgwarden
listen:
  host: 0.0.0.0
  port: 7432
tls:
  cert: {cert}
  key: {key}
upstream:
  host: db.internal
  port: 5433
  user: svc
  password: env:PGWARDEN_TEST_UPSTREAM_PW
  sslmode: require
  connect_timeout: 2.5
auth:
  trust:
    - 10.0.0.0/8
    - 192.168.1.5
    - "fd00::/8"
audit:
  path: /var/log/pgwarden/audit.jsonl
limits:
  max_message_size: 1048576
  max_connections: 50
secret: fixed-secret
users:
  alice:
    role: analyst
    department: Sales
    attributes:
      region: EU
      level: 3
    password: '{SCRAM}'
  bob:
    role: clerk
    md5: {MD5}
  carol:
    role: auditor
    password: '{SCRAM}'
    method: password
  "2024":
    role: numeric
    department: 42
    password: '{SCRAM}'
"""
        cfg = parse(text, "full.yaml")
        assert cfg.listen_host == "0.0.0.0"
        assert cfg.listen_port == 7432
        assert cfg.tls == TLSConfig(cert=str(cert), key=str(key))
        assert cfg.upstream == UpstreamConfig(
            host="db.internal", port=5433, user="svc", password="s3cret", sslmode="require", connect_timeout=2.5
        )
        assert cfg.trust_networks == (
            ipaddress.ip_network("10.0.0.0/8"),
            ipaddress.ip_network("192.168.1.5/32"),
            ipaddress.ip_network("fd00::/8"),
        )
        assert cfg.audit_path == "/var/log/pgwarden/audit.jsonl"
        assert cfg.max_message_size == 1048576
        assert cfg.max_connections == 50
        assert cfg.secret == b"fixed-secret"
        assert cfg.source == "full.yaml"
        assert cfg.users == {
            "alice": UserEntry(
                name="alice", role="analyst", department="Sales", attributes={"region": "EU", "level": 3},
                scram=SCRAM, md5=None, method="scram-sha-256",
            ),
            "bob": UserEntry(name="bob", role="clerk", md5=MD5, method="md5"),
            "carol": UserEntry(name="carol", role="auditor", scram=SCRAM, method="password"),
            "2024": UserEntry(name="2024", role="numeric", department="42", scram=SCRAM),
        }

    def test_minimal_defaults(self) -> None:
        cfg = parse("upstream:\n")
        assert cfg.upstream == UpstreamConfig()
        assert cfg.upstream == UpstreamConfig(
            host="127.0.0.1", port=5432, user="pgwarden_svc", password=None, sslmode="prefer", connect_timeout=10.0
        )
        assert (cfg.listen_host, cfg.listen_port) == ("127.0.0.1", 6432)
        assert cfg.tls is None
        assert cfg.trust_networks == ()
        assert cfg.audit_path == "-"
        assert cfg.max_message_size == DEFAULT_MAX_MESSAGE
        assert cfg.max_connections == 1000
        assert cfg.users == {}
        assert len(cfg.secret) == 32

    def test_random_secret_per_parse(self) -> None:
        assert parse("upstream: {}\n").secret != parse("upstream: {}\n").secret

    def test_plain_upstream_password(self) -> None:
        assert parse("upstream:\n  password: hunter2\n").upstream.password == "hunter2"

    def test_trust_network_host_bits_allowed(self) -> None:
        cfg = parse("upstream: {}\nauth:\n  trust: [10.1.2.3/8]\n")
        assert cfg.trust_networks == (ipaddress.ip_network("10.0.0.0/8"),)

    def test_user_with_both_verifiers_and_explicit_md5(self) -> None:
        cfg = parse(f"upstream: {{}}\nusers:\n  bob: {{role: r, password: '{SCRAM}', md5: {MD5}, method: md5}}\n")
        assert cfg.users["bob"] == UserEntry(name="bob", role="r", scram=SCRAM, md5=MD5, method="md5")

    def test_load_config_from_file(self, tmp_path: Path) -> None:
        p = tmp_path / "pgwarden.yaml"
        p.write_text(f"upstream:\n  host: h\nusers:\n  alice: {{role: r, password: '{SCRAM}'}}\n")
        cfg = load_config(p)
        assert cfg.source == str(p)
        assert cfg.upstream.host == "h"
        assert list(cfg.users) == ["alice"]

    def test_empty_yaml(self) -> None:
        data, loc = load_yaml_text("", "e.yaml")
        assert data == {}


class TestErrorLines:
    def test_unknown_top_level_key(self) -> None:
        text = "# comment\n\nupstream:\n  host: h\nlisen: 1\n"
        assert_error(text, 5, "unknown key 'lisen' (expected one of: admin_users, analysis, audit, auth, limits, listen, metrics, rules, secret, shutdown_grace, state, tls, upstream, users)")

    def test_unknown_upstream_key(self) -> None:
        text = "upstream:\n  host: h\n  # a comment\n  hots: x\n"
        assert_error(text, 4, "unknown key 'hots'")

    def test_unknown_user_key(self) -> None:
        text = f"upstream: {{}}\nusers:\n  alice:\n    role: r\n    password: '{SCRAM}'\n    rol: s\n"
        assert_error(text, 6, "unknown key 'rol'")

    def test_unknown_key_in_flow_mapping(self) -> None:
        text = "upstream: {}\nlisten: {host: h, prot: 1}\n"
        assert_error(text, 2, "unknown key 'prot' (expected one of: host, port)")

    @pytest.mark.parametrize("value", ["\n  a: 1\n", "\n  - 1\n"])
    def test_unknown_key_with_block_value(self, value: str) -> None:
        text = "upstream:\n  host: h\nbogus:" + value
        assert_error(text, 3, "unknown key 'bogus'")

    def test_user_without_role_flow(self) -> None:
        text = f"upstream: {{}}\nusers:\n  bob: {{role: r, password: '{SCRAM}'}}\n  alice: {{password: '{SCRAM}'}}\n"
        assert_error(text, 4, "user 'alice' needs a role")

    def test_user_with_empty_role(self) -> None:
        text = f"upstream: {{}}\nusers:\n  alice: {{role: '', password: '{SCRAM}'}}\n"
        assert_error(text, 3, "user 'alice' needs a role")

    def test_user_without_role_block(self) -> None:
        text = f"upstream: {{}}\nusers:\n  alice:\n    department: x\n    password: '{SCRAM}'\n"
        assert_error(text, 3, "user 'alice' needs a role")

    def test_user_entry_not_a_mapping(self) -> None:
        text = "upstream: {}\nusers:\n  alice:\n"
        assert_error(text, 3, "'users.alice' must be a mapping")

    def test_users_not_a_mapping(self) -> None:
        # errors about a key point at the key's line
        text = "upstream: {}\nusers:\n  - alice\n"
        assert_error(text, 2, "users must be a mapping of name -> entry")

    @pytest.mark.parametrize("pw", ["hunter2", "md5", "md5" + "0" * 31, "md5" + "G" * 32, "SCRAM-SHA-25"])
    def test_clear_text_password_refused(self, pw: str) -> None:
        text = f"upstream: {{}}\nusers:\n  alice:\n    role: r\n\n    password: '{pw}'\n"
        assert_error(text, 6, "user 'alice': expected a SCRAM-SHA-256 verifier or an md5 hash")
        assert "clear-text passwords are not accepted" in error_of(text)

    def test_clear_text_in_md5_key_refused(self) -> None:
        text = "upstream: {}\nusers:\n  bob:\n    role: r\n    md5: hunter2\n"
        assert_error(text, 5, "expected a SCRAM-SHA-256 verifier or an md5 hash")

    def test_password_not_a_string(self) -> None:
        text = "upstream: {}\nusers:\n  alice:\n    role: r\n    password: 12345\n"
        assert_error(text, 5, "password verifiers are strings")

    def test_malformed_scram_verifier(self) -> None:
        text = "upstream: {}\nusers:\n  alice:\n    role: r\n    password: 'SCRAM-SHA-256$4096:xx$yy:zz'\n"
        assert_error(text, 5, "malformed SCRAM-SHA-256 verifier")

    def test_bad_method(self) -> None:
        text = f"upstream: {{}}\nusers:\n  alice:\n    role: r\n    password: '{SCRAM}'\n    method: trust\n"
        assert_error(text, 6, "method must be one of scram-sha-256, md5, password")

    def test_md5_method_without_md5_hash(self) -> None:
        text = f"upstream: {{}}\nusers:\n  x: {{role: r, password: '{SCRAM}'}}\n  alice: {{role: r, password: '{SCRAM}', method: md5}}\n"
        assert_error(text, 4, "user 'alice' uses md5 but has no md5 hash")

    def test_scram_method_without_verifier(self) -> None:
        text = f"upstream: {{}}\nusers:\n  bob: {{role: r, md5: {MD5}, method: scram-sha-256}}\n"
        assert_error(text, 3, "user 'bob' has no SCRAM-SHA-256 verifier")

    def test_user_without_any_verifier(self) -> None:
        text = "upstream: {}\nusers:\n  bob: {role: r}\n"
        assert_error(text, 3, "user 'bob' has no SCRAM-SHA-256 verifier")

    def test_password_method_without_verifier(self) -> None:
        text = "upstream: {}\nusers:\n  bob: {role: r, method: password}\n"
        assert_error(text, 3, "user 'bob' has no password verifier")

    def test_bad_sslmode(self) -> None:
        text = "upstream:\n  host: h\n  port: 5432\n  sslmode: verify-full\n"
        assert_error(text, 4, "sslmode must be one of disable, prefer, require")

    def test_duplicate_top_level_key(self) -> None:
        text = "upstream:\n  host: a\nlisten: {}\nupstream:\n  host: b\n"
        assert_error(text, 4, "duplicate key 'upstream'")

    def test_duplicate_nested_key(self) -> None:
        text = "upstream:\n  host: a\n  port: 1\n  host: b\n"
        assert_error(text, 4, "duplicate key 'host'")

    def test_duplicate_user(self) -> None:
        text = f"upstream: {{}}\nusers:\n  alice: {{role: r, password: '{SCRAM}'}}\n  bob: {{role: r, md5: {MD5}}}\n  alice: {{role: s}}\n"
        assert_error(text, 5, "duplicate key 'alice'")

    @pytest.mark.parametrize(
        "text,line,fragment",
        [
            ("upstream:\n  host: h\n\tport: 1\n", 3, "found character '\\t' that cannot start any token"),
            ("upstream:\n  host: a: b\n", 2, "mapping values are not allowed here"),
            ("upstream:\n  host: h\n  - x\n", 3, ""),
        ],
    )
    def test_invalid_yaml_syntax(self, text: str, line: int, fragment: str) -> None:
        assert_error(text, line, "invalid YAML: " + fragment)

    @pytest.mark.parametrize(
        "text,line",
        [
            ("upstream:\n  host: h\n  port: [1, 2\n", 3),
            ("upstream:\n  host: 'unterminated\nlisten: {}\nx: 1\ny: 2\n", 2),
        ],
    )
    def test_unterminated_construct_points_at_its_start(self, text: str, line: int) -> None:
        assert_error(text, line, "invalid YAML")

    def test_not_a_mapping(self) -> None:
        assert_error("- a\n- b\n", 1, "'config' must be a mapping")

    def test_section_not_a_mapping(self) -> None:
        assert_error("upstream:\n  host: h\nlisten: 6432\n", 3, "'listen' must be a mapping")

    def test_upstream_required(self) -> None:
        assert_error("listen:\n  port: 1\n", 1, "an 'upstream' section (the real PostgreSQL) is required")

    def test_tls_key_file_missing(self, tls_files: tuple[Path, Path], tmp_path: Path) -> None:
        cert, _ = tls_files
        missing = tmp_path / "nope.key"
        text = f"upstream: {{}}\ntls:\n  cert: {cert}\n  key: {missing}\n"
        assert_error(text, 4, f"tls key file '{missing}' does not exist")

    def test_tls_cert_file_missing(self, tls_files: tuple[Path, Path], tmp_path: Path) -> None:
        _, key = tls_files
        missing = tmp_path / "nope.crt"
        text = f"upstream: {{}}\n\ntls:\n  key: {key}\n  cert: {missing}\n"
        assert_error(text, 5, f"tls cert file '{missing}' does not exist")

    def test_tls_path_is_a_directory(self, tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
        _, key = tls_files
        text = f"upstream: {{}}\ntls:\n  cert: {tmp_path}\n  key: {key}\n"
        assert_error(text, 3, "tls cert file")

    def test_tls_needs_both(self, tls_files: tuple[Path, Path]) -> None:
        cert, _ = tls_files
        text = f"upstream: {{}}\ntls: {{cert: {cert}}}\n"
        assert_error(text, 2, "tls needs both cert and key")

    def test_env_password_set(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("PGW_UT_PW", "from-env")
        assert parse("upstream:\n  password: env:PGW_UT_PW\n").upstream.password == "from-env"

    def test_env_password_set_but_empty(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("PGW_UT_PW", "")
        assert parse("upstream:\n  password: env:PGW_UT_PW\n").upstream.password == ""

    def test_env_password_unset(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("PGW_UT_PW_MISSING", raising=False)
        text = "upstream:\n  host: h\n  user: u\n  password: env:PGW_UT_PW_MISSING\n"
        assert_error(text, 4, "environment variable PGW_UT_PW_MISSING is not set")

    def test_bad_trust_network(self) -> None:
        text = "upstream: {}\nauth:\n  trust:\n    - 10.0.0.0/8\n    - 10.0.0.0/33\n"
        assert_error(text, 5, "10.0.0.0/33")

    def test_unknown_auth_key(self) -> None:
        text = "upstream: {}\nauth:\n  trust: []\n  md5: true\n"
        assert_error(text, 4, "unknown key 'md5' (expected one of: trust)")

    def test_attributes_not_a_mapping(self) -> None:
        text = f"upstream: {{}}\nusers:\n  alice:\n    role: r\n    password: '{SCRAM}'\n    attributes: [a]\n"
        assert_error(text, 6, "attributes must be a mapping")

    @pytest.mark.parametrize(
        "text,line",
        [
            ("upstream:\n  host: h\n  port: abc\n", 3),
            ("upstream:\n  connect_timeout: soon\n", 2),
            ("upstream: {}\nlisten:\n  port: x\n", 3),
            ("upstream: {}\nlimits:\n  max_connections: lots\n", 3),
        ],
    )
    def test_non_numeric_values(self, text: str, line: int) -> None:
        assert_error(text, line, "")

    @pytest.mark.parametrize("value", ["5", "10.0.0.0/8"])
    def test_trust_not_a_list(self, value: str) -> None:
        text = f"upstream: {{}}\nauth:\n  trust: {value}\n"
        msg = error_of(text)
        assert msg.startswith("pgwarden.yaml:3: ")
        assert "'1' does not appear" not in msg

    def test_error_source_from_file(self, tmp_path: Path) -> None:
        p = tmp_path / "conf.yaml"
        p.write_text("upstream:\n  sslmode: maybe\n")
        with pytest.raises(ConfigError, match=re.escape(f"{p}:2: sslmode must be one of")):
            load_config(p)

    def test_missing_file(self, tmp_path: Path) -> None:
        p = tmp_path / "absent.yaml"
        with pytest.raises(ConfigError, match=re.escape(f"{p}:1: cannot read: No such file or directory")):
            load_config(p)


def test_user_networks_are_parsed_and_checked() -> None:
    from proxy.guards.checks import device_refusal
    from rules.principal import Principal

    text = f"""upstream: {{host: db}}
users:
  ann:
    role: r
    password: "{SCRAM}"
    networks: [192.168.7.0/24, '2001:db8::/32']
"""
    nets = parse(text).users["ann"].networks
    assert [str(n) for n in nets] == ["192.168.7.0/24", "2001:db8::/32"]
    inside = Principal("ann", "r", None, client_addr="192.168.7.20")
    outside = Principal("ann", "r", None, client_addr="192.168.8.1")
    assert device_refusal(inside, nets, None) is None
    mapped = Principal("ann", "r", None, client_addr="::ffff:192.168.7.20")  # a dual-stack listener's view
    assert device_refusal(mapped, nets, None) is None
    assert device_refusal(outside, nets, None) == ("pgwarden: user ann may connect only from designated devices "
                                                   "(192.168.7.0/24, 2001:db8::/32), not from 192.168.8.1")
    assert_error(text.replace("2001:db8::/32", "300.1.1.1/8"), 6, "300.1.1.1/8")


def test_certificate_fingerprints_are_normalised_and_checked() -> None:
    fp = "AB:" * 31 + "CD"
    text = f"""upstream: {{host: db}}
users:
  ann:
    role: r
    password: "{SCRAM}"
    certificates: ["{fp}", "sha256={'0' * 64}"]
"""
    assert parse(text).users["ann"].certificates == ("ab" * 31 + "cd", "0" * 64)
    assert_error(text.replace(fp, "abc"), 6, "64 hex digits")


def test_analysis_limits_are_read_and_checked() -> None:
    cfg = parse("upstream: {host: h}\nanalysis: {max_statement_bytes: 4096, timeout: 2.5, workers: 2}\n")
    assert (cfg.analysis.max_statement_bytes, cfg.analysis.timeout, cfg.analysis.workers) == (4096, 2.5, 2)
    assert cfg.analysis.offload_bytes == 2048  # defaults for what is not given
    assert_error("upstream: {host: h}\nanalysis:\n  timeout: 0\n", 3, "timeout must be between 0.1 and 3600")
    assert_error("upstream: {host: h}\nanalysis:\n  workerz: 1\n", 3, "unknown key 'workerz'")
