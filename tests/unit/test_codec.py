"""proxy.wire.codec without sockets: bytes in, messages out, and back.

Framing (MessageReader, StartupReader, BackendScanner) is fed every chunking
that matters; payload decoders are fed valid and hostile payloads; encoders
are checked byte-exactly and by round-tripping through the decoders.
"""

from __future__ import annotations

import struct

import pytest

from proxy.wire import codec
from proxy.wire.codec import (
    MAX_STARTUP_PACKET,
    BackendScanner,
    MessageReader,
    ProtocolError,
    StartupReader,
)
from proxy.wire.codes import CANCEL_REQUEST, GSSENC_REQUEST, PROTOCOL_3_0, SSL_REQUEST, Auth, B, F
from proxy.wire.messages import (
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
)


def i32(v: int) -> bytes:
    return struct.pack("!i", v)


def i16(v: int) -> bytes:
    return struct.pack("!h", v)


def u32(v: int) -> bytes:
    return struct.pack("!I", v)


def msg(t: str, payload: bytes = b"") -> bytes:
    """A typed message built by hand (independent of codec.message)."""
    return t.encode("ascii") + i32(len(payload) + 4) + payload


def feed_all(reader: MessageReader, chunks: list[bytes]) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    for c in chunks:
        out.extend(reader.feed(c))
    return out


# A small frontend stream: Query, Parse, Bind, Execute, Sync (empty payload).
Q_PAYLOAD = b"SELECT 1\x00"
P_PAYLOAD = b"s1\x00SELECT $1\x00" + i16(1) + u32(23)
B_PAYLOAD = b"\x00s1\x00" + i16(0) + i16(1) + i32(1) + b"7" + i16(0)
E_PAYLOAD = b"\x00" + i32(0)
FRONT_MSGS = [
    (ord("Q"), Q_PAYLOAD),
    (ord("P"), P_PAYLOAD),
    (ord("B"), B_PAYLOAD),
    (ord("E"), E_PAYLOAD),
    (ord("S"), b""),
]
FRONT_STREAM = b"".join(bytes((t,)) + i32(len(p) + 4) + p for t, p in FRONT_MSGS)


# --- MessageReader ------------------------------------------------------------------------


class TestMessageReaderFraming:
    def test_one_whole_message(self) -> None:
        r = MessageReader()
        assert r.feed(msg("Q", Q_PAYLOAD)) == [(ord("Q"), Q_PAYLOAD)]
        assert r.buffered == 0

    def test_type_is_int_and_payload_bytes(self) -> None:
        (t, p), = MessageReader().feed(msg("Q", Q_PAYLOAD))
        assert isinstance(t, int)
        assert bytes(p) == Q_PAYLOAD

    def test_many_messages_in_one_chunk(self) -> None:
        r = MessageReader()
        assert r.feed(FRONT_STREAM) == FRONT_MSGS
        assert r.buffered == 0

    def test_one_byte_at_a_time(self) -> None:
        r = MessageReader()
        got = []
        for i in range(len(FRONT_STREAM)):
            got.extend(r.feed(FRONT_STREAM[i : i + 1]))
        assert got == FRONT_MSGS
        assert r.buffered == 0

    def test_each_message_appears_exactly_when_its_last_byte_arrives(self) -> None:
        r = MessageReader()
        ends = []
        pos = 0
        for _, p in FRONT_MSGS:
            pos += 5 + len(p)
            ends.append(pos)
        for i in range(len(FRONT_STREAM)):
            got = r.feed(FRONT_STREAM[i : i + 1])
            if i + 1 in ends:
                assert got == [FRONT_MSGS[ends.index(i + 1)]]
            else:
                assert got == []

    @pytest.mark.parametrize("cut", range(len(FRONT_STREAM) + 1))
    def test_split_across_two_chunks_at_every_offset(self, cut: int) -> None:
        r = MessageReader()
        first = r.feed(FRONT_STREAM[:cut])
        second = r.feed(FRONT_STREAM[cut:])
        assert first + second == FRONT_MSGS
        assert r.buffered == 0
        # Exactly the messages wholly inside the first chunk come out of the first feed.
        pos, whole = 0, 0
        for _, p in FRONT_MSGS:
            pos += 5 + len(p)
            if pos <= cut:
                whole += 1
        assert len(first) == whole

    @pytest.mark.parametrize("cut", range(1, len(FRONT_STREAM)))
    def test_three_chunks(self, cut: int) -> None:
        r = MessageReader()
        mid = (cut + len(FRONT_STREAM)) // 2
        got = feed_all(r, [FRONT_STREAM[:cut], FRONT_STREAM[cut:mid], FRONT_STREAM[mid:]])
        assert got == FRONT_MSGS

    def test_empty_payload_messages(self) -> None:
        r = MessageReader()
        stream = msg("S") + msg("H") + msg("X")
        assert r.feed(stream) == [(ord("S"), b""), (ord("H"), b""), (ord("X"), b"")]

    def test_empty_feed(self) -> None:
        r = MessageReader()
        assert r.feed(b"") == []
        assert r.buffered == 0

    def test_partial_then_take_buffered(self) -> None:
        r = MessageReader()
        whole = msg("Q", Q_PAYLOAD)
        assert r.feed(msg("S") + whole[:7]) == [(ord("S"), b"")]
        assert r.buffered == 7
        assert r.take_buffered() == whole[:7]
        assert r.buffered == 0
        # After take_buffered the reader starts clean.
        assert r.feed(whole) == [(ord("Q"), Q_PAYLOAD)]

    def test_partial_header_only(self) -> None:
        r = MessageReader()
        assert r.feed(b"Q\x00\x00") == []
        assert r.buffered == 3
        assert r.feed(b"\x00\x04") == [(ord("Q"), b"")]
        assert r.buffered == 0

    def test_large_message_in_many_small_chunks(self) -> None:
        payload = bytes(range(256)) * (4 * 1024 * 8)  # 8 MiB
        whole = msg("d", payload) + msg("c")
        r = MessageReader()
        step = 4096
        got = []
        for i in range(0, len(whole), step):
            got.extend(r.feed(whole[i : i + step]))
        assert len(got) == 2
        assert got[0][0] == ord("d")
        assert bytes(got[0][1]) == payload
        assert got[1] == (ord("c"), b"")
        assert r.buffered == 0

    def test_large_message_buffer_grows_with_input(self) -> None:
        payload = b"x" * 100_000
        whole = msg("d", payload)
        r = MessageReader()
        for i in range(0, 50_000, 1000):
            assert r.feed(whole[i : i + 1000]) == []
            assert r.buffered == i + 1000
        assert r.feed(whole[50_000:]) == [(ord("d"), payload)]

    def test_length_equal_to_max_size_is_accepted(self) -> None:
        r = MessageReader(max_size=104)
        payload = b"a" * 100
        assert r.feed(msg("d", payload)) == [(ord("d"), payload)]


