"""The shared data-plane rules of common/wire (rules.py, checksum.py)."""

from __future__ import annotations

import ipaddress
import os
import random
import struct

import pytest

from common.wire.checksum import finish, ones_sum, ones_sums, pseudo_header_sum
from common.wire.rules import (
    DATA_PREFIX,
    OUTBOUND_HOP_LIMIT,
    OUTBOUND_OK,
    OUTBOUND_SOURCE_NOT_OVERLAY,
    OUTBOUND_TOO_BIG,
    body_len,
    can_forward,
    is_overlay_address,
    is_overlay_network,
    is_overlay_packed,
    outbound_check,
    outbound_ok,
)


def rfc1071(data: bytes) -> int:
    """The textbook fold, as a second opinion."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ipv6(src0: int, hop: int, size: int) -> bytes:
    return bytes((0x60, 0, 0, 0, 0, 0, 58, hop, src0)) + bytes(15) + bytes((4,)) + bytes(15) + bytes(size - 40)


@pytest.mark.parametrize(
    ("src0", "hop", "size", "expected"),
    [
        (4, 64, 1280, OUTBOUND_OK),
        (5, 2, 1400, OUTBOUND_OK),
        (6, 64, 100, OUTBOUND_SOURCE_NOT_OVERLAY),
        (0xFE, 0, 100, OUTBOUND_SOURCE_NOT_OVERLAY),  # source first, as 4.7 orders them
        (4, 1, 100, OUTBOUND_HOP_LIMIT),
        (4, 0, 2000, OUTBOUND_HOP_LIMIT),
        (4, 64, 1401, OUTBOUND_TOO_BIG),
    ],
)
def test_outbound_check_and_its_fast_form_agree(src0: int, hop: int, size: int, expected: int) -> None:
    for off in (0, 12):
        p = bytes(off) + ipv6(src0, hop, size)
        assert outbound_check(p, off, 1400) == expected
        assert outbound_ok(p, off, 1400) is (expected == OUTBOUND_OK)


def test_hop_limit_rule() -> None:
    assert [h for h in range(256) if can_forward(h)] == list(range(2, 256))


def test_overlay_checks_agree() -> None:
    for first in range(256):
        addr = bytes((first,)) + bytes(15)
        expected = ipaddress.IPv6Address(addr) in ipaddress.IPv6Network("400::/7")
        assert is_overlay_packed(addr) is expected
        assert is_overlay_address(ipaddress.IPv6Address(addr)) is expected
    assert not is_overlay_address(ipaddress.IPv4Address("4.0.0.1"))
    assert is_overlay_network(ipaddress.IPv6Network("500::/8"))
    assert not is_overlay_network(ipaddress.IPv6Network("400::/6"))
    assert not is_overlay_network(ipaddress.IPv4Network("4.0.0.0/8"))


def test_data_prefix_layout() -> None:
    head = DATA_PREFIX.pack(1, 0, 300, 9, b"s" * 16, b"d" * 16)
    assert len(head) == DATA_PREFIX.size == 40
    assert body_len(head, 0) == 300 and head[7] == 9 and head[8:24] == b"s" * 16


def test_checksums_agree_with_rfc1071() -> None:
    rng = random.Random(7)
    for size in [0, 1, 2, 3, 39, 40, 1279, 1280, 1500]:
        data = rng.randbytes(size)
        folded = rfc1071(data)
        assert ones_sum(data) == folded % 0xFFFF
        assert ones_sum(memoryview(data)) == folded % 0xFFFF
        for step in (1, 2, 7, 64):
            count = max(1, -(-size // step))
            sums = ones_sums(data, 0, step, count)
            pieces = [data[i : i + step] for i in range(0, size, step)] or [b""]
            assert [s % 0xFFFF for s in sums] == [rfc1071(p) % 0xFFFF for p in pieces]
    addrs = rng.randbytes(32)
    assert pseudo_header_sum(addrs, 1000, 6) == rfc1071(addrs + struct.pack("!I3xB", 1000, 6)) % 0xFFFF
    # a message carrying its checksum sums to zero
    msg = bytearray(rng.randbytes(101))
    msg[2:4] = b"\0\0"
    msg[2:4] = finish(ones_sum(msg)).to_bytes(2, "big")
    assert ones_sum(msg) == 0


def _packets(sizes: list[int]) -> list[bytes]:
    from common.wire.rules import DATA_PREFIX

    return [DATA_PREFIX.pack(1, 0, n, 64, bytes(16), bytes(16)) + os.urandom(n) for n in sizes]


@pytest.mark.parametrize("limit", [1, 40, 100, 1000, 5000, 1 << 20])
def test_split_batch_cuts_only_between_packets_and_keeps_each_piece_under_the_limit(limit: int) -> None:
    from common.wire.rules import split_batch

    rng = random.Random(limit)
    packets = _packets([rng.choice([0, 1, 60, 500, 1400, 4000]) for _ in range(300)])
    blob = b"".join(packets)
    pieces = split_batch(blob, limit)
    assert b"".join(pieces) == blob
    bounds = {0}
    for p in packets:
        bounds.add(max(bounds) + len(p))
    at = 0
    for piece in pieces:
        assert at in bounds  # every piece starts at a packet
        at += len(piece)
        one_packet = len(piece) in {len(p) for p in packets} and piece in packets
        assert len(piece) <= limit or one_packet  # over the limit only as a lone oversized packet
    if len(blob) <= limit:
        assert pieces == [blob]


def test_split_batch_keeps_a_torn_tail_with_the_last_piece() -> None:
    from common.wire.rules import split_batch

    blob = b"".join(_packets([100, 100])) + b"\x01\x00\x00"
    pieces = split_batch(blob, 150)
    assert b"".join(pieces) == blob and len(pieces) == 2
