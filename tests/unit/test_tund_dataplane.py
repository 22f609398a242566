"""tund's packet logic (services/tund/dataplane.py) without IO: two or
three nodes' DataPlanes wired together by hand, a FIB each."""

from __future__ import annotations

import os
import struct

import pytest

from common.crypto import SessionKey, shared_secret
from common.fib import FibReplica
from common.identity import Identity
from common.wire.icmp import build_icmpv6, icmpv6_checksum
from common.wire.inner import L3_HEADER, MESSAGE_HEADER
from common.wire.packet import DataPacket
from services.tund.dataplane import DataPlane, KeyCache, RateLimit, finish_checksum
from services.tund.tun import VNET_HDR_SIZE

NOW = 1000.0


def ident() -> Identity:
    return Identity.from_secret(os.urandom(32))


def fib_with(*routes: tuple[Identity, str | None]) -> FibReplica:
    fib = FibReplica()
    entries = [[r.address.packed[:8] + bytes(8), 64, hop, r.public_key] for r, hop in routes]
    fib.load_snapshot({"epoch": 1, "seq": 0, "entries": entries})
    return fib


def plane(me: Identity, *routes: tuple[Identity, str | None], vnet: bool = True, tun: bool = True) -> DataPlane:
    return DataPlane(me, fib_with(*routes), KeyCache(me.private_key), tun=tun, vnet=vnet)


def echo(src: Identity | bytes, dst: Identity | bytes, hop: int = 64, size: int = 56) -> bytes:
    s = src if isinstance(src, bytes) else src.address.packed
    d = dst if isinstance(dst, bytes) else dst.address.packed
    return build_icmpv6(s, d, hop, 128, 0, struct.pack("!HH", 7, 1) + bytes(size))


def from_tun(dp: DataPlane, pkt: bytes) -> None:
    dp.from_tun([bytes(VNET_HDR_SIZE) + pkt if dp.vnet else pkt], NOW)


def split(blob: bytes | bytearray) -> list[DataPacket]:
    out, pos = [], 0
    while pos < len(blob):
        n = struct.unpack_from("!H", blob, pos + 5)[0]
        out.append(
            DataPacket(
                bytes(blob[pos + 8 : pos + 24]),
                bytes(blob[pos + 24 : pos + 40]),
                blob[pos + 7],
                bytes(blob[pos + 40 : pos + 40 + n]),
            )
        )
        pos += 40 + n
    return out


def tun_writes(dp: DataPlane) -> list[bytes]:
    return [b"".join(bytes(b) for b in bufs) for bufs in dp.gro.flush()]


def test_tun_packet_is_sealed_for_the_destination_and_grouped_by_next_hop() -> None:
    a, b, c = ident(), ident(), ident()
    dp = plane(a, (b, "peer-b"), (c, "peer-c"))
    pkts = [echo(a, b), echo(a, c), echo(a, b, hop=9)]
    dp.from_tun([bytes(VNET_HDR_SIZE) + p for p in pkts], NOW)
    out = dp.take_out()
    assert set(out) == {"peer-b", "peer-c"}
    to_b = split(out["peer-b"])
    assert [p.hop_limit for p in to_b] == [63, 8]  # the local forwarding step decrements (4.4)
    key_ab = SessionKey(shared_secret(b.private_key, a.public_key))
    assert key_ab.open(to_b[0].body) == L3_HEADER + pkts[0]
    assert (to_b[0].src, to_b[0].dst) == (a.address.packed, b.address.packed)
    assert len(to_b[0].body) == 4 + len(pkts[0]) + 16 + 12
    assert dp.counters["tx_sealed"] == 3


def test_received_packet_is_decrypted_and_written_with_its_hop_limit() -> None:
    a, b = ident(), ident()
    sender, receiver = plane(a, (b, "p")), plane(b, (a, "q"))
    from_tun(sender, echo(a, b, hop=64))
    frame = bytearray(sender.take_out()["p"])
    frame[7] -= 1  # what the receiving peerd does
    receiver.from_peer(bytes(frame), NOW)
    (written,) = tun_writes(receiver)
    assert written[:VNET_HDR_SIZE] == bytes(VNET_HDR_SIZE)
    ip = written[VNET_HDR_SIZE:]
    assert ip[7] == 62 and ip[:7] == echo(a, b)[:7] and ip[8:] == echo(a, b)[8:]