class TestMessageReaderHostile:
    @pytest.mark.parametrize("length", [0, 1, 2, 3])
    def test_length_below_four(self, length: int) -> None:
        r = MessageReader()
        with pytest.raises(ProtocolError, match=f"invalid message length {length}"):
            r.feed(b"Q" + i32(length) + b"\x00" * 8)

    @pytest.mark.parametrize("length", [-1, -4, -(2**31)])
    def test_negative_length(self, length: int) -> None:
        r = MessageReader()
        with pytest.raises(ProtocolError, match="invalid message length -"):
            r.feed(b"Q" + i32(length))

    def test_length_above_max_size(self) -> None:
        r = MessageReader(max_size=1000)
        with pytest.raises(ProtocolError, match="invalid message length 1001"):
            r.feed(b"Q" + i32(1001))

    def test_bad_length_after_good_messages(self) -> None:
        r = MessageReader()
        with pytest.raises(ProtocolError):
            r.feed(msg("S") + b"Q" + i32(2))

    def test_two_gigabyte_header_raises_before_buffering(self) -> None:
        r = MessageReader()  # default max 64 MiB
        with pytest.raises(ProtocolError, match=str(2**31 - 1)):
            r.feed(b"Q" + i32(2**31 - 1) + b"A" * 1000)
        assert r.buffered == 0

    def test_two_gigabyte_header_split_raises_when_header_complete(self) -> None:
        r = MessageReader()
        header = b"Q" + i32(2**31 - 1)
        for i in range(4):
            assert r.feed(header[i : i + 1]) == []
            assert r.buffered == i + 1
        with pytest.raises(ProtocolError):
            r.feed(header[4:] + b"A" * 1000)
        assert r.buffered <= 5

    def test_two_gigabyte_header_after_partial_message(self) -> None:
        r = MessageReader()
        whole = msg("Q", Q_PAYLOAD)
        r.feed(whole[:3])
        with pytest.raises(ProtocolError):
            r.feed(whole[3:] + b"Q" + i32(2**31 - 1) + b"A" * 100)
        assert r.buffered < 100


# --- StartupReader / decode_startup ---------------------------------------------------------


def startup_raw(body: bytes) -> bytes:
    return i32(len(body) + 4) + body


def read_one(data: bytes):
    r = StartupReader()
    r.feed(data)
    return r.next()


