"""User-space GRO (services/tund/gro.py): which segments merge, and what
the super packet looks like to the kernel."""

from __future__ import annotations

import struct

from services.tund.gro import TCP_ACK, TCP_PSH, Gro
from services.tund.tun import VNET_F_NEEDS_CSUM, VNET_GSO_TCPV6, VNET_HDR, VNET_HDR_SIZE

SRC = bytes.fromhex("04aa") + bytes(13) + b"\x01"
DST = bytes.fromhex("05bb") + bytes(13) + b"\x02"
OPTS = bytes.fromhex("0101080a0000000100000002")  # NOP NOP timestamps


def segment(seq: int, payload: bytes, flags: int = TCP_ACK, ack: int = 99, opts: bytes = OPTS, hop: int = 64) -> bytes:
    thl = 20 + len(opts)
    tcp = struct.pack("!HHIIBBHHH", 5001, 40000, seq, ack, (thl // 4) << 4, flags, 512, 0xBEEF, 0) + opts
    ip = struct.pack("!IHBB", 6 << 28, thl + len(payload), 6, hop) + SRC + DST
    return b"\x01\x00\x00\x00" + ip + tcp + payload  # a decrypted plaintext: inner header first


def joined(bufs: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(b) for b in bufs)


def test_in_order_segments_become_one_super_packet() -> None:
    g = Gro(vnet=True)
    data = bytes(range(256)) * 20
    size = 1000
    for i in range(5):
        g.add(segment(1000 + i * size, data[i * size : (i + 1) * size]), 62)
    g.add(segment(6000, data[5000:5100], flags=TCP_ACK | TCP_PSH), 62)
    (write,) = g.flush()
    out = joined(write)
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(out)
    assert (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset) == (
        VNET_F_NEEDS_CSUM,
        VNET_GSO_TCPV6,
        40 + 32,
        size,
        40,
        16,
    )
    ip = out[VNET_HDR_SIZE:]
    assert struct.unpack_from("!H", ip, 4)[0] == 32 + 5100 and ip[7] == 62
    tcp = ip[40:72]
    assert struct.unpack_from("!I", tcp, 4)[0] == 1000 and tcp[13] == TCP_ACK | TCP_PSH
    pseudo = (int.from_bytes(SRC + DST) + 32 + 5100 + 6) % 0xFFFF
    assert struct.unpack_from("!H", tcp, 16)[0] == pseudo  # CHECKSUM_PARTIAL convention
    assert ip[72:] == data[:5100]
    assert g.merged == 6


def test_gaps_flags_and_other_flows_are_not_merged() -> None:
    g = Gro(vnet=True)
    g.add(segment(0, b"a" * 100), 62)
    g.add(segment(200, b"b" * 100), 62)  # a gap: the first group closes
    g.add(segment(300, b"c" * 100, ack=7), 62)  # another ACK number
    g.add(segment(400, b"d" * 100, flags=TCP_ACK | 0x01), 62)  # FIN
    g.add(segment(0, b"e" * 100, opts=OPTS[:-1] + b"\x03"), 62)  # other timestamps
    g.add(segment(500, b""), 62)  # pure ACK
    writes = [joined(w) for w in g.flush()]
    assert len(writes) == 6
    assert all(w[:VNET_HDR_SIZE] == bytes(VNET_HDR_SIZE) for w in writes)  # all written as they came
    assert g.merged == 0


def test_larger_segment_starts_a_new_group_and_smaller_ends_one() -> None:
    g = Gro(vnet=True)
    g.add(segment(0, b"x" * 100), 62)
    g.add(segment(100, b"x" * 100), 62)
    g.add(segment(200, b"x" * 50), 62)  # shorter: last of the group
    g.add(segment(250, b"x" * 100), 62)
    g.add(segment(350, b"x" * 200), 62)  # longer than the group's size: new group
    writes = [joined(w) for w in g.flush()]
    assert [VNET_HDR.unpack_from(w)[1] for w in writes] == [VNET_GSO_TCPV6, 0, 0]
    assert len(writes[0]) == VNET_HDR_SIZE + 40 + 32 + 250


def test_different_hop_limits_do_not_merge() -> None:
    g = Gro(vnet=True)
    g.add(segment(0, b"x" * 100), 62)
    g.add(segment(100, b"x" * 100), 61)
    assert len(g.flush()) == 2


def test_without_vnet_header_every_packet_is_written_alone() -> None:
    g = Gro(vnet=False)
    for i in range(3):
        g.add(segment(i * 100, b"x" * 100), 62)
    writes = [joined(w) for w in g.flush()]
    assert len(writes) == 3 and all(w[0] >> 4 == 6 and w[7] == 62 for w in writes)
