"""The hash chain that makes the audit log tamper-evident (R5.2): pure functions, no I/O.

Every event of one replica carries ``replica``, ``seq`` (1, 2, 3, ... per
replica), ``prev_hash`` (the ``hash`` of the replica's previous event, or
GENESIS for the first event of a chain segment) and ``hash``.

Canonical form. ``hash`` is the lower-case hex SHA-256 of the event's
canonical bytes: the event as a JSON object *without* its ``hash`` key,
serialised by ``orjson.dumps(event, option=orjson.OPT_SORT_KEYS)``. That is:
keys of every object (nested ones too) sorted by code point, no whitespace,
strings in UTF-8 with only the escapes JSON requires (``"``, ``\\``,
control characters), integers in decimal, floats in their shortest
round-tripping form, ``true``/``false``/``null``. Parsing a line and
serialising the object again this way gives the same bytes, so a verifier
needs nothing but the line itself.

A written line is the canonical bytes with ``,"hash":"<hex>"`` put before the
closing brace (so ``hash`` is the last key, outside the sort order).

Keyed chains. With an audit key configured, every event also carries
``key_id`` (a fingerprint of the key, see ``key_id``) and ``hash`` is
HMAC-SHA256(key, canonical bytes) instead of a plain SHA-256. Anyone can
recompute a plain SHA-256 after deleting or editing events; only a holder of
the key can recompute an HMAC. The key never lives with the log (see
docs/audit-integrity.md for the threat model and key rotation).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

import orjson

GENESIS = "0" * 64  # prev_hash of the first event of a chain segment
CHAIN_FIELDS = ("replica", "seq", "prev_hash", "hash")
MIN_KEY_BYTES = 32  # an HMAC key shorter than the hash's block of entropy is guessable offline
Keys = Mapping[str, bytes]  # key_id -> key


def key_id(key: bytes) -> str:
    """A short public name for a key: which key an event was sealed with, without revealing it."""
    return hashlib.sha256(b"pgwarden audit key id\x00" + key).hexdigest()[:16]


def _digest(body: bytes, key: bytes | None) -> str:
    if key is None:
        return hashlib.sha256(body).hexdigest()
    return hmac.digest(key, body, "sha256").hex()


def canonical(event: dict[str, Any]) -> bytes:
    """The bytes ``hash`` is computed over (``event`` must not contain ``hash``)."""
    return orjson.dumps(event, option=orjson.OPT_SORT_KEYS, default=str)


def seal(event: dict[str, Any], key: bytes | None = None) -> tuple[bytes, str]:
    """(the line to write, without newline; its hash). ``event`` already carries replica/seq/prev_hash
    (and ``key_id`` when ``key`` is given)."""
    body = canonical(event)
    digest = _digest(body, key)
    return body[:-1] + b',"hash":"' + digest.encode("ascii") + b'"}', digest


def hash_of(event: dict[str, Any], keys: Keys | None = None) -> str | None:
    """The hash an event parsed from a line should carry (its own ``hash`` key is ignored).

    None for a keyed event whose key is not in ``keys``: it cannot be checked here.
    """
    kid = event.get("key_id")
    key = None
    if kid is not None:
        key = (keys or {}).get(kid) if isinstance(kid, str) else None
        if key is None:
            return None
    rest = {k: v for k, v in event.items() if k != "hash"}
    return _digest(canonical(rest), key)


def exact(line: bytes, event: dict[str, Any]) -> bool:
    """Is ``line`` exactly the bytes pgwarden writes for ``event``? (The hash is compared as text.)"""
    body = canonical({k: v for k, v in event.items() if k != "hash"})
    want = body[:-1] + b',"hash":"' + str(event.get("hash", "")).encode("utf-8", "replace") + b'"}'
    return line.rstrip(b"\r\n") == want


def parse_line(line: bytes) -> dict[str, Any] | None:
    """An event from one line, or None when the line is not a complete chained event."""
    try:
        ev = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(ev, dict):
        return None
    if not (isinstance(ev.get("replica"), str) and isinstance(ev.get("seq"), int)
            and isinstance(ev.get("prev_hash"), str) and isinstance(ev.get("hash"), str)):
        return None
    return ev