class TestStartup:
    def test_ssl_request(self) -> None:
        assert read_one(i32(8) + i32(SSL_REQUEST)) == SSLRequest()
        assert codec.ssl_request() == i32(8) + i32(80877103)

    def test_gssenc_request(self) -> None:
        assert read_one(i32(8) + i32(GSSENC_REQUEST)) == GSSENCRequest()

    def test_ssl_request_with_extra_bytes_is_malformed(self) -> None:
        with pytest.raises(ProtocolError, match="malformed SSLRequest"):
            read_one(startup_raw(i32(SSL_REQUEST) + b"\x00\x00\x00\x00"))

    def test_gssenc_request_with_extra_bytes_is_malformed(self) -> None:
        with pytest.raises(ProtocolError, match="malformed GSSENCRequest"):
            read_one(startup_raw(i32(GSSENC_REQUEST) + b"\x00"))

    def test_cancel_request_4_byte_key(self) -> None:
        pkt = read_one(startup_raw(i32(CANCEL_REQUEST) + i32(4242) + b"\xde\xad\xbe\xef"))
        assert pkt == CancelRequest(pid=4242, secret=b"\xde\xad\xbe\xef")

    @pytest.mark.parametrize("keylen", [8, 32, 256])
    def test_cancel_request_longer_keys(self, keylen: int) -> None:
        key = bytes(i % 256 for i in range(keylen))
        pkt = read_one(startup_raw(i32(CANCEL_REQUEST) + i32(7) + key))
        assert pkt == CancelRequest(pid=7, secret=key)

    @pytest.mark.parametrize("keylen", [0, 3, 257])
    def test_cancel_request_bad_key_length(self, keylen: int) -> None:
        with pytest.raises(ProtocolError, match="malformed CancelRequest"):
            read_one(startup_raw(i32(CANCEL_REQUEST) + i32(7) + b"k" * keylen))

    def test_startup_message_with_params(self) -> None:
        body = i32(PROTOCOL_3_0) + b"user\x00alice\x00database\x00hotel\x00application_name\x00psql\x00\x00"
        pkt = read_one(startup_raw(body))
        assert pkt == StartupMessage(
            version=196608, params={"user": "alice", "database": "hotel", "application_name": "psql"}
        )
        assert pkt.minor == 0

    def test_startup_message_no_params(self) -> None:
        assert read_one(startup_raw(i32(PROTOCOL_3_0) + b"\x00")) == StartupMessage(196608, {})

    def test_startup_message_empty_value(self) -> None:
        assert read_one(startup_raw(i32(PROTOCOL_3_0) + b"options\x00\x00\x00")) == StartupMessage(
            196608, {"options": ""}
        )

    def test_protocol_2_rejected(self) -> None:
        with pytest.raises(ProtocolError, match=r"unsupported frontend protocol 2\.0"):
            read_one(startup_raw(i32(2 << 16) + b"user\x00a\x00\x00"))

    def test_protocol_4_rejected(self) -> None:
        with pytest.raises(ProtocolError, match=r"unsupported frontend protocol 4\.0"):
            read_one(startup_raw(i32(4 << 16) + b"\x00"))

    def test_protocol_3_2_accepted_with_minor(self) -> None:
        pkt = read_one(startup_raw(i32((3 << 16) | 2) + b"user\x00bob\x00\x00"))
        assert isinstance(pkt, StartupMessage)
        assert pkt.version == 196610
        assert pkt.minor == 2
        assert pkt.params == {"user": "bob"}

    @pytest.mark.parametrize("length", [0, 4, 7, -1])
    def test_length_below_8(self, length: int) -> None:
        r = StartupReader()
        r.feed(i32(length) + b"\x00" * 8)
        with pytest.raises(ProtocolError, match=f"invalid startup packet length {length}"):
            r.next()

    def test_length_above_10000_rejected_from_header(self) -> None:
        r = StartupReader()
        r.feed(i32(10_001) + i32(PROTOCOL_3_0))
        with pytest.raises(ProtocolError, match="invalid startup packet length 10001"):
            r.next()

    def test_feeding_more_than_limit_raises(self) -> None:
        r = StartupReader()
        with pytest.raises(ProtocolError, match="too long"):
            r.feed(b"\x00" * (MAX_STARTUP_PACKET + 5))

    def test_length_exactly_10000_accepted(self) -> None:
        head = i32(PROTOCOL_3_0) + b"user\x00alice\x00options\x00"
        pad = 10_000 - 4 - len(head) - 2
        body = head + b"v" * pad + b"\x00\x00"
        data = startup_raw(body)
        assert len(data) == 10_000
        pkt = read_one(data)
        assert isinstance(pkt, StartupMessage)
        assert pkt.params["options"] == "v" * pad

    def test_missing_terminator(self) -> None:
        with pytest.raises(ProtocolError, match="malformed startup packet"):
            read_one(startup_raw(i32(PROTOCOL_3_0) + b"user\x00alice\x00"))

    def test_missing_final_nul_of_value(self) -> None:
        with pytest.raises(ProtocolError, match="malformed startup packet"):
            read_one(startup_raw(i32(PROTOCOL_3_0) + b"user\x00alice"))

    def test_odd_number_of_strings(self) -> None:
        with pytest.raises(ProtocolError, match="malformed startup packet"):
            read_one(startup_raw(i32(PROTOCOL_3_0) + b"user\x00alice\x00database\x00\x00"))

    def test_junk_after_terminator(self) -> None:
        with pytest.raises(ProtocolError):
            read_one(startup_raw(i32(PROTOCOL_3_0) + b"user\x00alice\x00\x00x\x00\x00"))

    def test_empty_parameter_name(self) -> None:
        with pytest.raises(ProtocolError, match="empty startup parameter name"):
            read_one(startup_raw(i32(PROTOCOL_3_0) + b"user\x00alice\x00\x00bob\x00\x00"))

    def test_non_utf8_parameter(self) -> None:
        with pytest.raises(ProtocolError, match="UTF-8"):
            read_one(startup_raw(i32(PROTOCOL_3_0) + b"user\x00al\xffice\x00\x00"))

    def test_non_utf8_parameter_name(self) -> None:
        with pytest.raises(ProtocolError, match="UTF-8"):
            read_one(startup_raw(i32(PROTOCOL_3_0) + b"us\xc3er\x00alice\x00\x00"))

    def test_utf8_parameter_value(self) -> None:
        pkt = read_one(startup_raw(i32(PROTOCOL_3_0) + "user\x00zoë\x00\x00".encode()))
        assert pkt == StartupMessage(196608, {"user": "zoë"})

    def test_incomplete_returns_none_until_whole(self) -> None:
        data = codec.startup_message({"user": "alice", "database": "hotel"})
        r = StartupReader()
        for i in range(len(data) - 1):
            r.feed(data[i : i + 1])
            assert r.next() is None
        r.feed(data[-1:])
        assert r.next() == StartupMessage(196608, {"user": "alice", "database": "hotel"})
        assert r.next() is None
        assert r.take_rest() == b""

    def test_bytes_after_packet_stay_for_take_rest(self) -> None:
        tail = msg("Q", b"SELECT 1\x00")
        r = StartupReader()
        r.feed(codec.startup_message({"user": "alice"}) + tail)
        assert r.next() == StartupMessage(196608, {"user": "alice"})
        assert r.take_rest() == tail
        assert r.take_rest() == b""

    def test_ssl_request_then_tls_bytes(self) -> None:
        r = StartupReader()
        r.feed(codec.ssl_request() + b"\x16\x03\x01")
        assert r.next() == SSLRequest()
        assert r.next() is None  # 3 bytes: not even a length
        assert r.take_rest() == b"\x16\x03\x01"

    def test_ssl_then_startup_in_one_chunk(self) -> None:
        r = StartupReader()
        r.feed(codec.ssl_request() + codec.startup_message({"user": "u"}))
        assert r.next() == SSLRequest()
        assert r.next() == StartupMessage(196608, {"user": "u"})
        assert r.next() is None


