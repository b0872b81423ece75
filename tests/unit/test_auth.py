"""proxy.auth without sockets: verifiers, the SCRAM server, and authenticate() over fake send/recv.

Verifiers are cross-checked three ways: against an RFC 5802 computation done
here with hashlib, against known-answer vectors produced by PostgreSQL 15
itself (pg_authid.rolpassword), and by running real clients (scramp, and a
hand-built libpq-style exchange with an empty SCRAM user name).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Callable

import pytest
import scramp

from proxy import auth
from proxy.auth import AuthFailed, ScramServerExchange, authenticate, check_cleartext, is_trusted
from proxy.verifiers import SCRAM_ITERATIONS, make_md5, make_scram_verifier, parse_scram_verifier
from proxy.config import Config, UserEntry, load_yaml_text, parse_config
from proxy.wire import codec
from proxy.wire.codec import MessageReader
from proxy.wire.codes import Auth, B, F

# --- independent RFC 5802 / RFC 7677 helpers ------------------------------------------------------


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def rfc_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes, bytes]:
    """(ClientKey, StoredKey, ServerKey)."""
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    return client_key, stored_key, server_key


def rfc_verifier(password: str, salt: bytes, iterations: int = 4096) -> str:
    _, stored, server = rfc_keys(password, salt, iterations)
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored)}:{b64(server)}"


def client_final(password: str, client_first_bare: str, server_first: str, gs2: str = "n,,",
                 nonce: str | None = None) -> tuple[str, str]:
    """(client-final message, expected server-final) computed by hand per RFC 5802."""
    attrs = dict(a.split("=", 1) for a in server_first.split(","))
    salt, iters = base64.b64decode(attrs["s"]), int(attrs["i"])
    client_key, stored_key, server_key = rfc_keys(password, salt, iters)
    without_proof = f"c={b64(gs2.encode())},r={nonce if nonce is not None else attrs['r']}"
    auth_message = f"{client_first_bare},{server_first},{without_proof}".encode()
    signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature))
    server_sig = hmac.new(server_key, auth_message, hashlib.sha256).digest()
    return f"{without_proof},p={b64(proof)}", f"v={b64(server_sig)}"


# Known-answer vectors from PostgreSQL 15.18 (CREATE ROLE ... PASSWORD, then pg_authid.rolpassword).
PG_PASSWORD = "correct horse battery staple"
PG_SCRAM = (
    "SCRAM-SHA-256$4096:8vmRHZNxTPkGCrZjpYV7EA==$qIWmFsv5ku6h5THi1GUlU+0mpKD+dv6eJWvPcOn4A1o="
    ":OsEa3md+zo1RmqKBBVIsSYsMq4LFUNGvfJlcNDJRX2g="
)
PG_MD5_USER = "kv_md5"
PG_MD5 = "md5cb8264c27e0a93afffef8c634c1bf0e6"

SALT = bytes(range(16))
ALICE_PW = "alice-s3cret"
BOB_PW = "bob-pass"
CAROL_PW = "carol pässword"
ALICE_SCRAM = make_scram_verifier(ALICE_PW, salt=SALT)
CAROL_SCRAM = make_scram_verifier(CAROL_PW, salt=b"carol-salt-16by!")
BOB_MD5 = make_md5(BOB_PW, "bob")


def make_config(trust: list[str] | None = None, secret: str | None = "unit-test-secret") -> Config:
    lines = [
        "upstream:",
        "  host: 127.0.0.1",
        "users:",
        "  alice:",
        "    role: analyst",
        f"    password: '{ALICE_SCRAM}'",
        "  bob:",
        "    role: clerk",
        f"    md5: '{BOB_MD5}'",
        "  carol:",
        "    role: auditor",
        f"    password: '{CAROL_SCRAM}'",
        "    method: password",
        "  dave:",
        "    role: legacy",
        f"    md5: '{make_md5('dave-pw', 'dave')}'",
        "    method: password",
    ]
    if secret is not None:
        lines.append(f"secret: {secret}")
    if trust is not None:
        lines.append("auth:")
        lines.append("  trust:")
        lines.extend(f"    - '{n}'" for n in trust)
    data, loc = load_yaml_text("\n".join(lines) + "\n", "auth-test.yaml")
    return parse_config(data, loc)


# --- verifiers ---------------------------------------------------------------------------------


class TestScramVerifier:
    def test_format(self) -> None:
        v = make_scram_verifier("pw")
        m = re.fullmatch(r"SCRAM-SHA-256\$4096:([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+):([A-Za-z0-9+/=]+)", v)
        assert m is not None
        assert len(base64.b64decode(m.group(1))) == 16
        assert len(base64.b64decode(m.group(2))) == 32
        assert len(base64.b64decode(m.group(3))) == 32

    def test_matches_independent_rfc5802_computation(self) -> None:
        assert make_scram_verifier("pencil", salt=SALT) == rfc_verifier("pencil", SALT)
        assert make_scram_verifier("pencil", 10000, salt=SALT) == rfc_verifier("pencil", SALT, 10000)

    def test_matches_postgresql_known_answer(self) -> None:
        salt = parse_scram_verifier(PG_SCRAM)[1]
        assert make_scram_verifier(PG_PASSWORD, 4096, salt) == PG_SCRAM

    def test_non_ascii_password(self) -> None:
        assert make_scram_verifier("pässwörd", salt=SALT) == rfc_verifier("pässwörd", SALT)

    def test_random_salt_differs(self) -> None:
        a, b = make_scram_verifier("pw"), make_scram_verifier("pw")
        assert a != b
        assert parse_scram_verifier(a)[1] != parse_scram_verifier(b)[1]

    def test_parse_round_trip(self) -> None:
        _, stored, server = rfc_keys("pencil", SALT, 4096)
        assert parse_scram_verifier(make_scram_verifier("pencil", salt=SALT)) == (4096, SALT, stored, server)

    def test_parse_postgresql_verifier(self) -> None:
        iters, salt, stored, server = parse_scram_verifier(PG_SCRAM)
        assert iters == 4096
        assert salt == base64.b64decode("8vmRHZNxTPkGCrZjpYV7EA==")
        assert (stored, server) == rfc_keys(PG_PASSWORD, salt, 4096)[1:]

    @pytest.mark.parametrize(
        "bad",
        [
            "",
            "SCRAM-SHA-256",
            "SCRAM-SHA-1$4096:AAAA$" + b64(bytes(32)) + ":" + b64(bytes(32)),
            "SCRAM-SHA-256$0:AAAA$" + b64(bytes(32)) + ":" + b64(bytes(32)),
            "SCRAM-SHA-256$-1:AAAA$" + b64(bytes(32)) + ":" + b64(bytes(32)),
            "SCRAM-SHA-256$x:AAAA$" + b64(bytes(32)) + ":" + b64(bytes(32)),
            "SCRAM-SHA-256$4096:AAAA$" + b64(bytes(31)) + ":" + b64(bytes(32)),
            "SCRAM-SHA-256$4096:AAAA$" + b64(bytes(32)) + ":" + b64(bytes(33)),
            "SCRAM-SHA-256$4096:A!AA$" + b64(bytes(32)) + ":" + b64(bytes(32)),
            "SCRAM-SHA-256$4096:AAAA$" + b64(bytes(32)),
            "SCRAM-SHA-256$4096AAAA$" + b64(bytes(32)) + ":" + b64(bytes(32)),
            "md5" + "0" * 32,
        ],
    )
    def test_parse_malformed(self, bad: str) -> None:
        with pytest.raises(ValueError, match="malformed SCRAM-SHA-256 verifier"):
            parse_scram_verifier(bad)


class TestMd5:
    def test_make_md5(self) -> None:
        assert make_md5("secret", "alice") == "md5" + hashlib.md5(b"secretalice").hexdigest()
        assert make_md5("secret", "alice") != make_md5("secret", "bob")

    def test_matches_postgresql_known_answer(self) -> None:
        assert make_md5(PG_PASSWORD, PG_MD5_USER) == PG_MD5


class TestCheckCleartext:
    def test_scram_user(self) -> None:
        u = UserEntry(name="alice", role="r", scram=ALICE_SCRAM)
        assert check_cleartext(u, ALICE_PW) is True
        assert check_cleartext(u, ALICE_PW + "x") is False
        assert check_cleartext(u, "") is False

    def test_postgresql_verifier(self) -> None:
        u = UserEntry(name="kv", role="r", scram=PG_SCRAM)
        assert check_cleartext(u, PG_PASSWORD) is True
        assert check_cleartext(u, PG_PASSWORD.upper()) is False

    def test_md5_user(self) -> None:
        u = UserEntry(name=PG_MD5_USER, role="r", md5=PG_MD5)
        assert check_cleartext(u, PG_PASSWORD) is True
        assert check_cleartext(u, "wrong") is False

    def test_md5_is_salted_by_user_name(self) -> None:
        u = UserEntry(name="someone-else", role="r", md5=PG_MD5)
        assert check_cleartext(u, PG_PASSWORD) is False

    def test_no_verifier(self) -> None:
        assert check_cleartext(UserEntry(name="x", role="r"), "") is False
        assert check_cleartext(UserEntry(name="x", role="r"), "anything") is False


# --- the SCRAM server on its own -------------------------------------------------------------------


def exchange_for(password: str, salt: bytes = SALT, iterations: int = 4096) -> ScramServerExchange:
    _, stored, server = rfc_keys(password, salt, iterations)
    return ScramServerExchange(salt, stored, server, iterations)


class TestScramServerExchange:
    def test_scramp_client_succeeds(self) -> None:
        ex = exchange_for("pencil")
        c = scramp.ScramClient(["SCRAM-SHA-256"], "x", "pencil")
        first = ex.server_first_message(c.get_client_first())
        c.set_server_first(first)
        final = ex.verify_client_final(c.get_client_final())
        assert final is not None and final.startswith("v=")
        c.set_server_final(final)  # raises if the server signature is wrong

    def test_server_first_format(self) -> None:
        ex = exchange_for("pencil")
        first = ex.server_first_message("n,,n=,r=clientnonce")
        m = re.fullmatch(r"r=(clientnonce[A-Za-z0-9+/=]+),s=([A-Za-z0-9+/=]+),i=4096", first)
        assert m is not None
        assert len(m.group(1)) == len("clientnonce") + 24  # 18 random bytes, base64
        assert base64.b64decode(m.group(2)) == SALT

    def test_server_nonces_are_fresh(self) -> None:
        a = exchange_for("p").server_first_message("n,,n=,r=abc")
        b = exchange_for("p").server_first_message("n,,n=,r=abc")
        assert a != b

    def test_empty_user_name_by_hand(self) -> None:
        ex = exchange_for("pencil")
        bare = "n=,r=rOprNGfwEbeRWgbNEkqO"
        first = ex.server_first_message("n,," + bare)
        final, expected_server_final = client_final("pencil", bare, first)
        assert ex.verify_client_final(final) == expected_server_final

    def test_y_gs2_flag_accepted(self) -> None:
        ex = exchange_for("pencil")
        bare = "n=,r=abcdef"
        first = ex.server_first_message("y,," + bare)
        final, expected = client_final("pencil", bare, first, gs2="y,,")
        assert ex.verify_client_final(final) == expected

    def test_channel_binding_must_match_gs2_header(self) -> None:
        ex = exchange_for("pencil")
        bare = "n=,r=abcdef"
        first = ex.server_first_message("n,," + bare)
        final, _ = client_final("pencil", bare, first, gs2="y,,")  # proof valid for c=eSws, header was n,,
        assert ex.verify_client_final(final) is None

    def test_wrong_password_fails(self) -> None:
        ex = exchange_for("pencil")
        bare = "n=,r=abcdef"
        first = ex.server_first_message("n,," + bare)
        final, _ = client_final("pen", bare, first)
        assert ex.verify_client_final(final) is None

    def test_wrong_password_with_scramp(self) -> None:
        ex = exchange_for("pencil")
        c = scramp.ScramClient(["SCRAM-SHA-256"], "x", "not-pencil")
        c.set_server_first(ex.server_first_message(c.get_client_first()))
        assert ex.verify_client_final(c.get_client_final()) is None

    def test_tampered_nonce_fails_even_with_matching_proof(self) -> None:
        ex = exchange_for("pencil")
        bare = "n=,r=abcdef"
        first = ex.server_first_message("n,," + bare)
        # A correct proof over an auth message carrying a different nonce: only the nonce check can catch it.
        final, _ = client_final("pencil", bare, first, nonce="abcdefAAAAAAAAAAAAAAAAAAAAAAAA")
        assert ex.verify_client_final(final) is None

    def test_truncated_nonce_fails(self) -> None:
        ex = exchange_for("pencil")
        bare = "n=,r=abcdef"
        first = ex.server_first_message("n,," + bare)
        final, _ = client_final("pencil", bare, first, nonce="abcdef")
        assert ex.verify_client_final(final) is None

    @pytest.mark.parametrize(
        "client_first",
        [
            "p=tls-server-end-point,,n=,r=abc",
            "p=tls-unique,,n=,r=abc",
            "n,a=bob,n=,r=abc",
            "x,,n=,r=abc",
            "n,,",
            "n,,n=",
            "n,,r=abc",
            "n,,n=,r=",
            "n,,n=,s=abc",
            "garbage",
            "",
        ],
    )
    def test_bad_client_first_refused(self, client_first: str) -> None:
        with pytest.raises(ValueError):
            exchange_for("pencil").server_first_message(client_first)

    def test_p_flag_message(self) -> None:
        with pytest.raises(ValueError, match="channel binding is not offered"):
            exchange_for("pencil").server_first_message("p=tls-server-end-point,,n=,r=abc")

    @pytest.mark.parametrize(
        "mangle",
        [
            lambda f: f.rsplit(",p=", 1)[0],  # no proof
            lambda f: f.rsplit(",p=", 1)[0] + ",p=!!notbase64",
            lambda f: f.rsplit(",p=", 1)[0] + ",p=" + b64(bytes(16)),  # short proof
            lambda f: f.replace("c=biws", "c=!!"),
            lambda f: f.replace("c=biws,", ""),
            lambda f: "",
        ],
    )
    def test_malformed_client_final(self, mangle: Callable[[str], str]) -> None:
        ex = exchange_for("pencil")
        bare = "n=,r=abcdef"
        first = ex.server_first_message("n,," + bare)
        final, _ = client_final("pencil", bare, first)
        assert ex.verify_client_final(mangle(final)) is None


# --- authenticate() end to end over fake send/recv ----------------------------------------------------


class FakeClient:
    """Collects what the server sends; answers each request through `respond`."""

    def __init__(self, respond: Callable[[int, bytes], tuple[int, bytes]] | None = None) -> None:
        self._reader = MessageReader()
        self.sent: list[tuple[int, bytes]] = []
        self.respond = respond
        self.recv_calls = 0

    def send(self, data: bytes) -> None:
        self.sent.extend((t, bytes(p)) for t, p in self._reader.feed(data))
        assert self._reader.buffered == 0, "server sent a partial message"

    async def recv(self) -> tuple[int, bytes]:
        self.recv_calls += 1
        assert self.respond is not None, "server asked the client for something unexpected"
        t, payload = self.sent[-1]
        assert t == B.AUTHENTICATION
        return self.respond(codec.decode_auth(payload).code, codec.decode_auth(payload).data)

    def auth_codes(self) -> list[int]:
        return [codec.decode_auth(p).code for t, p in self.sent if t == B.AUTHENTICATION]

    def auth_data(self, code: int) -> bytes:
        (data,) = [codec.decode_auth(p).data for t, p in self.sent if t == B.AUTHENTICATION and codec.decode_auth(p).code == code]
        return data


def sasl_initial(data: str, mech: bytes = b"SCRAM-SHA-256") -> bytes:
    raw = data.encode()
    return mech + b"\x00" + len(raw).to_bytes(4, "big") + raw


def scramp_responder(password: str) -> tuple[Callable[[int, bytes], tuple[int, bytes]], scramp.ScramClient]:
    c = scramp.ScramClient(["SCRAM-SHA-256"], "x", password)

    def respond(code: int, data: bytes) -> tuple[int, bytes]:
        if code == Auth.SASL:
            assert data == b"SCRAM-SHA-256\x00\x00"
            return F.PASSWORD, sasl_initial(c.get_client_first())
        if code == Auth.SASL_CONTINUE:
            c.set_server_first(data.decode())
            return F.PASSWORD, c.get_client_final().encode()
        raise AssertionError(f"unexpected auth request {code}")

    return respond, c


def libpq_responder(password: str, gs2: str = "n,,") -> Callable[[int, bytes], tuple[int, bytes]]:
    """A libpq-style client: empty SCRAM user name, proof computed by hand."""
    bare = "n=,r=fyko+d2lbbFgONRv9qkxdawL"
    state: dict[str, str] = {}

    def respond(code: int, data: bytes) -> tuple[int, bytes]:
        if code == Auth.SASL:
            return F.PASSWORD, sasl_initial(gs2 + bare)
        if code == Auth.SASL_CONTINUE:
            final, state["expected"] = client_final(password, bare, data.decode(), gs2=gs2)
            return F.PASSWORD, final.encode()
        raise AssertionError(f"unexpected auth request {code}")

    respond.state = state  # type: ignore[attr-defined]
    return respond


def md5_responder(password: str, user: str) -> Callable[[int, bytes], tuple[int, bytes]]:
    def respond(code: int, data: bytes) -> tuple[int, bytes]:
        assert code == Auth.MD5 and len(data) == 4
        inner = hashlib.md5((password + user).encode()).hexdigest()
        return F.PASSWORD, ("md5" + hashlib.md5(inner.encode() + data).hexdigest()).encode() + b"\x00"

    return respond


def cleartext_responder(password: str) -> Callable[[int, bytes], tuple[int, bytes]]:
    def respond(code: int, data: bytes) -> tuple[int, bytes]:
        assert code == Auth.CLEARTEXT and data == b""
        return F.PASSWORD, password.encode() + b"\x00"

    return respond


def failed_text(user: str) -> str:
    return f'password authentication failed for user "{user}"'


@pytest.fixture(scope="module")
def cfg() -> Config:
    return make_config()


class TestAuthenticateScram:
    async def test_scramp_ok(self, cfg: Config) -> None:
        respond, client = scramp_responder(ALICE_PW)
        fc = FakeClient(respond)
        user, method = await authenticate(cfg, "alice", "192.0.2.1", False, fc.send, fc.recv)
        assert (user.name, user.role, method) == ("alice", "analyst", "scram-sha-256")
        assert fc.auth_codes() == [Auth.SASL, Auth.SASL_CONTINUE, Auth.SASL_FINAL]
        client.set_server_final(fc.auth_data(Auth.SASL_FINAL).decode())  # server proved it knows the key

    async def test_libpq_style_empty_user_ok(self, cfg: Config) -> None:
        respond = libpq_responder(ALICE_PW)
        fc = FakeClient(respond)
        user, method = await authenticate(cfg, "alice", "192.0.2.1", False, fc.send, fc.recv)
        assert (user.name, method) == ("alice", "scram-sha-256")
        assert fc.auth_data(Auth.SASL_FINAL).decode() == respond.state["expected"]  # type: ignore[attr-defined]

    async def test_salt_and_iterations_come_from_verifier(self, cfg: Config) -> None:
        fc = FakeClient(libpq_responder(ALICE_PW))
        await authenticate(cfg, "alice", "192.0.2.1", False, fc.send, fc.recv)
        first = fc.auth_data(Auth.SASL_CONTINUE).decode()
        attrs = dict(a.split("=", 1) for a in first.split(","))
        assert base64.b64decode(attrs["s"]) == SALT
        assert attrs["i"] == "4096"
        assert attrs["r"].startswith("fyko+d2lbbFgONRv9qkxdawL")

    async def test_wrong_password(self, cfg: Config) -> None:
        respond, _ = scramp_responder("not-" + ALICE_PW)
        fc = FakeClient(respond)
        with pytest.raises(AuthFailed) as ei:
            await authenticate(cfg, "alice", "192.0.2.1", False, fc.send, fc.recv)
        assert (ei.value.sqlstate, ei.value.message) == ("28P01", failed_text("alice"))
        assert str(ei.value) == failed_text("alice")
        assert fc.auth_codes() == [Auth.SASL, Auth.SASL_CONTINUE]  # no SASLFinal for a wrong proof

    async def test_unknown_user_same_error_as_wrong_password(self, cfg: Config) -> None:
        respond, _ = scramp_responder(ALICE_PW)
        fc = FakeClient(respond)
        with pytest.raises(AuthFailed) as ei:
            await authenticate(cfg, "mallory", "192.0.2.1", False, fc.send, fc.recv)
        assert (ei.value.sqlstate, ei.value.message) == ("28P01", failed_text("mallory"))
        # The unknown user went through the whole exchange, exactly like a known one.
        assert fc.auth_codes() == [Auth.SASL, Auth.SASL_CONTINUE]

    async def test_unknown_user_gets_a_stable_salt(self, cfg: Config) -> None:
        salts = []
        for _ in range(2):
            fc = FakeClient(libpq_responder("guess"))
            with pytest.raises(AuthFailed):
                await authenticate(cfg, "mallory", "192.0.2.1", False, fc.send, fc.recv)
            attrs = dict(a.split("=", 1) for a in fc.auth_data(Auth.SASL_CONTINUE).decode().split(","))
            assert attrs["i"] == str(SCRAM_ITERATIONS)
            salts.append(base64.b64decode(attrs["s"]))
        assert salts[0] == salts[1]
        assert len(salts[0]) == len(SALT) == 16  # looks like a real PostgreSQL salt

    async def test_unknown_users_get_different_salts(self, cfg: Config) -> None:
        salts = []
        for name in ("mallory", "trudy"):
            fc = FakeClient(libpq_responder("guess"))
            with pytest.raises(AuthFailed):
                await authenticate(cfg, name, "192.0.2.1", False, fc.send, fc.recv)
            salts.append(fc.auth_data(Auth.SASL_CONTINUE).decode().split(",s=")[1].split(",")[0])
        assert salts[0] != salts[1]

    async def test_unknown_user_salt_depends_on_secret(self) -> None:
        salts = []
        for secret in ("secret-one", "secret-two"):
            fc = FakeClient(libpq_responder("guess"))
            with pytest.raises(AuthFailed):
                await authenticate(make_config(secret=secret), "mallory", "192.0.2.1", False, fc.send, fc.recv)
            salts.append(fc.auth_data(Auth.SASL_CONTINUE).decode().split(",s=")[1].split(",")[0])
        assert salts[0] != salts[1]

    async def test_p_flag_refused(self, cfg: Config) -> None:
        fc = FakeClient(lambda code, data: (F.PASSWORD, sasl_initial("p=tls-server-end-point,,n=,r=abc")))
        with pytest.raises(AuthFailed) as ei:
            await authenticate(cfg, "alice", "192.0.2.1", False, fc.send, fc.recv)
        assert ei.value.sqlstate == "08P01"
        assert "channel binding is not offered" in ei.value.message

    async def test_plus_mechanism_refused(self, cfg: Config) -> None:
        fc = FakeClient(lambda code, data: (F.PASSWORD, sasl_initial("n,,n=,r=abc", mech=b"SCRAM-SHA-256-PLUS")))
        with pytest.raises(AuthFailed) as ei:
            await authenticate(cfg, "alice", "192.0.2.1", False, fc.send, fc.recv)
        assert ei.value.sqlstate == "08P01"
        assert "SCRAM-SHA-256-PLUS" in ei.value.message

    @pytest.mark.parametrize(
        "payload",
        [
            b"SCRAM-SHA-256",  # no NUL
            b"SCRAM-SHA-256\x00\x00\x00",  # length cut short
            b"SCRAM-SHA-256\x00\x00\x00\x00\x05n,,n=,r=abc",  # length mismatch
            b"SCRAM-SHA-256\x00\xff\xff\xff\xff",  # -1: no initial response
        ],
    )
    async def test_malformed_sasl_initial_response(self, cfg: Config, payload: bytes) -> None:
        fc = FakeClient(lambda code, data: (F.PASSWORD, payload))
        with pytest.raises(AuthFailed) as ei:
            await authenticate(cfg, "alice", "192.0.2.1", False, fc.send, fc.recv)
        assert ei.value.sqlstate == "08P01"
        assert ei.value.message == "malformed SASLInitialResponse"

    async def test_non_password_message_is_protocol_violation(self, cfg: Config) -> None:
        fc = FakeClient(lambda code, data: (F.QUERY, b"SELECT 1\x00"))
        with pytest.raises(AuthFailed) as ei:
            await authenticate(cfg, "alice", "192.0.2.1", False, fc.send, fc.recv)
        assert ei.value.sqlstate == "08P01"
        assert ei.value.message == "expected a password response, got message type 'Q'"

    async def test_non_utf8_client_final_fails_as_wrong_password(self, cfg: Config) -> None:
        def respond(code: int, data: bytes) -> tuple[int, bytes]:
            if code == Auth.SASL:
                return F.PASSWORD, sasl_initial("n,,n=,r=abc")
            return F.PASSWORD, b"c=biws,r=\xff\xfe,p=xxxx"

        fc = FakeClient(respond)
        with pytest.raises(AuthFailed) as ei:
            await authenticate(cfg, "alice", "192.0.2.1", False, fc.send, fc.recv)
        assert (ei.value.sqlstate, ei.value.message) == ("28P01", failed_text("alice"))


class TestAuthenticateMd5:
    async def test_ok(self, cfg: Config) -> None:
        fc = FakeClient(md5_responder(BOB_PW, "bob"))
        user, method = await authenticate(cfg, "bob", "192.0.2.1", False, fc.send, fc.recv)
        assert (user.name, user.role, method) == ("bob", "clerk", "md5")
        assert fc.auth_codes() == [Auth.MD5]
        assert fc.recv_calls == 1

    async def test_wrong_password(self, cfg: Config) -> None:
        fc = FakeClient(md5_responder("wrong", "bob"))
        with pytest.raises(AuthFailed) as ei:
            await authenticate(cfg, "bob", "192.0.2.1", False, fc.send, fc.recv)
        assert (ei.value.sqlstate, ei.value.message) == ("28P01", failed_text("bob"))

    async def test_hash_salted_with_other_user_fails(self, cfg: Config) -> None:
        fc = FakeClient(md5_responder(BOB_PW, "alice"))
        with pytest.raises(AuthFailed) as ei:
            await authenticate(cfg, "bob", "192.0.2.1", False, fc.send, fc.recv)
        assert ei.value.sqlstate == "28P01"

    async def test_salt_is_fresh(self, cfg: Config) -> None:
        salts = set()
        for _ in range(3):
            fc = FakeClient(md5_responder(BOB_PW, "bob"))
            await authenticate(cfg, "bob", "192.0.2.1", False, fc.send, fc.recv)
            salts.add(fc.auth_data(Auth.MD5))
        assert len(salts) == 3


class TestAuthenticateCleartext:
    async def test_refused_without_tls(self, cfg: Config) -> None:
        fc = FakeClient()
        with pytest.raises(AuthFailed) as ei:
            await authenticate(cfg, "carol", "192.0.2.1", False, fc.send, fc.recv)
        assert ei.value.sqlstate == "28000"
        assert ei.value.message == (
            'user "carol" uses password authentication, which pgwarden allows only over TLS '
            "(connect with sslmode=require)"
        )
        assert fc.sent == []  # the password was never asked for

    async def test_accepted_with_tls(self, cfg: Config) -> None:
        fc = FakeClient(cleartext_responder(CAROL_PW))
        user, method = await authenticate(cfg, "carol", "192.0.2.1", True, fc.send, fc.recv)
        assert (user.name, method) == ("carol", "password")
        assert fc.auth_codes() == [Auth.CLEARTEXT]

    async def test_wrong_password_with_tls(self, cfg: Config) -> None:
        fc = FakeClient(cleartext_responder("nope"))
        with pytest.raises(AuthFailed) as ei:
            await authenticate(cfg, "carol", "192.0.2.1", True, fc.send, fc.recv)
        assert (ei.value.sqlstate, ei.value.message) == ("28P01", failed_text("carol"))

    async def test_md5_verifier_checked_in_cleartext(self, cfg: Config) -> None:
        fc = FakeClient(cleartext_responder("dave-pw"))
        user, method = await authenticate(cfg, "dave", "192.0.2.1", True, fc.send, fc.recv)
        assert (user.name, method) == ("dave", "password")


@pytest.fixture(scope="module")
def tcfg() -> Config:
    return make_config(trust=["10.0.0.0/8", "::1/128", "192.168.7.7"])


class TestTrust:
    @pytest.mark.parametrize("addr", ["10.0.0.1", "10.255.255.254", "::1", "192.168.7.7"])
    async def test_trusted_address_skips_password(self, tcfg: Config, addr: str) -> None:
        fc = FakeClient()
        user, method = await authenticate(tcfg, "alice", addr, False, fc.send, fc.recv)
        assert (user.name, method) == ("alice", "trust")
        assert fc.sent == []
        assert fc.recv_calls == 0

    async def test_trust_applies_to_cleartext_user_without_tls(self, tcfg: Config) -> None:
        fc = FakeClient()
        user, method = await authenticate(tcfg, "carol", "10.1.1.1", False, fc.send, fc.recv)
        assert (user.name, method) == ("carol", "trust")

    @pytest.mark.parametrize("addr", ["11.0.0.1", "192.168.7.8", "::2", "", "not-an-ip", "/tmp/.s.PGSQL.6432"])
    async def test_untrusted_address_needs_password(self, tcfg: Config, addr: str) -> None:
        respond, _ = scramp_responder("wrong")
        fc = FakeClient(respond)
        with pytest.raises(AuthFailed) as ei:
            await authenticate(tcfg, "alice", addr, False, fc.send, fc.recv)
        assert ei.value.sqlstate == "28P01"
        assert fc.auth_codes()[0] == Auth.SASL

    async def test_untrusted_address_right_password(self, tcfg: Config) -> None:
        respond, _ = scramp_responder(ALICE_PW)
        fc = FakeClient(respond)
        user, method = await authenticate(tcfg, "alice", "172.16.0.1", False, fc.send, fc.recv)
        assert method == "scram-sha-256"

    async def test_unknown_user_from_trusted_network(self, tcfg: Config) -> None:
        fc = FakeClient()
        with pytest.raises(AuthFailed) as ei:
            await authenticate(tcfg, "mallory", "10.0.0.1", False, fc.send, fc.recv)
        assert (ei.value.sqlstate, ei.value.message) == ("28P01", failed_text("mallory"))
        assert fc.sent == []

    def test_is_trusted(self, tcfg: Config) -> None:
        assert is_trusted(tcfg, "10.20.30.40") is True
        assert is_trusted(tcfg, "9.255.255.255") is False
        assert is_trusted(tcfg, "::1") is True
        assert is_trusted(tcfg, "garbage") is False
        assert is_trusted(tcfg, "") is False

    def test_no_trust_networks(self, cfg: Config) -> None:
        assert cfg.trust_networks == ()
        assert is_trusted(cfg, "127.0.0.1") is False
        assert is_trusted(cfg, "10.0.0.1") is False


def test_fake_verifier_is_deterministic_per_secret_and_user() -> None:
    cfg = make_config(secret="s")
    a = auth._fake_verifier(cfg, "mallory")
    assert a == auth._fake_verifier(cfg, "mallory")
    assert a != auth._fake_verifier(cfg, "trudy")
    salt, stored, server, iters = a
    assert (len(salt), len(stored), len(server), iters) == (16, 32, 32, 4096)
