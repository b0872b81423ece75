"""Decoded protocol messages as small frozen values.

Frontend (client -> server) and backend (server -> client) messages are
separate types because the protocol reuses letters in the two directions.
Only the messages pgwarden has to look inside are decoded; everything else
is relayed as bytes without ever becoming an object.
"""

from __future__ import annotations

from dataclasses import dataclass, field


# --- startup phase (no type byte) ------------------------------------------------


@dataclass(frozen=True, slots=True)
class SSLRequest:
    pass


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True, slots=True)
class CancelRequest:
    pid: int
    secret: bytes


@dataclass(frozen=True, slots=True)
class StartupMessage:
    version: int
    params: dict[str, str] = field(default_factory=dict)

    @property
    def minor(self) -> int:
        return self.version & 0xFFFF


StartupPacket = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage


# --- frontend ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Query:
    sql: bytes


@dataclass(frozen=True, slots=True)
class Parse:
    name: bytes
    sql: bytes
    param_types: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Bind:
    portal: bytes
    statement: bytes
    param_formats: tuple[int, ...]
    params: tuple[bytes | None, ...]
    result_formats: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Execute:
    portal: bytes
    max_rows: int


@dataclass(frozen=True, slots=True)
class Describe:
    kind: str  # 'S' statement or 'P' portal
    name: bytes


@dataclass(frozen=True, slots=True)
class Close:
    kind: str
    name: bytes


# --- backend ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Authentication:
    code: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ParameterStatus:
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class BackendKeyData:
    pid: int
    secret: bytes


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    """Also used for NoticeResponse: the same field layout."""

    fields: dict[str, str]

    @property
    def sqlstate(self) -> str:
        return self.fields.get("C", "")

    @property
    def severity(self) -> str:
        return self.fields.get("V") or self.fields.get("S", "")

    @property
    def message(self) -> str:
        return self.fields.get("M", "")


@dataclass(frozen=True, slots=True)
class ReadyForQuery:
    status: str  # 'I' idle, 'T' in transaction, 'E' failed transaction
