"""Client authentication against pgwarden's own user directory.

The exchange is written against two callables (send bytes, receive the next
message) so it runs the same over TLS or plain TCP and can be driven in tests.
Unknown users go through the very same exchange as known ones, with a
verifier derived from a server secret, and fail with the same 28P01 message:
the answer never tells an attacker which user names exist.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import os
from collections.abc import Awaitable, Callable

from proxy.config import Config, UserEntry
from proxy.verifiers import SCRAM_ITERATIONS, make_md5, parse_scram_verifier
from proxy.wire import codec
from proxy.wire.codes import Auth, F, SqlState

SendFn = Callable[[bytes], None]
RecvFn = Callable[[], Awaitable[tuple[int, bytes]]]



class AuthFailed(Exception):
    """Login refused; carries the SQLSTATE and the message the client sees."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message


def _md5_response(md5_hash: str, salt: bytes) -> str:
    return "md5" + hashlib.md5(md5_hash[3:].encode("ascii") + salt).hexdigest()


def check_cleartext(user: UserEntry, password: str) -> bool:
    if user.scram:
        iters, salt, stored, _ = parse_scram_verifier(user.scram)
        salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iters)
        candidate = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
        return hmac.compare_digest(candidate, stored)
    if user.md5:
        return hmac.compare_digest(make_md5(password, user.name), user.md5)
    return False


def is_trusted(cfg: Config, client_addr: str) -> bool:
    if not cfg.trust_networks or not client_addr:
        return False
    try:
        addr = ipaddress.ip_address(client_addr)
    except ValueError:
        return False
    return any(addr in net for net in cfg.trust_networks)


def _failed(user: str) -> AuthFailed:
    return AuthFailed(SqlState.INVALID_PASSWORD, f'password authentication failed for user "{user}"')


def _fake_verifier(cfg: Config, user: str) -> tuple[bytes, bytes, bytes, int]:
    """A stable, unguessable verifier for a user that does not exist (same salt on every try)."""
    d = hmac.digest(cfg.secret, b"pgwarden-unknown-user\x00" + user.encode("utf-8"), "sha512")
    return d[:16], d[16:48], d[32:64], SCRAM_ITERATIONS


async def _recv_password(recv: RecvFn) -> bytes:
    t, payload = await recv()
    if t != F.PASSWORD:
        raise AuthFailed(SqlState.PROTOCOL_VIOLATION, f"expected a password response, got message type {chr(t)!r}")
    return payload


class ScramServerExchange:
    """The server side of SCRAM-SHA-256 (RFC 5802/7677) as PostgreSQL speaks it.

    Written here rather than taken from scramp because PostgreSQL clients send
    an empty user name ("n=,r=...": the startup packet carries the user), which
    scramp 1.5 rejects as malformed. No channel binding is offered, so the
    client's gs2 flag must be 'n' or 'y'.
    """

    def __init__(self, salt: bytes, stored_key: bytes, server_key: bytes, iterations: int) -> None:
        self.salt, self.stored_key, self.server_key, self.iterations = salt, stored_key, server_key, iterations
        self.nonce = ""
        self.client_first_bare = ""
        self.server_first = ""
        self.gs2 = ""

    def server_first_message(self, client_first: str) -> str:
        parts = client_first.split(",", 2)
        if len(parts) != 3 or parts[0] not in ("n", "y") or parts[1] != "":
            raise ValueError("unsupported SCRAM gs2 header (channel binding is not offered)")
        self.gs2 = parts[0] + ",,"
        self.client_first_bare = parts[2]
        attrs = self.client_first_bare.split(",")
        if len(attrs) < 2 or not attrs[0].startswith("n=") or not attrs[1].startswith("r=") or len(attrs[1]) < 3:
            raise ValueError("malformed SCRAM client-first message")
        self.nonce = attrs[1][2:] + base64.b64encode(os.urandom(18)).decode("ascii")
        self.server_first = f"r={self.nonce},s={base64.b64encode(self.salt).decode('ascii')},i={self.iterations}"
        return self.server_first

    def verify_client_final(self, client_final: str) -> str | None:
        """The server-final message if the proof is right, else None."""
        head, sep, proof_b64 = client_final.rpartition(",p=")
        if not sep:
            return None
        attrs = dict(a.split("=", 1) for a in head.split(",") if "=" in a)
        try:
            cbind = base64.b64decode(attrs.get("c", ""), validate=True)
            proof = base64.b64decode(proof_b64, validate=True)
        except (ValueError, TypeError):
            return None
        if cbind != self.gs2.encode("ascii") or attrs.get("r") != self.nonce or len(proof) != 32:
            return None
        auth_message = f"{self.client_first_bare},{self.server_first},{head}".encode("utf-8")
        signature = hmac.digest(self.stored_key, auth_message, "sha256")
        client_key = bytes(x ^ y for x, y in zip(proof, signature))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), self.stored_key):
            return None
        server_sig = hmac.digest(self.server_key, auth_message, "sha256")
        return "v=" + base64.b64encode(server_sig).decode("ascii")


