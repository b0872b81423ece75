"""Framing, decoding and encoding of protocol 3.0 messages, with no I/O.

Theory of operation: a reader is fed whatever bytes arrived and hands back
whole messages as ``(type, payload)`` pairs, or nothing until more arrives.
Every length field is checked before anything is allocated, so a hostile peer
cannot make a buffer grow past ``max_size``; anything malformed raises
``ProtocolError`` which the session answers with SQLSTATE 08P01 and a closed
connection. Payload decoders are plain functions over bytes so the relay only
pays for the messages it has to look inside.
"""

from __future__ import annotations

import struct

from .codes import CANCEL_REQUEST, GSSENC_REQUEST, PROTOCOL_3_0, SSL_REQUEST, B
from .messages import (
    Authentication,
    BackendKeyData,
    Bind,
    CancelRequest,
    Close,
    Describe,
    ErrorResponse,
    Execute,
    GSSENCRequest,
    ParameterStatus,
    Parse,
    Query,
    ReadyForQuery,
    SSLRequest,
    StartupMessage,
    StartupPacket,
)

DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024
MAX_STARTUP_PACKET = 10_000  # PostgreSQL's own limit

_I32 = struct.Struct("!i")
_I16 = struct.Struct("!h")
_HDR = struct.Struct("!ci")


class ProtocolError(Exception):
    """The peer sent something that is not valid protocol 3.0."""

    sqlstate = "08P01"  # protocol_violation


class UnsupportedProtocol(ProtocolError):
    """A protocol version other than 3.x: PostgreSQL answers feature_not_supported."""

    sqlstate = "0A000"


# --- framing ------------------------------------------------------------------------


class MessageReader:
    """Splits a byte stream into typed messages.

    ``feed`` accepts any chunking; ``read_all`` returns every complete message.
    The common case (a chunk holding only whole messages and nothing buffered)
    is parsed in place without copying.
    """

    __slots__ = ("_buf", "_need", "max_size")

    def __init__(self, max_size: int = DEFAULT_MAX_MESSAGE) -> None:
        self._buf = bytearray()
        self._need = 0  # bytes the buffered partial message still lacks (0: unknown)
        self.max_size = max_size

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Add bytes, return every message now complete (type as int, payload)."""
        if self._buf:
            self._buf += data
            if self._need > len(data):
                # A large message arriving in pieces: do not rescan or copy until it is whole.
                self._need -= len(data)
                return []
            self._need = 0
            data = bytes(self._buf)
            self._buf.clear()
        out: list[tuple[int, bytes]] = []
        n = len(data)
        pos = 0
        max_size = self.max_size
        while n - pos >= 5:
            length = int.from_bytes(data[pos + 1 : pos + 5], "big", signed=True)
            if length < 4 or length > max_size:
                raise ProtocolError(f"invalid message length {length} for type {data[pos:pos + 1]!r}")
            end = pos + 1 + length
            if end > n:
                break
            out.append((data[pos], data[pos + 5 : end]))
            pos = end
        if pos < n:
            self._buf += data[pos:]
            if n - pos >= 5:
                self._need = end - n
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def take_buffered(self) -> bytes:
        """Bytes of an incomplete message, for handing the stream to another reader."""
        rest = bytes(self._buf)
        self._buf.clear()
        self._need = 0
        return rest


class StartupReader:
    """Reads the untyped packets of the startup phase (SSLRequest, StartupMessage, ...)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) > MAX_STARTUP_PACKET + 4:
            # Checked again in next(); this only stops unbounded growth.
            raise ProtocolError("startup packet too long")

    def next(self) -> StartupPacket | None:
        if len(self._buf) < 4:
            return None
        length = _I32.unpack_from(self._buf, 0)[0]
        if length < 8 or length > MAX_STARTUP_PACKET:
            raise ProtocolError(f"invalid startup packet length {length}")
        if len(self._buf) < length:
            return None
        body = bytes(self._buf[4:length])
        del self._buf[:length]
        return decode_startup(body)

    def take_rest(self) -> bytes:
        """Bytes after the packets read so far (the start of the typed stream)."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest


def decode_startup(body: bytes) -> StartupPacket:
    code = _I32.unpack_from(body, 0)[0]
    if code == SSL_REQUEST:
        if len(body) != 4:
            raise ProtocolError("malformed SSLRequest")
        return SSLRequest()
    if code == GSSENC_REQUEST:
        if len(body) != 4:
            raise ProtocolError("malformed GSSENCRequest")
        return GSSENCRequest()
    if code == CANCEL_REQUEST:
        # Protocol 3.0 keys are 4 bytes; 3.2 allows up to 256.
        if len(body) < 12 or len(body) > 4 + 4 + 256:
            raise ProtocolError("malformed CancelRequest")
        pid = _I32.unpack_from(body, 4)[0]
        return CancelRequest(pid=pid, secret=bytes(body[8:]))
    major = code >> 16
    if major != 3:
        raise UnsupportedProtocol(f"unsupported frontend protocol {major}.{code & 0xFFFF}: server supports 3.0 to 3.0")
    parts = body[4:].split(b"\x00")
    # A valid packet is name\0value\0...\0 -> split leaves ['n','v',...,'','']
    if len(parts) < 2 or parts[-1] != b"" or parts[-2] != b"" or len(parts) % 2 != 0:
        raise ProtocolError("malformed startup packet")
    params: dict[str, str] = {}
    for i in range(0, len(parts) - 2, 2):
        try:
            name = parts[i].decode("utf-8")
            value = parts[i + 1].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError("startup parameters must be UTF-8") from exc
        if not name:
            raise ProtocolError("empty startup parameter name")
        params[name] = value
    return StartupMessage(version=code, params=params)


# --- payload decoders ------------------------------------------------------------------


class _Cursor:
    """Bounds-checked reads from one payload; every overrun is a ProtocolError."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def cstr(self) -> bytes:
        end = self.data.find(b"\x00", self.pos)
        if end < 0:
            raise ProtocolError("unterminated string in message")
        s = self.data[self.pos : end]
        self.pos = end + 1
        return s

    def i16(self) -> int:
        if self.pos + 2 > len(self.data):
            raise ProtocolError("message truncated")
        v = _I16.unpack_from(self.data, self.pos)[0]
        self.pos += 2
        return v

    def i32(self) -> int:
        if self.pos + 4 > len(self.data):
            raise ProtocolError("message truncated")
        v = _I32.unpack_from(self.data, self.pos)[0]
        self.pos += 4
        return v

    def u32(self) -> int:
        return self.i32() & 0xFFFFFFFF

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ProtocolError("message truncated")
        v = self.data[self.pos : self.pos + n]
        self.pos += n
        return v

    def count(self) -> int:
        n = self.i16()
        if n < 0:
            raise ProtocolError("negative count in message")
        return n

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ProtocolError("trailing bytes in message")