# --- payload decoders -----------------------------------------------------------------------


class TestDecodeQuery:
    def test_ok(self) -> None:
        assert codec.decode_query(b"SELECT 1\x00") == Query(b"SELECT 1")

    def test_empty(self) -> None:
        assert codec.decode_query(b"\x00") == Query(b"")

    def test_missing_nul(self) -> None:
        with pytest.raises(ProtocolError, match="unterminated string"):
            codec.decode_query(b"SELECT 1")

    def test_trailing_bytes(self) -> None:
        with pytest.raises(ProtocolError, match="trailing bytes"):
            codec.decode_query(b"SELECT 1\x00SELECT 2\x00")


class TestDecodeParse:
    def test_ok(self) -> None:
        assert codec.decode_parse(P_PAYLOAD) == Parse(b"s1", b"SELECT $1", (23,))

    def test_unnamed_no_types(self) -> None:
        assert codec.decode_parse(b"\x00SELECT 1\x00" + i16(0)) == Parse(b"", b"SELECT 1", ())

    def test_types_are_unsigned(self) -> None:
        p = codec.decode_parse(b"\x00q\x00" + i16(2) + u32(0xFFFFFFFF) + u32(0))
        assert p.param_types == (4294967295, 0)

    def test_count_larger_than_payload(self) -> None:
        with pytest.raises(ProtocolError, match="parameter count exceeds message"):
            codec.decode_parse(b"\x00q\x00" + i16(32767) + u32(23))

    def test_count_slightly_larger_than_types(self) -> None:
        with pytest.raises(ProtocolError):
            codec.decode_parse(b"s\x00SELECT $1, $2, $3\x00" + i16(3) + u32(23) + u32(23))

    def test_negative_count(self) -> None:
        with pytest.raises(ProtocolError, match="negative count"):
            codec.decode_parse(b"\x00q\x00" + i16(-1))

    def test_missing_count(self) -> None:
        with pytest.raises(ProtocolError, match="truncated"):
            codec.decode_parse(b"\x00q\x00")

    def test_unterminated_sql(self) -> None:
        with pytest.raises(ProtocolError, match="unterminated"):
            codec.decode_parse(b"\x00SELECT 1")

    def test_trailing_bytes(self) -> None:
        with pytest.raises(ProtocolError, match="trailing"):
            codec.decode_parse(b"\x00q\x00" + i16(0) + b"\x00")


def bind_payload(portal: bytes, stmt: bytes, formats, params, rformats) -> bytes:
    out = portal + b"\x00" + stmt + b"\x00" + i16(len(formats)) + b"".join(i16(f) for f in formats)
    out += i16(len(params))
    for p in params:
        out += i32(-1) if p is None else i32(len(p)) + p
    out += i16(len(rformats)) + b"".join(i16(f) for f in rformats)
    return out


