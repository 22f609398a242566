"""TSO in user space (services/tund/gso.py): TCP super packets read from
the TUN are cut into segments exactly as the kernel would, checksums
complete, and go through the data plane like packets read one by one."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.tund.gso import SegmentError, ones_sums, split_tcp
from services.tund.tun import VNET_F_NEEDS_CSUM, VNET_GSO_TCPV6, VNET_HDR
from tests.unit.test_tund_dataplane import NOW, ident, plane, split, tun_writes

SRC = bytes.fromhex("04" + "11" * 15)
DST = bytes.fromhex("05" + "22" * 15)
FIN, PSH, ACK, CWR = 0x01, 0x08, 0x10, 0x80


def super_packet(
    payload: bytes, mss: int, seq: int = 0xFFFFFF00, flags: int = ACK | PSH, src: bytes = SRC, dst: bytes = DST
) -> bytes:
    opts = b"\x01\x01\x08\x0a" + bytes(range(8))
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 77, (32 // 4) << 4, flags, 500, 0, 0) + opts
    ip = struct.pack("!IHBB", 6 << 28, len(tcp) + len(payload), 6, 64) + src + dst
    return VNET_HDR.pack(VNET_F_NEEDS_CSUM, VNET_GSO_TCPV6, 72, mss, 40, 16) + ip + tcp + payload


def checksum_ok(ip: bytes) -> bool:
    """RFC 1071 the slow, obvious way over pseudo header + TCP segment."""
    length = struct.unpack_from("!H", ip, 4)[0]
    data = ip[8:40] + struct.pack("!IxxxB", length, 6) + ip[40 : 40 + length]
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 60000), st.sampled_from([1328, 1000, 536, 1]), st.integers(0, 2**32 - 1), st.booleans())
def test_segments_are_what_the_kernel_would_send(size: int, mss: int, seq: int, fin_cwr: bool) -> None:
    payload = os.urandom(size)
    flags = ACK | PSH | (FIN | CWR if fin_cwr else 0)
    pts = split_tcp(super_packet(payload, mss, seq, flags), 10, b"PFX!")
    assert len(pts) == -(-size // mss)
    rebuilt = b""
    for i, pt in enumerate(pts):
        assert pt[:4] == b"PFX!"
        ip = pt[4:]
        assert checksum_ok(ip), i
        assert ip[7] == 64 and ip[8:40] == SRC + DST
        tcp_flags = ip[53]
        assert bool(tcp_flags & CWR) == (fin_cwr and i == 0)
        assert bool(tcp_flags & (FIN | PSH)) == (i == len(pts) - 1)
        assert tcp_flags & ACK
        assert struct.unpack_from("!I", ip, 44)[0] == (seq + len(rebuilt)) & 0xFFFFFFFF
        assert ip[60:72] == b"\x01\x01\x08\x0a" + bytes(range(8))
        body = ip[72:]
        assert struct.unpack_from("!H", ip, 4)[0] == 32 + len(body)
        assert len(body) == mss or i == len(pts) - 1
        rebuilt += body
    assert rebuilt == payload


def test_ones_sums_odd_pieces_and_lengths() -> None:
    data = bytes(range(1, 200))  # 199 bytes
    for step in (2, 7, 10, 199, 300):
        count = -(-len(data) // step)
        sums = ones_sums(data, 0, step, count)
        for i, got in enumerate(sums):
            piece = data[i * step : (i + 1) * step]
            padded = piece + (b"\0" if len(piece) % 2 else b"")
            assert got % 0xFFFF == int.from_bytes(padded, "big") % 0xFFFF


@pytest.mark.parametrize(
    "mutate",
    [
        lambda p: p[:1] + bytes([1]) + p[2:],  # GSO_TCPV4
        lambda p: p[:16] + struct.pack("=H", 60) + p[18:],  # checksum not right after the IPv6 header
        lambda p: p[:16] + bytes([17]) + p[17:],  # UDP
        lambda p: p[:6] + struct.pack("=H", 0) + p[8:],  # segment size 0
        lambda p: p[:72],  # no payload
    ],
)
def test_what_cannot_be_cut_is_refused(mutate) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SegmentError):
        split_tcp(mutate(super_packet(os.urandom(3000), 1328)), 10, b"")


def test_a_super_packet_crosses_the_data_plane_and_is_coalesced_again() -> None:
    a, b = ident(), ident()
    sender = plane(a, (b, "peer-b"))
    receiver = plane(b, (a, "peer-a"))
    payload = os.urandom(1328 * 40 + 77)
    sender.from_tun([super_packet(payload, 1328, src=a.address.packed, dst=b.address.packed)], NOW)
    out = sender.take_out()
    packets = split(out["peer-b"])
    assert len(packets) == 41 and all(40 + len(p.body) <= 1472 for p in packets)  # the reference's wire size
    assert sender.counters["tx_sealed"] == 41 and sender.counters["tun_rx"] == 41
    blob = bytearray(out["peer-b"])
    pos = 0
    while pos < len(blob):  # what peerd does: hop limit decremented
        blob[pos + 7] -= 1
        pos += 40 + struct.unpack_from("!H", blob, pos + 5)[0]
    receiver.from_peer(bytes(blob), NOW)
    (write,) = tun_writes(receiver)
    assert write[10 + 72 :] == payload  # one super packet to the kernel again
    assert receiver.counters["rx_opened"] == 41


def test_a_super_packet_without_a_route_waits_segment_by_segment() -> None:
    a, b = ident(), ident()
    sender = plane(a)  # no route to b yet
    sender.from_tun([super_packet(os.urandom(1328 * 3), 1328, src=a.address.packed, dst=b.address.packed)], NOW)
    assert sender.counters["tx_queued_for_route"] == 3
    assert sender.need == {b.address.packed}
    assert not sender.take_out()


def test_a_malformed_super_packet_is_counted_not_sent() -> None:
    a, b = ident(), ident()
    sender = plane(a, (b, "peer-b"))
    bad = super_packet(os.urandom(3000), 1328, src=a.address.packed, dst=b.address.packed)
    bad = bad[:1] + bytes([3]) + bad[2:]  # GSO_UDP
    sender.from_tun([bad], NOW)
    assert sender.counters["tun_rx_bad_offload"] == 1
    assert not sender.take_out()