def decode_query(payload: bytes) -> Query:
    c = _Cursor(payload)
    sql = c.cstr()
    c.end()
    return Query(sql)


def decode_parse(payload: bytes) -> Parse:
    c = _Cursor(payload)
    name = c.cstr()
    sql = c.cstr()
    n = c.count()
    if n * 4 > len(payload):
        raise ProtocolError("parameter count exceeds message")
    types = tuple(c.u32() for _ in range(n))
    c.end()
    return Parse(name, sql, types)


def decode_bind(payload: bytes) -> Bind:
    c = _Cursor(payload)
    portal = c.cstr()
    stmt = c.cstr()
    nf = c.count()
    if nf * 2 > len(payload):
        raise ProtocolError("format count exceeds message")
    formats = tuple(c.i16() for _ in range(nf))
    np_ = c.count()
    if np_ * 4 > len(payload):
        raise ProtocolError("parameter count exceeds message")
    params: list[bytes | None] = []
    for _ in range(np_):
        ln = c.i32()
        if ln == -1:
            params.append(None)
        elif ln < -1:
            raise ProtocolError("invalid parameter length")
        else:
            params.append(c.take(ln))
    nr = c.count()
    if nr * 2 > len(payload):
        raise ProtocolError("result format count exceeds message")
    rformats = tuple(c.i16() for _ in range(nr))
    c.end()
    return Bind(portal, stmt, formats, tuple(params), rformats)


def bind_names(payload: bytes) -> tuple[bytes, bytes]:
    """(portal, statement) of a Bind without decoding its parameters (the hot path)."""
    a = payload.find(b"\x00")
    b = payload.find(b"\x00", a + 1) if a >= 0 else -1
    if b < 0:
        raise ProtocolError("malformed Bind")
    return payload[:a], payload[a + 1 : b]


def decode_execute(payload: bytes) -> Execute:
    c = _Cursor(payload)
    portal = c.cstr()
    max_rows = c.i32()
    c.end()
    return Execute(portal, max_rows)


def _decode_kind_name(payload: bytes, what: str) -> tuple[str, bytes]:
    if len(payload) < 2 or payload[0] not in (0x53, 0x50) or payload[-1] != 0:
        raise ProtocolError(f"malformed {what}")
    name = payload[1:-1]
    if b"\x00" in name:
        raise ProtocolError(f"malformed {what}")
    return chr(payload[0]), name


