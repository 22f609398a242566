"""ICMPv6 building and the out-of-band ICMP wrapper (PROTOCOL.md 4.6, 4.7)."""

from __future__ import annotations

import ipaddress
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.wire.errors import CodecError
from common.wire.icmp import (
    CODE_HOP_LIMIT,
    CODE_NO_ROUTE,
    DEST_UNREACHABLE,
    ICMP_PAYLOAD_CAP,
    OOB_HOP_LIMIT,
    TIME_EXCEEDED,
    build_icmpv6,
    icmpv6_checksum,
    oob_icmp_plaintext,
    parse_oob_icmp,
)
from common.wire.inner import INNER_OOB_ICMP, split_inner
from tests.vectors import vectors

SRC = ipaddress.IPv6Address("5ea:4578:6f:62c8::").packed
DST = ipaddress.IPv6Address("52d:dc0:ab0c:851a:6e34:e79d:1f3f:15d3").packed
ORIG_DST = ipaddress.IPv6Address("520:c662:fd00:9e92:5d99:34ed:ab8:82ab").packed


def ones_complement_checksum(data: bytes) -> int:
    """RFC 1071, written independently of the module under test (bytewise, no struct)."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return (~total) & 0xFFFF


def reference_icmpv6_checksum(src: bytes, dst: bytes, icmp: bytes) -> int:
    pseudo = src + dst + len(icmp).to_bytes(4, "big") + b"\0\0\0" + bytes([58])
    return ones_complement_checksum(pseudo + icmp)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=16, max_size=16), st.binary(min_size=16, max_size=16), st.binary(max_size=300))
def test_checksum_matches_rfc1071(src: bytes, dst: bytes, icmp: bytes) -> None:
    assert icmpv6_checksum(src, dst, icmp) == reference_icmpv6_checksum(src, dst, icmp)


def test_checksum_of_real_echo_request() -> None:
    """The echo request inside the crypto vector was checksummed by the kernel-style rule."""
    pt = bytes.fromhex(next(v for v in vectors("crypto") if "plaintext" in v["fields"])["fields"]["plaintext"])
    ip = pt[4:]
    src, dst, icmp = ip[8:24], ip[24:40], ip[40:]
    assert ip[6] == 58
    assert icmpv6_checksum(src, dst, icmp[:2] + b"\0\0" + icmp[4:]) == int.from_bytes(icmp[2:4], "big")
    assert icmpv6_checksum(src, dst, icmp) == 0


@pytest.mark.parametrize("payload_len", [0, 1, 7, 100, 1232])
def test_build_icmpv6(payload_len: int) -> None:
    payload = os.urandom(payload_len)
    pkt = build_icmpv6(SRC, DST, 17, TIME_EXCEEDED, CODE_HOP_LIMIT, payload, rest=b"\x00\x00\x05\x78")
    assert pkt[0] == 0x60 and pkt[1:4] == b"\0\0\0"  # version 6, traffic class 0, flow 0
    assert int.from_bytes(pkt[4:6], "big") == 8 + payload_len
    assert (pkt[6], pkt[7]) == (58, 17)
    assert (pkt[8:24], pkt[24:40]) == (SRC, DST)
    icmp = pkt[40:]
    assert (icmp[0], icmp[1], icmp[4:8], icmp[8:]) == (TIME_EXCEEDED, CODE_HOP_LIMIT, b"\x00\x00\x05\x78", payload)
    assert reference_icmpv6_checksum(SRC, DST, icmp) == 0


def test_oob_plaintext_layout() -> None:
    body = os.urandom(84)
    pt = oob_icmp_plaintext(SRC, DST, ORIG_DST, DEST_UNREACHABLE, CODE_NO_ROUTE, body)
    kind, payload = split_inner(pt)
    assert pt[:4] == b"\x01\x02\x00\x00" and kind == INNER_OOB_ICMP
    assert payload[:16] == ORIG_DST
    ip = payload[16:]
    assert ip[7] == OOB_HOP_LIMIT == 64
    assert (ip[8:24], ip[24:40]) == (SRC, DST)
    assert ip[40:42] == bytes((DEST_UNREACHABLE, CODE_NO_ROUTE)) and ip[44:48] == bytes(4)
    assert ip[48:] == body


@pytest.mark.parametrize(
    ("body_len", "kept"), [(0, True), (ICMP_PAYLOAD_CAP, True), (ICMP_PAYLOAD_CAP + 1, False), (1432, False)]
)
def test_oob_payload_cap(body_len: int, kept: bool) -> None:
    """Bodies longer than 1232 bytes are not quoted at all (not truncated)."""
    assert ICMP_PAYLOAD_CAP == 1280 - 48
    body = os.urandom(body_len)
    pt = oob_icmp_plaintext(SRC, DST, ORIG_DST, TIME_EXCEEDED, CODE_HOP_LIMIT, body)
    oob = parse_oob_icmp(pt[4:])
    assert oob.payload == (body if kept else b"")
    assert len(pt) - 4 <= 1280 + 16


@settings(max_examples=100, deadline=None)
@given(
    st.binary(min_size=16, max_size=16),
    st.binary(min_size=16, max_size=16),
    st.binary(min_size=16, max_size=16),
    st.sampled_from([(TIME_EXCEEDED, CODE_HOP_LIMIT), (DEST_UNREACHABLE, CODE_NO_ROUTE)]),
    st.binary(max_size=1300),
)
def test_oob_roundtrip(src: bytes, dst: bytes, orig_dst: bytes, tc: tuple[int, int], body: bytes) -> None:
    oob = parse_oob_icmp(oob_icmp_plaintext(src, dst, orig_dst, tc[0], tc[1], body)[4:])
    assert (oob.original_dst, oob.src, oob.dst) == (orig_dst, src, dst)
    assert (oob.icmp_type, oob.code, oob.rest) == (*tc, bytes(4))
    assert oob.payload == (body if len(body) <= ICMP_PAYLOAD_CAP else b"")


def _oob(payload: bytes = b"", *, version: int = 6, next_header: int = 58, plen: int | None = None) -> bytes:
    pkt = bytearray(build_icmpv6(SRC, DST, 64, TIME_EXCEEDED, 0, payload))
    pkt[0] = (version << 4) | (pkt[0] & 0x0F)
    pkt[6] = next_header
    if plen is not None:
        pkt[4:6] = plen.to_bytes(2, "big")
    return ORIG_DST + bytes(pkt)


def test_parse_bounds() -> None:
    assert len(_oob()) == 64
    assert parse_oob_icmp(_oob()).payload == b""
    assert parse_oob_icmp(_oob(bytes(1232))).payload == bytes(1232)  # 1296 bytes: the maximum
    with pytest.raises(CodecError):
        parse_oob_icmp(_oob(bytes(1233)))
    for n in range(64):
        with pytest.raises(CodecError):
            parse_oob_icmp(_oob()[:n])


@pytest.mark.parametrize(
    "raw",
    [
        _oob(b"x" * 20, version=4),
        _oob(b"x" * 20, next_header=17),
        _oob(b"x" * 20, plen=7),
        _oob(b"x" * 20, plen=29),  # overruns the packet
        _oob(b"x" * 20, plen=0xFFFF),
    ],
    ids=["ipv4", "udp", "plen_below_icmp_header", "plen_overrun", "plen_max"],
)
def test_parse_rejects(raw: bytes) -> None:
    with pytest.raises(CodecError):
        parse_oob_icmp(raw)


def test_parse_honours_payload_length() -> None:
    """Bytes after the IPv6 payload length are not part of the quoted body."""
    raw = _oob(b"abcdefgh", plen=8 + 4)
    assert parse_oob_icmp(raw).payload == b"abcd"
