"""Property tests for the wire codecs.

Two families: every value we can encode decodes back to itself, and every
byte string a peer can send either decodes or raises ``CodecError`` (the
one exception receive loops catch) -- never anything else, never an
unbounded buffer.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from common.crypto import DecryptError, SessionKey
from common.wire.beacon import MAGIC, Beacon
from common.wire.errors import CodecError
from common.wire.icmp import parse_oob_icmp
from common.wire.inner import split_inner
from common.wire.message import (
    Abort,
    Chunk,
    ChunkAck,
    Done,
    DoneAck,
    Init,
    InitAck,
    Read,
    ReadAck,
    decode_message,
    encode_message,
)
from common.wire.packet import (
    MAX_DATA_BODY,
    MAX_PACKET_SIZE,
    ControlPacket,
    DataPacket,
    Packet,
    StreamDecoder,
    decode_packet,
)
from common.wire.subnet import Subnet
from common.wire.tlv import Hello, Ihu, RouteRequest, SeqNoRequest, Tlv, Update, decode_tlv

# CODEC_FUZZ_SCALE=50 turns the suite into a long fuzzing run; the default keeps it to a few seconds.
_SCALE = float(os.environ.get("CODEC_FUZZ_SCALE", "1"))
FAST = settings(max_examples=int(150 * _SCALE), deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=int(400 * _SCALE), deadline=None, suppress_health_check=[HealthCheck.too_slow])

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u64 = st.integers(0, (1 << 64) - 1)
router_ids = st.binary(min_size=40, max_size=40)
addr16 = st.binary(min_size=16, max_size=16)
ipv4 = st.builds(ipaddress.IPv4Address, st.integers(0, (1 << 32) - 1))
ipv6 = st.builds(ipaddress.IPv6Address, st.integers(0, (1 << 128) - 1))


@st.composite
def subnets(draw: st.DrawFn) -> Subnet:
    if draw(st.booleans()):
        return Subnet(draw(ipv6), draw(st.integers(0, 128)))
    return Subnet(draw(ipv4), draw(st.integers(0, 32)))


hellos = st.builds(Hello, st.sampled_from([0, 0x8000]), u16, u16)
ihus = st.builds(Ihu, u16, u16, st.none() | ipv4 | ipv6)
updates = st.builds(Update, st.sampled_from([0, 0x40, 0x80, 0xC0]), u16, u16, u16, subnets(), router_ids)
route_requests = st.builds(RouteRequest, u8, st.none() | subnets())
seqno_requests = st.builds(SeqNoRequest, u16, st.integers(1, 255), router_ids, subnets())
tlvs = st.one_of(hellos, ihus, updates, route_requests, seqno_requests)

data_packets = st.builds(DataPacket, addr16, addr16, u8, st.binary(max_size=1600))
control_packets = st.builds(ControlPacket, tlvs)
packets = st.one_of(data_packets, control_packets)

mids = st.binary(min_size=8, max_size=8)
messages = st.one_of(
    st.builds(Init, mids, u64, st.binary(max_size=255), st.booleans(), u16),
    st.builds(InitAck, mids, u64, u8, st.booleans(), u16),
    st.builds(Chunk, mids, u64, u64, u64, st.binary(max_size=1400), u16),
    st.builds(ChunkAck, mids, u64, u64, u64, u16),
    st.builds(Done, mids, u64, st.binary(min_size=32, max_size=32), u16),
    st.builds(DoneAck, mids, u64, st.binary(min_size=32, max_size=32), u16),
    st.builds(Read, mids, u16),
    st.builds(ReadAck, mids, u16),
    st.builds(Abort, mids, u16),
)


def _assert_same_subnet_bytes(a: Tlv, b: Tlv) -> None:
    """Subnet equality ignores host bits; the wire does not (for the prefix bytes)."""
    sa, sb = getattr(a, "subnet", None), getattr(b, "subnet", None)
    if sa is None:
        assert sb is None
        return
    n = (sa.prefix_len + 7) // 8
    assert sb.address.packed[:n] == sa.address.packed[:n]
    assert not any(sb.address.packed[n:])


# --------------------------------------------------------------------------- round trips


@FAST
@given(tlvs)
def test_tlv_roundtrip(tlv: Tlv) -> None:
    body = tlv.encode_body()
    decoded = decode_tlv(tlv.TYPE, body)
    assert decoded == tlv
    _assert_same_subnet_bytes(tlv, decoded)
    assert decoded.encode_body() == body


@FAST
@given(tlvs, st.binary(min_size=1, max_size=8))
def test_tlv_trailing_bytes_ignored(tlv: Tlv, extra: bytes) -> None:
    assert decode_tlv(tlv.TYPE, tlv.encode_body() + extra) == tlv


@FAST
@given(tlvs)
def test_tlv_truncation_rejected(tlv: Tlv) -> None:
    body = tlv.encode_body()
    for cut in range(len(body)):
        with pytest.raises(CodecError):
            decode_tlv(tlv.TYPE, body[:cut])


@FAST
@given(packets)
def test_packet_roundtrip(pkt: Packet) -> None:
    frame = pkt.encode()
    assert decode_packet(frame) == pkt
    assert decode_packet(frame).encode() == frame


@FAST
@given(messages)
def test_message_roundtrip(msg: Any) -> None:
    raw = encode_message(msg)
    assert decode_message(raw) == msg
    assert encode_message(decode_message(raw)) == raw


@FAST
@given(messages)
def test_message_truncation_rejected(msg: Any) -> None:
    """A packet cut anywhere but inside CHUNK data never decodes: the INIT topic is
    length-prefixed, only chunk data may legitimately disagree with its size field."""
    raw = encode_message(msg)
    fixed = len(raw) - len(getattr(msg, "data", b""))
    for cut in range(fixed):
        with pytest.raises(CodecError):
            decode_message(raw[:cut])


@FAST
@given(u16, router_ids)
def test_beacon_roundtrip(port: int, rid: bytes) -> None:
    raw = Beacon(port, rid).encode()
    assert len(raw) == 50
    assert Beacon.decode(raw) == Beacon(port, rid)


# --------------------------------------------------------------------------- stream decoder


@st.composite
def splits(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut at arbitrary points (empty chunks included)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def _bad_control(kind: str, body: bytes) -> bytes:
    """Well-framed control packets the decoder must skip without losing sync."""
    if kind == "magic":
        babel = bytes((43, 3)) + len(body).to_bytes(2, "big") + body
    elif kind == "tlv_type":
        babel = bytes((42, 3)) + (len(body) + 2).to_bytes(2, "big") + bytes((77, len(body))) + body
    else:  # TLV length overruns the babel body
        babel = bytes((42, 3)) + (2).to_bytes(2, "big") + bytes((4, 6))
    return bytes((1, 1, 0, 0)) + babel


stream_items = st.one_of(
    packets.map(lambda p: (p, p.encode())),
    st.tuples(st.sampled_from(["magic", "tlv_type", "overrun"]), st.binary(max_size=20)).map(
        lambda kb: (None, _bad_control(*kb))
    ),
)


def _feed_all(chunks: list[bytes]) -> tuple[list[Packet], int]:
    dec = StreamDecoder()
    out: list[Packet] = []
    for chunk in chunks:
        out += dec.feed(chunk)
        assert dec.buffered < MAX_PACKET_SIZE
    assert dec.buffered == 0
    return out, sum(dec.drops.values())


@FAST
@given(st.data(), st.lists(stream_items, max_size=8))
def test_stream_split_anywhere(data: st.DataObject, items: list[tuple[Packet | None, bytes]]) -> None:
    stream = b"".join(raw for _, raw in items)
    expected = [p for p, _ in items if p is not None]
    whole, whole_drops = _feed_all([stream])
    assert whole == expected
    assert whole_drops == len(items) - len(expected)
    split, split_drops = _feed_all(data.draw(splits(stream)))
    assert split == expected and split_drops == whole_drops
    byte_by_byte, _ = _feed_all([stream[i : i + 1] for i in range(len(stream))]) if len(stream) < 600 else (whole, 0)
    assert byte_by_byte == expected


# Mostly-valid prefixes make random input get past the first byte checks.
noisy_streams = st.lists(
    st.one_of(
        st.binary(max_size=64),
        packets.map(lambda p: p.encode()),
        st.binary(max_size=60).map(lambda b: b"\x01\x00" + b),
        st.binary(max_size=60).map(lambda b: b"\x01\x01\x00\x00\x2a\x03" + b),
        st.binary(max_size=60).map(lambda b: b"\x01\x01\x00\x00" + b),
    ),
    max_size=6,
).map(b"".join)


@FUZZ
@given(st.data(), noisy_streams)
def test_stream_arbitrary_bytes(data: st.DataObject, stream: bytes) -> None:
    dec = StreamDecoder()
    for chunk in data.draw(splits(stream)):
        try:
            out = dec.feed(chunk)
        except CodecError:
            assert dec.buffered == 0  # a fatal error leaves nothing half-parsed behind
            continue
        assert all(isinstance(p, (DataPacket, ControlPacket)) for p in out)
        assert dec.buffered < MAX_PACKET_SIZE


def test_stream_buffer_bounded_by_one_packet() -> None:
    """A peer announcing a maximum-size body makes us hold at most that one packet."""
    frame = DataPacket(bytes(16), bytes(16), 1, bytes(MAX_DATA_BODY)).encode()
    assert len(frame) == MAX_PACKET_SIZE
    dec = StreamDecoder()
    chunk = 4096
    got: list[Packet] = []
    for i in range(0, len(frame) * 2, chunk):
        got += dec.feed((frame * 2)[i : i + chunk])
        assert dec.buffered < MAX_PACKET_SIZE
    assert len(got) == 2 and dec.buffered == 0


@FAST
@given(st.lists(packets, min_size=1, max_size=5), st.integers(1, 3000), st.sampled_from(["bytearray", "memoryview"]))
def test_stream_never_aliases_caller_buffer(items: list[Packet], read_size: int, kind: str) -> None:
    """Readers reuse one receive buffer (recv_into); packets and the pending tail must
    be copies, so overwriting the buffer after feed() changes nothing already decoded."""
    stream = b"".join(p.encode() for p in items)
    recv_buf = bytearray(read_size)
    dec = StreamDecoder()
    out: list[Packet] = []
    for i in range(0, len(stream), read_size):
        n = len(stream[i : i + read_size])
        recv_buf[:n] = stream[i : i + read_size]
        view = memoryview(recv_buf)[:n]
        out += dec.feed(view if kind == "memoryview" else recv_buf[:n] if n < read_size else recv_buf)
        view.release()
        recv_buf[:] = b"\xee" * read_size  # scribble over it
    assert out == items
    assert all(type(p.body) is bytes for p in out if isinstance(p, DataPacket))


def test_data_packet_is_a_frozen_dataclass() -> None:
    p = DataPacket(src=bytes(16), dst=b"\x01" * 16, hop_limit=64, body=b"x")
    same = DataPacket(bytes(16), b"\x01" * 16, 64, b"x")
    assert p == same and hash(p) == hash(same)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.hop_limit = 3  # type: ignore[misc]
    q = dataclasses.replace(p, hop_limit=63)
    assert (q.hop_limit, q.body, p.hop_limit) == (63, b"x", 64)
    assert [f.name for f in dataclasses.fields(p)] == ["src", "dst", "hop_limit", "body"]
    assert repr(p).startswith("DataPacket(src=")


@pytest.mark.parametrize("hop", [-1, 256, 1.5, None])
def test_data_packet_bad_hop_limit(hop: object) -> None:
    with pytest.raises(CodecError):
        DataPacket(bytes(16), bytes(16), hop, b"").encode()  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [0, 15, 17])
def test_data_packet_bad_address(size: int) -> None:
    with pytest.raises(CodecError):
        DataPacket(bytes(size), bytes(16), 1, b"").encode()
    with pytest.raises(CodecError):
        DataPacket(bytes(16), bytes(size), 1, b"").encode()


def test_data_body_size_limit() -> None:
    DataPacket(bytes(16), bytes(16), 1, bytes(MAX_DATA_BODY)).encode()
    with pytest.raises(CodecError):
        DataPacket(bytes(16), bytes(16), 1, bytes(MAX_DATA_BODY + 1)).encode()


@pytest.mark.parametrize("bad", [b"\x02\x00\x00\x00", b"\x00\x01\x00\x00", b"\x01\x02\x00\x00", b"\x01\xff\x00\x00"])
def test_stream_fatal_framing(bad: bytes) -> None:
    dec = StreamDecoder()
    with pytest.raises(CodecError):
        dec.feed(bad + bytes(60))
    assert dec.buffered == 0


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"\x01\x00\x00\x00ip", (0, b"ip")),
        (b"\x01\x01\xab\xcd", (1, b"")),  # reserved bytes are echoed by the reference, never checked
        (b"\x01\x02\x00\x00" + bytes(70), (2, bytes(70))),
    ],
)
def test_split_inner_accepts(raw: bytes, expected: tuple[int, bytes]) -> None:
    assert split_inner(raw) == expected


@pytest.mark.parametrize("raw", [b"", b"\x01\x00\x00", b"\x00\x00\x00\x00", b"\x02\x01\x00\x00", b"\x01\x03\x00\x00"])
def test_split_inner_rejects(raw: bytes) -> None:
    with pytest.raises(CodecError):
        split_inner(raw)


# --------------------------------------------------------------------------- arbitrary input


@FUZZ
@given(u8, st.binary(max_size=80))
def test_decode_tlv_arbitrary(tlv_type: int, body: bytes) -> None:
    try:
        decode_tlv(tlv_type, body)
    except CodecError:
        pass


@FUZZ
@given(st.sampled_from([4, 5, 8, 9, 10]), st.integers(0, 4), u8, st.binary(max_size=80))
def test_decode_tlv_structured(tlv_type: int, ae: int, plen: int, rest: bytes) -> None:
    """Plausible AE/plen bytes at every AE offset, so the prefix paths get exercised."""
    for body in (bytes((ae, 0, plen)) + rest, bytes((0, ae, plen)) + rest, bytes((ae, plen)) + rest):
        try:
            decode_tlv(tlv_type, body)
        except CodecError:
            pass


@FUZZ
@given(st.binary(max_size=120))
def test_decode_packet_arbitrary(raw: bytes) -> None:
    try:
        decode_packet(raw)
    except CodecError:
        pass


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=120),
        st.tuples(mids, u16, st.binary(max_size=60)).map(lambda t: t[0] + t[1].to_bytes(2, "big") + b"\0\0" + t[2]),
    )
)
def test_decode_message_arbitrary(raw: bytes) -> None:
    try:
        decode_message(raw)
    except CodecError:
        pass


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=1400),
        st.tuples(addr16, u8, u8, u16, st.binary(max_size=1300)).map(
            lambda t: t[0] + bytes((t[1], 0, 0, 0)) + t[3].to_bytes(2, "big") + bytes((58, t[2])) + bytes(32) + t[4]
        ),
    )
)
def test_parse_oob_icmp_arbitrary(raw: bytes) -> None:
    try:
        parse_oob_icmp(raw)
    except CodecError:
        pass


@FUZZ
@given(st.one_of(st.binary(max_size=60), st.binary(min_size=42, max_size=42).map(lambda b: MAGIC + b)))
def test_beacon_decode_arbitrary(raw: bytes) -> None:
    try:
        beacon = Beacon.decode(raw)
    except CodecError:
        return
    assert beacon.encode() == raw


@FUZZ
@given(st.binary(max_size=40))
def test_split_inner_arbitrary(raw: bytes) -> None:
    try:
        split_inner(raw)
    except CodecError:
        pass


@FUZZ
@given(st.text(max_size=50))
def test_subnet_parse_arbitrary(text: str) -> None:
    try:
        Subnet.parse(text)
    except CodecError:
        pass


_KEY = SessionKey(bytes(range(32)))


@FUZZ
@given(st.binary(max_size=200))
def test_open_arbitrary(body: bytes) -> None:
    with pytest.raises(DecryptError):
        _KEY.open(body)


@FAST
@given(st.binary(max_size=300), st.data())
def test_open_any_flip(plaintext: bytes, data: st.DataObject) -> None:
    """Any single-bit change anywhere in a sealed body (ciphertext, tag or nonce) is refused."""
    sealed = _KEY.seal(plaintext)
    assume(len(sealed) >= 32)
    pos = data.draw(st.integers(0, len(sealed) - 1))
    bit = data.draw(st.integers(0, 7))
    tampered = bytearray(sealed)
    tampered[pos] ^= 1 << bit
    assert _KEY.open(sealed) == plaintext
    with pytest.raises(DecryptError):
        _KEY.open(bytes(tampered))