def test_without_vnet_header_packets_are_plain() -> None:
    a, b = ident(), ident()
    sender, receiver = plane(a, (b, "p"), vnet=False), plane(b, (a, "q"), vnet=False)
    from_tun(sender, echo(a, b))
    receiver.from_peer(bytes(sender.take_out()["p"]), NOW)
    (written,) = tun_writes(receiver)
    assert written[8:] == echo(a, b)[8:] and written[7] == 63


def test_tampered_wrong_key_and_spoofed_packets_are_dropped_and_counted() -> None:
    a, b, c = ident(), ident(), ident()
    receiver = plane(c, (a, "pa"), (b, "pb"))
    key_bc = SessionKey(shared_secret(b.private_key, c.public_key))
    src, dst = b.address.packed, c.address.packed
    tampered = bytearray(key_bc.seal(L3_HEADER + echo(b, c)))
    tampered[3] ^= 0x80
    frames = [
        DataPacket(src, dst, 60, bytes(tampered)).encode(),
        DataPacket(src, dst, 60, SessionKey(os.urandom(32)).seal(L3_HEADER + echo(b, c))).encode(),
        DataPacket(src, dst, 60, key_bc.seal(L3_HEADER + echo(a, c))).encode(),  # B's key, A's address inside
        DataPacket(src, dst, 60, bytes(20)).encode(),  # too short to be sealed
    ]
    receiver.from_peer(b"".join(frames), NOW)
    assert receiver.counters["rx_decrypt_failed"] == 3
    assert receiver.counters["rx_spoofed_source"] == 1
    assert tun_writes(receiver) == []


def test_unknown_source_waits_for_its_key_then_is_delivered() -> None:
    a, b = ident(), ident()
    sender = plane(a, (b, "p"))
    receiver = DataPlane(b, FibReplica(), KeyCache(b.private_key), tun=True, vnet=True)
    receiver.fib.load_snapshot({"epoch": 1, "seq": 0, "entries": []})
    from_tun(sender, echo(a, b))
    receiver.from_peer(bytes(sender.take_out()["p"]), NOW)
    assert tun_writes(receiver) == [] and receiver.need == {a.address.packed}
    assert receiver.fib.apply_delta(
        {"epoch": 1, "seq": 1, "set": [[a.address.packed[:8] + bytes(8), 64, None, a.public_key]]}
    )
    receiver.fib_changed(NOW)  # a route entry without next hop still gives the key (4.5)
    assert len(tun_writes(receiver)) == 1


def test_no_route_queues_asks_the_router_and_sends_when_the_route_appears() -> None:
    a, b = ident(), ident()
    dp = DataPlane(a, FibReplica(), KeyCache(a.private_key), tun=True, vnet=True)
    dp.fib.load_snapshot({"epoch": 1, "seq": 0, "entries": []})
    from_tun(dp, echo(a, b))
    from_tun(dp, echo(a, b))
    assert dp.out == {} and dp.need == {b.address.packed}
    assert dp.counters["tx_queued_for_route"] == 2
    dp.fib.apply_delta({"epoch": 1, "seq": 1, "set": [[b.address.packed[:8] + bytes(8), 64, "peer", b.public_key]]})
    dp.fib_changed(NOW)
    assert len(split(dp.take_out()["peer"])) == 2


def test_route_query_timeout_answers_no_route_on_the_tun() -> None:
    a, b = ident(), ident()
    dp = plane(a, (b, None))  # known subnet, no selected route
    from_tun(dp, echo(a, b, hop=33))
    assert dp.out == {} and dp.need == {b.address.packed}
    dp.tick(NOW + 16)
    (written,) = tun_writes(dp)
    ip = written[VNET_HDR_SIZE:]
    assert ip[40:42] == bytes([1, 0])  # destination unreachable, no route
    assert ip[8:24] == ip[24:40] == a.address.packed and ip[7] == 33  # the reference's src -> src (4.7)
    assert ip[48:] == echo(a, b, hop=33)


@pytest.mark.parametrize(
    ("make", "expect", "from_node"),
    [
        (lambda a, b: echo(a, a.address.packed[:8] + bytes(7) + b"\x09"), (1, 3), True),  # own /64, not the kernel's
        (lambda a, b: echo(bytes.fromhex("fd00") + bytes(14), b), (1, 5), True),  # source outside 400::/7
        (lambda a, b: echo(a, b, hop=1), (3, 0), False),  # hop limit exceeded
        (lambda a, b: echo(a, b, size=1400), (2, 0), True),  # larger than the 1400-byte MTU
    ],
)
def test_host_local_icmp(make, expect, from_node) -> None:  # type: ignore[no-untyped-def]
    a, b = ident(), ident()
    dp = plane(a, (b, "p"))
    pkt = make(a, b)
    from_tun(dp, pkt)
    assert dp.out == {}
    (written,) = tun_writes(dp)
    ip = written[VNET_HDR_SIZE:]
    assert (ip[40], ip[41]) == expect
    assert ip[24:40] == pkt[8:24]
    assert ip[8:24] == (a.address.packed if from_node else pkt[8:24])
    assert icmpv6_checksum(ip[8:24], ip[24:40], ip[40:]) == 0
    if expect == (2, 0):
        assert struct.unpack_from("!I", ip, 44)[0] == 1400


