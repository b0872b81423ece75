"""Password verifiers in PostgreSQL's own formats (SCRAM-SHA-256 and md5), below the config and auth.

The configuration holds verifiers, never clear text; it checks their format when it is read, and
authentication uses them: both need this, neither needs the other.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

__all__ = ["SCRAM_ITERATIONS", "parse_scram_verifier", "make_scram_verifier", "make_md5"]

SCRAM_ITERATIONS = 4096  # PostgreSQL's default scram_iterations


def parse_scram_verifier(v: str) -> tuple[int, bytes, bytes, bytes]:
    """(iterations, salt, StoredKey, ServerKey) from PostgreSQL's rolpassword format."""
    try:
        mech, rest = v.split("$", 1)
        iter_salt, keys = rest.split("$", 1)
        iters, salt = iter_salt.split(":", 1)
        stored, server = keys.split(":", 1)
        out = (int(iters), base64.b64decode(salt, validate=True), base64.b64decode(stored, validate=True),
               base64.b64decode(server, validate=True))
    except (ValueError, TypeError) as exc:
        raise ValueError("malformed SCRAM-SHA-256 verifier") from exc
    if mech != "SCRAM-SHA-256" or out[0] < 1 or len(out[2]) != 32 or len(out[3]) != 32:
        raise ValueError("malformed SCRAM-SHA-256 verifier")
    return out


def make_scram_verifier(password: str, iterations: int = SCRAM_ITERATIONS, salt: bytes | None = None) -> str:
    """A verifier in the exact format PostgreSQL stores in pg_authid.rolpassword."""
    salt = salt or os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored = hashlib.sha256(client_key).digest()
    server = hmac.digest(salted, b"Server Key", "sha256")
    b64 = lambda b: base64.b64encode(b).decode("ascii")  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored)}:{b64(server)}"


def make_md5(password: str, user: str) -> str:
    return "md5" + hashlib.md5((password + user).encode("utf-8")).hexdigest()