async def _scram(send: SendFn, recv: RecvFn, verifier: tuple[bytes, bytes, bytes, int]) -> bool:
    send(codec.auth_request(Auth.SASL, b"SCRAM-SHA-256\x00\x00"))
    payload = await _recv_password(recv)
    end = payload.find(b"\x00")
    if end < 0 or len(payload) < end + 5:
        raise AuthFailed(SqlState.PROTOCOL_VIOLATION, "malformed SASLInitialResponse")
    mech = payload[:end].decode("ascii", "replace")
    if mech != "SCRAM-SHA-256":
        raise AuthFailed(SqlState.PROTOCOL_VIOLATION, f"client selected an invalid SASL mechanism {mech!r}")
    ln = int.from_bytes(payload[end + 1 : end + 5], "big", signed=True)
    data = payload[end + 5 :]
    if ln != len(data):
        raise AuthFailed(SqlState.PROTOCOL_VIOLATION, "malformed SASLInitialResponse")
    exchange = ScramServerExchange(*verifier)
    try:
        first = exchange.server_first_message(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise AuthFailed(SqlState.PROTOCOL_VIOLATION, f"invalid SCRAM exchange: {exc}") from exc
    send(codec.auth_request(Auth.SASL_CONTINUE, first.encode("utf-8")))
    final = await _recv_password(recv)
    try:
        server_final = exchange.verify_client_final(final.decode("utf-8"))
    except UnicodeDecodeError:
        return False
    if server_final is None:
        return False
    send(codec.auth_request(Auth.SASL_FINAL, server_final.encode("utf-8")))
    return True


async def authenticate(
    cfg: Config, user_name: str, client_addr: str, tls: bool, send: SendFn, recv: RecvFn
) -> tuple[UserEntry, str]:
    """Run the login exchange; return the user and the method used, or raise AuthFailed."""
    user = cfg.users.get(user_name)
    if is_trusted(cfg, client_addr):
        if user is None:
            raise _failed(user_name)
        return user, "trust"
    method = user.method if user else "scram-sha-256"
    if method == "password":
        if not tls:
            raise AuthFailed(
                SqlState.INVALID_AUTHORIZATION,
                f'user "{user_name}" uses password authentication, which pgwarden allows only over TLS '
                "(connect with sslmode=require)",
            )
        send(codec.auth_request(Auth.CLEARTEXT))
        payload = await _recv_password(recv)
        pw = payload.rstrip(b"\x00").decode("utf-8", "replace")
        if user is None or not check_cleartext(user, pw):
            raise _failed(user_name)
        return user, method
    if method == "md5":
        assert user is not None and user.md5 is not None
        salt = os.urandom(4)
        send(codec.auth_request(Auth.MD5, salt))
        payload = await _recv_password(recv)
        answer = payload.rstrip(b"\x00").decode("ascii", "replace")
        if not hmac.compare_digest(answer, _md5_response(user.md5, salt)):
            raise _failed(user_name)
        return user, method

    # The startup user is the identity; the name inside the SCRAM messages is ignored, as PostgreSQL does.
    if user is None or user.scram is None:
        verifier = _fake_verifier(cfg, user_name)
    else:
        iters, salt, stored, server_key = parse_scram_verifier(user.scram)
        verifier = (salt, stored, server_key, iters)
    ok = await _scram(send, recv, verifier)
    if not ok or user is None:
        raise _failed(user_name)
    return user, "scram-sha-256"