def test_out_of_band_time_exceeded_reaches_the_source_as_icmp() -> None:
    s, n, d = ident(), ident(), ident()
    src_plane = plane(s, (d, "to-n"), (n, "to-n"))
    mid = plane(n, (s, "to-s"), (d, "to-d"), tun=False)
    from_tun(src_plane, echo(s, d, hop=2))
    (frame,) = split(src_plane.take_out()["to-n"])
    assert frame.hop_limit == 1  # B would refuse to forward it: peerd asks tund for an OOB ICMP
    mid.oob_icmp(frame.encode(), 3, 0, NOW)
    (oob,) = split(mid.take_out()["to-s"])
    assert oob.src == n.address.packed[:8] + bytes(8) and oob.dst == s.address.packed and oob.hop_limit == 63
    src_plane.gro.flush()
    src_plane.from_peer(DataPacket(oob.src, oob.dst, 62, oob.body).encode(), NOW)
    (written,) = tun_writes(src_plane)
    ip = written[VNET_HDR_SIZE:]
    assert (ip[40], ip[41]) == (3, 0) and ip[8:24] == oob.src and ip[24:40] == s.address.packed and ip[7] == 62
    assert ip[48:] == echo(s, d, hop=2)  # the original packet, decrypted by its sender
    assert icmpv6_checksum(ip[8:24], ip[24:40], ip[40:]) == 0


def test_message_packets_go_to_msgbus_both_ways() -> None:
    a, b = ident(), ident()
    sender, receiver = plane(a, (b, "p")), plane(b, (a, "q"))
    body = MESSAGE_HEADER + b"\x00" * 12 + b"hello"
    sender.send_message(b.address.packed, body, NOW)
    (pkt,) = split(sender.take_out()["p"])
    assert pkt.hop_limit == 63
    receiver.from_peer(pkt.encode(), NOW)
    assert receiver.messages == [(a.address.packed, b.address.packed, body)]
    assert tun_writes(receiver) == []


def test_no_tun_mode_counts_l3_and_never_writes() -> None:
    a, b = ident(), ident()
    sender, receiver = plane(a, (b, "p")), plane(b, (a, "q"), tun=False)
    from_tun(sender, echo(a, b))
    receiver.from_peer(bytes(sender.take_out()["p"]), NOW)
    assert receiver.counters["rx_l3_no_tun"] == 1 and tun_writes(receiver) == []


def test_routes_in_use_are_refreshed() -> None:
    a, b = ident(), ident()
    dp = plane(a, (b, "p"))
    from_tun(dp, echo(a, b))
    dp.need.clear()
    dp.tick(NOW)
    assert dp.need == {b.address.packed[:8] + bytes(8)} and not dp.routes


def test_key_cache_is_bounded() -> None:
    me = ident()
    cache = KeyCache(me.private_key, size=3)
    keys = [ident().public_key for _ in range(5)]
    for k in keys:
        cache.get(k)
    assert len(cache) == 3


def test_rate_limit() -> None:
    r = RateLimit(10)
    assert sum(r.allow(0.0) for _ in range(50)) == 10
    assert sum(r.allow(0.5) for _ in range(50)) == 5


def test_finish_checksum_completes_a_partial_checksum() -> None:
    a, b = ident(), ident()
    full = echo(a, b)
    partial = bytearray(full)
    partial[42:44] = b"\0\0"
    # checksum field = folded pseudo-header sum, as the kernel leaves it
    ph = int.from_bytes(full[8:40]) + len(full) - 40 + 58
    ph = (ph % 0xFFFF) or 0xFFFF
    partial[42:44] = ph.to_bytes(2, "big")
    vnet = struct.pack("=BBHHHH", 1, 0, 0, 0, 40, 2)
    fixed = finish_checksum(vnet + bytes(partial), VNET_HDR_SIZE)
    assert fixed[VNET_HDR_SIZE:] == full
