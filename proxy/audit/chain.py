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
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

GENESIS = "0" * 64  # prev_hash of the first event of a chain segment
CHAIN_FIELDS = ("replica", "seq", "prev_hash", "hash")


def canonical(event: dict[str, Any]) -> bytes:
    """The bytes ``hash`` is computed over (``event`` must not contain ``hash``)."""
    return orjson.dumps(event, option=orjson.OPT_SORT_KEYS, default=str)


def seal(event: dict[str, Any]) -> tuple[bytes, str]:
    """(the line to write, without newline; its hash). ``event`` already carries replica/seq/prev_hash."""
    body = canonical(event)
    digest = hashlib.sha256(body).hexdigest()
    return body[:-1] + b',"hash":"' + digest.encode("ascii") + b'"}', digest


def hash_of(event: dict[str, Any]) -> str:
    """The hash an event parsed from a line should carry (its own ``hash`` key is ignored)."""
    rest = {k: v for k, v in event.items() if k != "hash"}
    return hashlib.sha256(canonical(rest)).hexdigest()


def exact(line: bytes, event: dict[str, Any]) -> bool:
    """Is ``line`` exactly the bytes pgwarden writes for ``event``?"""
    body, _ = seal({k: v for k, v in event.items() if k != "hash"})
    return line.rstrip(b"\r\n") == body


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
