"""peerd's vectorized path for reads whose packets are all for this node
(services/peerd/local_batch.py), checked against a plain reading."""

from __future__ import annotations

import os
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from services.peerd.local_batch import all_local

OWN = bytes.fromhex("04aa00000000000b")
OTHER = bytes.fromhex("05bb00000000000c")


def data_packet(src: bytes, dst: bytes, hop: int, body: bytes) -> bytes:
    return struct.pack("!BBxxxHB", 1, 0, len(body), hop) + src + dst + body


def stream(specs: list[tuple[bytes, bytes, int, int]]) -> tuple[bytearray, list[int]]:
    buf, offsets = bytearray(), []
    for src, dst, hop, size in specs:
        offsets.append(len(buf))
        buf += data_packet(src, dst, hop, os.urandom(size))
    return buf, offsets


SRC_A = OTHER + bytes(7) + b"\x01"
SRC_B = bytes.fromhex("04cc") + bytes(13) + b"\x02"
ME = OWN + bytes(7) + b"\x09"


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([SRC_A, SRC_B]), st.integers(2, 255), st.integers(0, 1500)), min_size=1, max_size=60
    ),
    st.lists(st.integers(0, 59), max_size=3),
)
def test_all_local_matches_a_plain_reading(specs: list[tuple[bytes, int, int]], gaps: list[int]) -> None:
    buf, offsets = stream([(src, ME, hop, size) for src, hop, size in specs])
    # a few packets dropped from the list: what the ranges must step over (e.g. control packets)
    keep = [o for i, o in enumerate(offsets) if i not in gaps] or offsets[:1]
    before = bytes(buf)
    result = all_local(buf, keep, OWN)
    assert result is not None
    ranges, runs = result
    covered = b"".join(before[a:b] for a, b in ranges)
    expect_bytes, expect_runs = b"", []
    for off in keep:
        body = struct.unpack_from("!H", before, off + 5)[0]
        pkt = bytearray(before[off : off + 40 + body])
        pkt[7] -= 1
        expect_bytes += pkt
        addrs = bytes(pkt[8:40])
        if expect_runs and expect_runs[-1][0] == addrs:
            expect_runs[-1][1] += 1
            expect_runs[-1][2] += body
        else:
            expect_runs.append([addrs, 1, body])
        assert buf[off + 7] == before[off + 7] - 1  # decremented in place
    assert b"".join(bytes(buf[a:b]) for a, b in ranges) == expect_bytes
    assert len(covered) == len(expect_bytes)
    assert [list(r) for r in runs] == expect_runs
    # ranges are maximal: no two touch
    assert all(ranges[i][1] != ranges[i + 1][0] for i in range(len(ranges) - 1))


def test_a_transit_packet_or_an_expiring_hop_limit_leaves_the_buffer_alone() -> None:
    for odd in ((SRC_A, OTHER + bytes(8), 64, 100), (SRC_A, ME, 1, 100)):
        buf, offsets = stream([(SRC_A, ME, 64, 100)] * 20 + [odd] + [(SRC_A, ME, 64, 100)] * 5)
        before = bytes(buf)
        assert all_local(buf, offsets, OWN) is None
        assert bytes(buf) == before