class TestDecodeBind:
    def test_ok(self) -> None:
        assert codec.decode_bind(B_PAYLOAD) == Bind(b"", b"s1", (), (b"7",), ())

    def test_null_and_empty_params(self) -> None:
        payload = bind_payload(b"p", b"s", [0, 1], [None, b"", b"\x00\x01"], [1])
        assert codec.decode_bind(payload) == Bind(b"p", b"s", (0, 1), (None, b"", b"\x00\x01"), (1,))

    @pytest.mark.parametrize("ln", [-2, -100, -(2**31)])
    def test_negative_length_below_minus_one(self, ln: int) -> None:
        payload = b"\x00\x00" + i16(0) + i16(1) + i32(ln) + i16(0)
        with pytest.raises(ProtocolError, match="invalid parameter length"):
            codec.decode_bind(payload)

    def test_truncated_param_value(self) -> None:
        payload = b"\x00\x00" + i16(0) + i16(1) + i32(10) + b"abc"
        with pytest.raises(ProtocolError, match="truncated"):
            codec.decode_bind(payload)

    def test_truncated_before_result_formats(self) -> None:
        payload = bind_payload(b"", b"", [], [b"x"], [])[:-2]
        with pytest.raises(ProtocolError, match="truncated"):
            codec.decode_bind(payload)

    def test_huge_param_count(self) -> None:
        payload = b"\x00\x00" + i16(0) + i16(32767) + i32(-1)
        with pytest.raises(ProtocolError, match="parameter count exceeds message"):
            codec.decode_bind(payload)

    def test_huge_format_count(self) -> None:
        payload = b"\x00\x00" + i16(32767) + i16(0)
        with pytest.raises(ProtocolError, match="format count exceeds message"):
            codec.decode_bind(payload)

    def test_huge_result_format_count(self) -> None:
        payload = b"\x00\x00" + i16(0) + i16(0) + i16(32767)
        with pytest.raises(ProtocolError, match="result format count exceeds message"):
            codec.decode_bind(payload)

    def test_trailing_bytes(self) -> None:
        with pytest.raises(ProtocolError, match="trailing"):
            codec.decode_bind(B_PAYLOAD + b"\x00")

    def test_unterminated_names(self) -> None:
        with pytest.raises(ProtocolError):
            codec.decode_bind(b"portal")


class TestBindNames:
    def test_ok(self) -> None:
        assert codec.bind_names(bind_payload(b"p1", b"s1", [], [b"x"], [])) == (b"p1", b"s1")

    def test_unnamed(self) -> None:
        assert codec.bind_names(B_PAYLOAD) == (b"", b"s1")

    @pytest.mark.parametrize("payload", [b"", b"p1", b"p1\x00s1"])
    def test_malformed(self, payload: bytes) -> None:
        with pytest.raises(ProtocolError, match="malformed Bind"):
            codec.bind_names(payload)


class TestDecodeExecute:
    def test_ok(self) -> None:
        assert codec.decode_execute(b"cur\x00" + i32(100)) == Execute(b"cur", 100)

    def test_unnamed_unlimited(self) -> None:
        assert codec.decode_execute(E_PAYLOAD) == Execute(b"", 0)

    def test_truncated(self) -> None:
        with pytest.raises(ProtocolError, match="truncated"):
            codec.decode_execute(b"cur\x00\x00\x00")

    def test_trailing(self) -> None:
        with pytest.raises(ProtocolError, match="trailing"):
            codec.decode_execute(b"cur\x00" + i32(0) + b"x")


class TestDescribeClose:
    @pytest.mark.parametrize("decode,cls", [(codec.decode_describe, Describe), (codec.decode_close, Close)])
    def test_statement_and_portal(self, decode, cls) -> None:
        assert decode(b"Sstmt1\x00") == cls("S", b"stmt1")
        assert decode(b"P\x00") == cls("P", b"")

    @pytest.mark.parametrize("decode,what", [(codec.decode_describe, "Describe"), (codec.decode_close, "Close")])
    @pytest.mark.parametrize("payload", [b"Xname\x00", b"s\x00", b"", b"S", b"Sname", b"Sa\x00b\x00"])
    def test_malformed(self, decode, what: str, payload: bytes) -> None:
        with pytest.raises(ProtocolError, match=f"malformed {what}"):
            decode(payload)


class TestBackendDecoders:
    def test_decode_error_fields(self) -> None:
        payload = b"SFATAL\x00VFATAL\x00C28P01\x00Mpassword authentication failed\x00Dd\x00Hh\x00\x00"
        e = codec.decode_error(payload)
        assert e == ErrorResponse(
            {"S": "FATAL", "V": "FATAL", "C": "28P01", "M": "password authentication failed", "D": "d", "H": "h"}
        )
        assert e.sqlstate == "28P01"
        assert e.severity == "FATAL"
        assert e.message == "password authentication failed"

    def test_decode_error_severity_prefers_v(self) -> None:
        e = codec.decode_error(b"SFEHLER\x00VERROR\x00C42501\x00\x00")
        assert e.severity == "ERROR"
        assert codec.decode_error(b"SERREUR\x00\x00").severity == "ERREUR"

    def test_decode_error_empty(self) -> None:
        assert codec.decode_error(b"\x00").fields == {}
        assert codec.decode_error(b"").fields == {}

    def test_decode_error_unterminated_field(self) -> None:
        with pytest.raises(ProtocolError, match="malformed ErrorResponse"):
            codec.decode_error(b"SERROR\x00Mno end")

    def test_decode_error_bad_utf8_replaced(self) -> None:
        assert codec.decode_error(b"Mab\xff\x00\x00").message == "ab\ufffd"

    @pytest.mark.parametrize(
        "payload,tag",
        [(b"SELECT 5\x00", "SELECT 5"), (b"INSERT 0 3\x00", "INSERT 0 3"), (b"BEGIN\x00", "BEGIN"), (b"COPY 7", "COPY 7")],
    )
    def test_decode_command_tag(self, payload: bytes, tag: str) -> None:
        assert codec.decode_command_tag(payload) == tag

    @pytest.mark.parametrize(
        "tag,rows",
        [
            ("SELECT 5", 5),
            ("INSERT 0 3", 3),
            ("BEGIN", None),
            ("COPY 7", 7),
            ("UPDATE 0", 0),
            ("DELETE 12", 12),
            ("FETCH 100", 100),
            ("MOVE 2", 2),
            ("MERGE 4", 4),
            ("CREATE TABLE", None),
            ("", None),
            ("SELECT ", None),
        ],
    )
    def test_rows_from_tag(self, tag: str, rows: int | None) -> None:
        assert codec.rows_from_tag(tag) == rows

    @pytest.mark.parametrize("status", ["I", "T", "E"])
    def test_decode_ready(self, status: str) -> None:
        assert codec.decode_ready(status.encode()) == ReadyForQuery(status)

    @pytest.mark.parametrize("payload", [b"", b"IT"])
    def test_decode_ready_malformed(self, payload: bytes) -> None:
        with pytest.raises(ProtocolError, match="malformed ReadyForQuery"):
            codec.decode_ready(payload)

    def test_decode_auth(self) -> None:
        assert codec.decode_auth(i32(5) + b"salt") == Authentication(5, b"salt")
        assert codec.decode_auth(i32(0)) == Authentication(0, b"")
        with pytest.raises(ProtocolError, match="malformed Authentication"):
            codec.decode_auth(b"\x00\x00\x00")

    def test_decode_backend_key_short(self) -> None:
        with pytest.raises(ProtocolError, match="malformed BackendKeyData"):
            codec.decode_backend_key(i32(1) + b"abc")