def decode_describe(payload: bytes) -> Describe:
    return Describe(*_decode_kind_name(payload, "Describe"))


def decode_close(payload: bytes) -> Close:
    return Close(*_decode_kind_name(payload, "Close"))


def decode_auth(payload: bytes) -> Authentication:
    if len(payload) < 4:
        raise ProtocolError("malformed Authentication message")
    return Authentication(_I32.unpack_from(payload, 0)[0], bytes(payload[4:]))


def decode_parameter_status(payload: bytes) -> ParameterStatus:
    c = _Cursor(payload)
    name = c.cstr().decode("utf-8", "replace")
    value = c.cstr().decode("utf-8", "replace")
    return ParameterStatus(name, value)


def decode_backend_key(payload: bytes) -> BackendKeyData:
    if len(payload) < 8:
        raise ProtocolError("malformed BackendKeyData")
    return BackendKeyData(_I32.unpack_from(payload, 0)[0], bytes(payload[4:]))


def decode_error(payload: bytes) -> ErrorResponse:
    """ErrorResponse or NoticeResponse: a list of (code byte, string) fields."""
    fields: dict[str, str] = {}
    pos = 0
    n = len(payload)
    while pos < n:
        code = payload[pos]
        if code == 0:
            break
        end = payload.find(b"\x00", pos + 1)
        if end < 0:
            raise ProtocolError("malformed ErrorResponse")
        fields[chr(code)] = payload[pos + 1 : end].decode("utf-8", "replace")
        pos = end + 1
    return ErrorResponse(fields)


def decode_command_tag(payload: bytes) -> str:
    return payload.rstrip(b"\x00").decode("ascii", "replace")


def decode_ready(payload: bytes) -> ReadyForQuery:
    if len(payload) != 1:
        raise ProtocolError("malformed ReadyForQuery")
    return ReadyForQuery(chr(payload[0]))


def rows_from_tag(tag: str) -> int | None:
    """Row count a CommandComplete tag carries ('SELECT 5', 'INSERT 0 3', 'COPY 7')."""
    sp = tag.rfind(" ")
    if sp < 0:
        return None
    last = tag[sp + 1 :]
    return int(last) if last.isdigit() else None


# --- encoders -----------------------------------------------------------------------------


def message(type_: int, payload: bytes = b"") -> bytes:
    return bytes((type_,)) + (len(payload) + 4).to_bytes(4, "big") + payload


