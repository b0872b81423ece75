"""The wire codec under random and mutated input (issue 14): it answers ProtocolError or a message, nothing else.

No sockets. Hypothesis generates byte strings, mutates valid messages and chunks streams arbitrarily; any
other exception (IndexError, struct.error, UnicodeDecodeError, ...) would become a traceback in the proxy.
Bounded: a few hundred examples per property, a few seconds in all.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.wire import codec
from proxy.wire.codec import BackendScanner, MessageReader, ProtocolError, StartupReader

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VALID = [
    codec.query_message("SELECT 1"),
    b"P" + struct.pack("!i", 4 + 15) + b"s1\x00SELECT $1\x00" + struct.pack("!hI", 1, 23),
    b"B" + struct.pack("!i", 4 + 16) + b"\x00s1\x00" + struct.pack("!hhh", 0, 1, 1)[:4] + struct.pack("!i", 1)
    + b"7" + struct.pack("!h", 0),
    b"D" + struct.pack("!i", 4 + 2) + b"P\x00",
    b"E" + struct.pack("!i", 4 + 5) + b"\x00" + struct.pack("!i", 0),
    b"C" + struct.pack("!i", 4 + 4) + b"Ss1\x00",
    b"S" + struct.pack("!i", 4),
]
DECODERS = [codec.decode_query, codec.decode_parse, codec.decode_bind, codec.decode_execute, codec.decode_describe,
            codec.decode_close, codec.decode_error, codec.decode_parameter_status, codec.decode_command_tag,
            codec.decode_ready, codec.decode_backend_key, codec.decode_auth, codec.bind_names]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid message with bytes flipped, cut, inserted, or its length field rewritten."""
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "cut", "insert", "length"]))
        if how == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        elif how == "cut" and data:
            del data[draw(st.integers(0, len(data) - 1)):]
        elif how == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(max_size=8))
        elif how == "length" and len(data) >= 5:
            data[1:5] = struct.pack("!i", draw(st.integers(-2**31, 2**31 - 1)))
    return bytes(data)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return out


@FUZZ
@given(st.lists(st.one_of(mutated(), st.binary(max_size=40)), max_size=6), st.lists(st.integers(0, 500), max_size=5))
def test_message_reader_raises_only_protocol_errors(parts: list[bytes], cuts: list[int]) -> None:
    reader = MessageReader(max_size=1 << 16)
    stream = b"".join(parts)
    try:
        for chunk in _chunks(stream, cuts):
            for t, payload in reader.feed(chunk):
                assert 0 <= t <= 255 and len(payload) <= 1 << 16
                for decode in DECODERS:
                    try:
                        decode(payload)
                    except ProtocolError:
                        pass
            assert reader.buffered <= (1 << 16) + 5  # never holds more than one message can claim
    except ProtocolError:
        pass


@FUZZ
@given(st.binary(max_size=300))
def test_payload_decoders_raise_only_protocol_errors(payload: bytes) -> None:
    for decode in DECODERS:
        try:
            decode(payload)
        except ProtocolError:
            pass


@FUZZ
@given(st.one_of(mutated(), st.binary(max_size=300)), st.lists(st.integers(0, 400), max_size=4))
def test_backend_scanner_raises_only_protocol_errors(data: bytes, cuts: list[int]) -> None:
    scanner = BackendScanner(max_size=1 << 16)
    try:
        for chunk in _chunks(data, cuts):
            out, events = scanner.feed(chunk)
            for _t, payload, _rows, start, end in events:
                assert out[start + 5:end] == payload
    except ProtocolError:
        pass


@FUZZ
@given(st.binary(max_size=200), st.lists(st.integers(0, 250), max_size=3))
def test_startup_reader_raises_only_protocol_errors(data: bytes, cuts: list[int]) -> None:
    r = StartupReader()
    try:
        for chunk in _chunks(struct.pack("!i", len(data) + 4) + data, cuts):
            r.feed(chunk)
            r.next()
    except ProtocolError:
        pass