# --- encoders (byte-exact and round-trip) ------------------------------------------------------


def one_message(data: bytes) -> tuple[int, bytes]:
    r = MessageReader()
    msgs = r.feed(data)
    assert len(msgs) == 1
    assert r.buffered == 0
    return msgs[0]


class TestEncoders:
    def test_message(self) -> None:
        assert codec.message(ord("S")) == b"S\x00\x00\x00\x04"
        assert codec.message(ord("Q"), b"x\x00") == b"Q\x00\x00\x00\x06x\x00"

    def test_error_response_exact_bytes(self) -> None:
        body = b"SERROR\x00VERROR\x00CXX000\x00Mboom\x00\x00"
        assert codec.error_response("XX000", "boom") == b"E" + i32(len(body) + 4) + body

    def test_error_response_with_detail_and_hint(self) -> None:
        t, p = one_message(codec.error_response("42501", "denied", detail="why", hint="ask", severity="FATAL"))
        assert t == ord("E") == B.ERROR_RESPONSE
        assert codec.decode_error(p).fields == {
            "S": "FATAL", "V": "FATAL", "C": "42501", "M": "denied", "D": "why", "H": "ask"
        }

    def test_error_response_without_detail_and_hint(self) -> None:
        t, p = one_message(codec.error_response("28P01", "nope"))
        assert t == ord("E")
        assert codec.decode_error(p).fields == {"S": "ERROR", "V": "ERROR", "C": "28P01", "M": "nope"}

    def test_notice_response(self) -> None:
        t, p = one_message(codec.error_response("01000", "careful", severity="WARNING", notice=True))
        assert t == ord("N") == B.NOTICE_RESPONSE
        assert codec.decode_error(p).fields == {"S": "WARNING", "V": "WARNING", "C": "01000", "M": "careful"}

    def test_error_response_strips_nul(self) -> None:
        _, p = one_message(codec.error_response("XX000", "a\x00b", detail="c\x00d"))
        assert codec.decode_error(p).fields["M"] == "ab"
        assert codec.decode_error(p).fields["D"] == "cd"

    def test_encode_error_fields_round_trip(self) -> None:
        fields = {"S": "ERROR", "C": "22012", "M": "division by zero", "P": "10"}
        t, p = one_message(codec.encode_error_fields(fields))
        assert t == ord("E")
        assert codec.decode_error(p).fields == fields
        assert one_message(codec.encode_error_fields(fields, notice=True))[0] == ord("N")

    def test_startup_message_round_trip(self) -> None:
        params = {"user": "alice", "database": "hotel", "client_encoding": "UTF8"}
        data = codec.startup_message(params)
        assert data[:4] == i32(len(data))
        assert read_one(data) == StartupMessage(PROTOCOL_3_0, params)

    def test_startup_message_exact_bytes(self) -> None:
        assert codec.startup_message({"user": "a"}) == i32(16) + i32(196608) + b"user\x00a\x00\x00"

    def test_startup_message_version_3_2_round_trip(self) -> None:
        pkt = read_one(codec.startup_message({"user": "a"}, version=(3 << 16) | 2))
        assert pkt.minor == 2

    def test_startup_message_nul_refused(self) -> None:
        with pytest.raises(ValueError):
            codec.startup_message({"user": "a\x00b"})

    def test_query_message_round_trip(self) -> None:
        t, p = one_message(codec.query_message("SELECT 'é'"))
        assert t == F.QUERY
        assert codec.decode_query(p) == Query("SELECT 'é'".encode())
        assert codec.query_message(b"SELECT 1") == b"Q" + i32(13) + b"SELECT 1\x00"

    @pytest.mark.parametrize("secret", [b"\x00\x01\x02\x03", bytes(range(32))])
    def test_cancel_request_round_trip(self, secret: bytes) -> None:
        data = codec.cancel_request(31337, secret)
        assert data[:4] == i32(12 + len(secret))
        assert read_one(data) == CancelRequest(31337, secret)
        assert codec.decode_startup(data[4:]) == CancelRequest(31337, secret)

    def test_parameter_status_round_trip(self) -> None:
        data = codec.parameter_status("server_version", "17.2")
        assert data == b"S" + i32(4 + 15 + 5) + b"server_version\x0017.2\x00"
        t, p = one_message(data)
        assert t == B.PARAMETER_STATUS
        assert codec.decode_parameter_status(p) == ParameterStatus("server_version", "17.2")

    def test_backend_key_data_round_trip(self) -> None:
        t, p = one_message(codec.backend_key_data(1234, b"\x0a\x0b\x0c\x0d"))
        assert t == ord("K")
        assert codec.decode_backend_key(p) == BackendKeyData(1234, b"\x0a\x0b\x0c\x0d")
        t, p = one_message(codec.backend_key_data(-5, bytes(32)))
        assert codec.decode_backend_key(p) == BackendKeyData(-5, bytes(32))

    @pytest.mark.parametrize("status", ["I", "T", "E"])
    def test_ready_for_query_round_trip(self, status: str) -> None:
        data = codec.ready_for_query(status)
        assert data == b"Z\x00\x00\x00\x05" + status.encode()
        assert codec.decode_ready(one_message(data)[1]) == ReadyForQuery(status)

    def test_ready_for_query_default_idle(self) -> None:
        assert codec.ready_for_query() == b"Z\x00\x00\x00\x05I"

    def test_negotiate_protocol_version(self) -> None:
        t, p = one_message(codec.negotiate_protocol_version(0, ["_pq_.a", "_pq_.b"]))
        assert t == ord("v")
        assert p == i32(0) + i32(2) + b"_pq_.a\x00_pq_.b\x00"
        t, p = one_message(codec.negotiate_protocol_version(2, []))
        assert p == i32(2) + i32(0)

    def test_auth_request_round_trip(self) -> None:
        t, p = one_message(codec.auth_request(Auth.SASL, b"SCRAM-SHA-256\x00\x00"))
        assert t == ord("R")
        assert codec.decode_auth(p) == Authentication(10, b"SCRAM-SHA-256\x00\x00")
        assert codec.auth_request(Auth.OK) == b"R" + i32(8) + i32(0)

    def test_password_and_sasl_messages(self) -> None:
        assert codec.password_message(b"md5abc\x00") == b"p" + i32(11) + b"md5abc\x00"
        t, p = one_message(codec.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc"))
        assert t == F.PASSWORD
        assert p == b"SCRAM-SHA-256\x00" + i32(11) + b"n,,n=,r=abc"

    def test_terminate(self) -> None:
        assert codec.terminate_message() == b"X\x00\x00\x00\x04"


# --- BackendScanner -------------------------------------------------------------------------------


def row_description(*names: str) -> bytes:
    body = i16(len(names))
    for n in names:
        body += n.encode() + b"\x00" + i32(16384) + i16(1) + i32(25) + i16(-1) + i32(-1) + i16(0)
    return msg("T", body)


def data_row(*values: bytes | None) -> bytes:
    body = i16(len(values))
    for v in values:
        body += i32(-1) if v is None else i32(len(v)) + v
    return msg("D", body)


SERVER_MSGS = [
    row_description("id", "name"),
    data_row(b"1", b"alice"),
    data_row(b"2", None),
    data_row(b"3", b"carol"),
    msg("C", b"SELECT 3\x00"),
    msg("Z", b"I"),
]
SERVER_STREAM = b"".join(SERVER_MSGS)
# (type, payload, rows) of every event the session acts on: DataRows are not events.
EXPECTED_EVENTS = [
    (ord("T"), SERVER_MSGS[0][5:], 0),
    (ord("C"), b"SELECT 3\x00", 3),
    (ord("Z"), b"I", 3),
]


def scan(chunks: list[bytes], scanner: BackendScanner | None = None):
    """Feed chunks; check each event's offsets inside its own `out`; return (all out, events)."""
    s = scanner or BackendScanner()
    outs: list[bytes] = []
    events: list[tuple[int, bytes, int]] = []
    for c in chunks:
        out, evs = s.feed(c)
        for t, payload, rows, start, end in evs:
            whole = out[start:end]
            assert whole[0] == t
            assert int.from_bytes(whole[1:5], "big") == end - start - 1
            assert whole[5:] == payload
            events.append((t, bytes(payload), rows))
        outs.append(out)
    return b"".join(outs), events, s


class TestBackendScanner:
    def test_whole_stream(self) -> None:
        out, events, s = scan([SERVER_STREAM])
        assert out == SERVER_STREAM
        assert events == EXPECTED_EVENTS
        assert s.rows == 3

    def test_whole_stream_out_is_the_chunk(self) -> None:
        out, _ = BackendScanner().feed(SERVER_STREAM)
        assert out is SERVER_STREAM  # not copied

    @pytest.mark.parametrize("cut", range(len(SERVER_STREAM) + 1))
    def test_split_in_two_at_every_offset(self, cut: int) -> None:
        out, events, s = scan([SERVER_STREAM[:cut], SERVER_STREAM[cut:]])
        assert out == SERVER_STREAM
        assert events == EXPECTED_EVENTS
        assert s.rows == 3

    def test_one_byte_chunks(self) -> None:
        chunks = [SERVER_STREAM[i : i + 1] for i in range(len(SERVER_STREAM))]
        out, events, s = scan(chunks)
        assert out == SERVER_STREAM
        assert events == EXPECTED_EVENTS
        assert s.rows == 3

    def test_rows_are_cumulative_across_queries(self) -> None:
        out, events, s = scan([SERVER_STREAM, SERVER_STREAM])
        assert [e[2] for e in events] == [0, 3, 3, 3, 6, 6]
        assert s.rows == 6

    def test_event_offsets_in_middle_of_chunk(self) -> None:
        s = BackendScanner()
        out, events = s.feed(SERVER_STREAM)
        c_start = sum(len(m) for m in SERVER_MSGS[:4])
        assert [(e[0], e[3], e[4]) for e in events] == [
            (ord("T"), 0, len(SERVER_MSGS[0])),
            (ord("C"), c_start, c_start + len(SERVER_MSGS[4])),
            (ord("Z"), c_start + len(SERVER_MSGS[4]), len(SERVER_STREAM)),
        ]

    def test_event_offsets_after_skipped_tail(self) -> None:
        # The chunk starts with the tail of a DataRow whose head came in the previous chunk.
        big = data_row(b"x" * 1000)
        stream = big + msg("C", b"SELECT 1\x00") + msg("Z", b"I")
        s = BackendScanner()
        out1, ev1 = s.feed(stream[:100])
        assert out1 == stream[:100] and ev1 == []
        out2, ev2 = s.feed(stream[100:])
        assert out2 == stream[100:]
        assert [(t, bytes(p), r, a, b) for t, p, r, a, b in ev2] == [
            (ord("C"), b"SELECT 1\x00", 1, len(big) - 100, len(big) - 100 + 14),
            (ord("Z"), b"I", 1, len(big) - 100 + 14, len(stream) - 100),
        ]

    def test_large_data_row_is_passed_through_immediately(self) -> None:
        value = bytes(range(256)) * 4096  # 1 MiB
        big = data_row(value)
        stream = big + msg("C", b"SELECT 1\x00") + msg("Z", b"I")
        s = BackendScanner()
        step = 8192
        n_big_chunks = len(big) // step
        for i in range(n_big_chunks):
            chunk = stream[i * step : (i + 1) * step]
            out, events = s.feed(chunk)
            assert out == chunk  # forwarded, not held back
            assert events == []
        out, events, _ = scan([stream[n_big_chunks * step :]], s)
        assert out == stream[n_big_chunks * step :]
        assert events == [(ord("C"), b"SELECT 1\x00", 1), (ord("Z"), b"I", 1)]

    def test_large_copy_data_is_passed_through(self) -> None:
        big = msg("d", b"z" * 50_000)
        s = BackendScanner()
        for i in range(0, len(big), 1000):
            out, events = s.feed(big[i : i + 1000])
            assert out == big[i : i + 1000]
            assert events == []
        assert s.rows == 0  # CopyData is not a row

    def test_large_error_response_is_held_back_until_complete(self) -> None:
        err = codec.error_response("XX000", "m" * 50_000, detail="d" * 10_000)
        stream = msg("D", i16(1) + i32(1) + b"1") + err + msg("Z", b"E")
        s = BackendScanner()
        row_len = 5 + 2 + 4 + 1
        step = 1000
        chunks = [stream[i : i + step] for i in range(0, len(stream), step)]
        outs = []
        for k, chunk in enumerate(chunks):
            out, events = s.feed(chunk)
            outs.append(out)
            if k == 0:
                assert out == stream[:row_len]  # the row goes; the error's start is held
                assert events == []
            elif (k + 1) * step < row_len + len(err):
                assert out == b""
                assert events == []
            else:
                assert (k + 1) * step >= row_len + len(err)
                # The error arrives whole, together with whatever followed.
                assert out.startswith(err)
                t, payload, rows, start, end = events[0]
                assert (t, start, end) == (ord("E"), 0, len(err))
                assert codec.decode_error(payload).message == "m" * 50_000
                assert rows == 1
                break
        rest_out, rest_events, _ = scan(chunks[k + 1 :], s)
        assert b"".join(outs) + rest_out == stream

    @pytest.mark.parametrize("length", [0, 3, -1, -(2**31)])
    def test_invalid_length(self, length: int) -> None:
        with pytest.raises(ProtocolError, match=f"invalid message length {length}"):
            BackendScanner().feed(b"C" + i32(length) + b"\x00" * 8)

    def test_length_above_max_size(self) -> None:
        s = BackendScanner(max_size=100)
        with pytest.raises(ProtocolError, match="invalid message length 101"):
            s.feed(b"E" + i32(101))

    def test_invalid_length_after_split_header(self) -> None:
        s = BackendScanner()
        out, events = s.feed(SERVER_MSGS[0] + b"C\x00\x00")
        assert out == SERVER_MSGS[0]
        with pytest.raises(ProtocolError):
            s.feed(b"\x00\x02")

    def test_invalid_length_after_skipped_row(self) -> None:
        row = data_row(b"x" * 100)
        s = BackendScanner()
        s.feed(row[:50])
        with pytest.raises(ProtocolError):
            s.feed(row[50:] + b"Z" + i32(1))