def _cstr(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    if b"\x00" in b:
        raise ValueError("NUL byte in protocol string")
    return b + b"\x00"


def startup_message(params: dict[str, str], version: int = PROTOCOL_3_0) -> bytes:
    body = _I32.pack(version) + b"".join(_cstr(k) + _cstr(v) for k, v in params.items()) + b"\x00"
    return _I32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    return _I32.pack(8) + _I32.pack(SSL_REQUEST)


def cancel_request(pid: int, secret: bytes) -> bytes:
    body = _I32.pack(CANCEL_REQUEST) + _I32.pack(pid) + secret
    return _I32.pack(len(body) + 4) + body


def password_message(data: bytes) -> bytes:
    return message(ord("p"), data)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(ord("p"), _cstr(mechanism) + _I32.pack(len(data)) + data)


def query_message(sql: str | bytes) -> bytes:
    return message(ord("Q"), _cstr(sql))


def terminate_message() -> bytes:
    return message(ord("X"))


def auth_request(code: int, data: bytes = b"") -> bytes:
    return message(B.AUTHENTICATION, _I32.pack(code) + data)


def parameter_status(name: str, value: str) -> bytes:
    return message(B.PARAMETER_STATUS, _cstr(name) + _cstr(value))


def backend_key_data(pid: int, secret: bytes) -> bytes:
    return message(B.BACKEND_KEY_DATA, _I32.pack(pid) + secret)


def ready_for_query(status: str = "I") -> bytes:
    return message(B.READY_FOR_QUERY, status.encode("ascii"))


def negotiate_protocol_version(newest_minor: int, unsupported: list[str]) -> bytes:
    body = _I32.pack(newest_minor) + _I32.pack(len(unsupported)) + b"".join(_cstr(o) for o in unsupported)
    return message(B.NEGOTIATE_PROTOCOL_VERSION, body)


def error_response(
    sqlstate: str,
    msg: str,
    *,
    severity: str = "ERROR",
    detail: str | None = None,
    hint: str | None = None,
    notice: bool = False,
) -> bytes:
    """An ErrorResponse (or NoticeResponse) that every driver can map to an exception class."""
    fields = [b"S" + _cstr(severity), b"V" + _cstr(severity), b"C" + _cstr(sqlstate), b"M" + _cstr(msg.replace("\x00", ""))]
    if detail:
        fields.append(b"D" + _cstr(detail.replace("\x00", "")))
    if hint:
        fields.append(b"H" + _cstr(hint.replace("\x00", "")))
    return message(B.NOTICE_RESPONSE if notice else B.ERROR_RESPONSE, b"".join(fields) + b"\x00")


def row_description(names: list[str], type_oid: int = 25) -> bytes:
    """Text columns (type text by default), as pgwarden's own answers (the admin console) use."""
    fields = b"".join(_cstr(n) + _I32.pack(0) + _I16.pack(0) + _I32.pack(type_oid) + _I16.pack(-1)
                      + _I32.pack(-1) + _I16.pack(0) for n in names)
    return message(B.ROW_DESCRIPTION, _I16.pack(len(names)) + fields)


def data_row(values: list[str | None]) -> bytes:
    parts = [_I16.pack(len(values))]
    for v in values:
        if v is None:
            parts.append(_I32.pack(-1))
        else:
            b = v.encode("utf-8")
            parts.append(_I32.pack(len(b)) + b)
    return message(B.DATA_ROW, b"".join(parts))


def command_complete(tag: str) -> bytes:
    return message(B.COMMAND_COMPLETE, _cstr(tag))


def empty_query_response() -> bytes:
    return message(B.EMPTY_QUERY_RESPONSE)


def encode_error_fields(fields: dict[str, str], *, notice: bool = False) -> bytes:
    body = b"".join(k.encode("ascii") + _cstr(v.replace("\x00", "")) for k, v in fields.items()) + b"\x00"
    return message(B.NOTICE_RESPONSE if notice else B.ERROR_RESPONSE, body)


# --- the server's stream ---------------------------------------------------------------------

_SKIPPED = frozenset((B.DATA_ROW, B.COPY_DATA))


class BackendScanner:
    """Walks the server's byte stream without copying row data.

    ``feed(chunk)`` returns ``(out, events)``: ``out`` is the bytes that may be
    forwarded now (normally the chunk itself, uncopied) and ``events`` the
    messages the session must act on (completions, errors, ReadyForQuery,
    ParameterStatus, ...) as ``(type, payload, rows, start, end)``, where
    ``rows`` is the running DataRow count and ``start:end`` the message's place
    in ``out`` so the session can replace it. Row and copy data are forwarded
    even when a message spans chunks; any other message is held back until it
    is whole, so it can be inspected before the client sees a byte of it.
    """

    __slots__ = ("_carry", "_skip", "rows", "max_size")

    def __init__(self, max_size: int = 1 << 30) -> None:
        self._carry = b""  # a partial header or a partial message held back
        self._skip = 0  # bytes of a passed-through message still to come
        self.rows = 0  # DataRows seen so far (monotonic)
        self.max_size = max_size

    def feed(self, data: bytes) -> tuple[bytes, list[tuple[int, bytes, int, int, int]]]:
        events: list[tuple[int, bytes, int, int, int]] = []
        head = b""
        if self._skip:
            if self._skip >= len(data):
                self._skip -= len(data)
                return data, events
            head = data[: self._skip]
            data = data[self._skip :]
            self._skip = 0
        elif self._carry:
            data = self._carry + data
            self._carry = b""
        n = len(data)
        pos = 0
        limit = n
        unpack = _I32.unpack_from
        skipped = _SKIPPED
        rows = self.rows
        base = len(head)
        while pos < n:
            if n - pos < 5:
                self._carry = data[pos:]
                limit = pos
                break
            t = data[pos]
            length = unpack(data, pos + 1)[0]
            if length < 4 or length > self.max_size:
                raise ProtocolError(f"server sent invalid message length {length}")
            end = pos + 1 + length
            if t in skipped:
                if t == 0x44:
                    rows += 1
                if end > n:
                    self._skip = end - n
                    break
                pos = end
                continue
            if end > n:
                self._carry = data[pos:]
                limit = pos
                break
            events.append((t, data[pos + 5 : end], rows, base + pos, base + end))
            pos = end
        self.rows = rows
        out = data if limit == n else data[:limit]
        if head:
            out = head + out
        return out, events


def split_execute(payload: bytes) -> tuple[bytes, int]:
    """(portal, max rows) of an Execute."""
    end = payload.find(b"\x00")
    if end < 0 or len(payload) != end + 5:
        raise ProtocolError("invalid Execute message")
    return payload[:end], int.from_bytes(payload[end + 1:end + 5], "big", signed=True)
