"""peerd's sans-IO forwarder (services/peerd/forwarder.py): hop limit,
local delivery, transit grouping by next hop, the route cache, packets
waiting for a route, ICMP decisions."""

from __future__ import annotations

import struct

import pytest

from common import native
from common.fib import FibReplica
from common.wire.icmp import CODE_HOP_LIMIT, CODE_NO_ROUTE, DEST_UNREACHABLE, TIME_EXCEEDED
from services.peerd import local_batch
from services.peerd.forwarder import Forwarder

OWN = bytes.fromhex("04aa00000000000b")
NET_B = bytes.fromhex("05bb00000000000c")
NET_C = bytes.fromhex("05cc00000000000d")
NET_X = bytes.fromhex("05dd00000000000e")  # no route
SRC = bytes.fromhex("0411000000000001") + bytes(7) + b"\x01"


def addr(net: bytes, host: int = 1) -> bytes:
    return net + bytes(7) + bytes([host])


def packet(dst: bytes, hop: int = 64, body: bytes = b"x" * 20, src: bytes = SRC) -> bytes:
    return struct.pack("!BBxxxHB", 1, 0, len(body), hop) + src + dst + body


def batch(*pkts: bytes) -> tuple[bytearray, list[int]]:
    buf, offsets = bytearray(), []
    for p in pkts:
        offsets.append(len(buf))
        buf += p
    return buf, offsets


def fib(routes: dict[bytes, str | None], plen: int = 64) -> FibReplica:
    f = FibReplica()
    f.load_snapshot(
        {"epoch": 1, "seq": 0, "entries": [[net + bytes(8), plen, hop, b"k" * 32] for net, hop in routes.items()]}
    )
    return f


def forwarder(routes: dict[bytes, str | None], workers: int = 1) -> Forwarder:
    return Forwarder(OWN, fib(routes), workers)


def test_local_packets_go_to_tund_with_the_hop_limit_decremented() -> None:
    fwd = forwarder({})
    buf, offsets = batch(packet(addr(OWN), hop=10), packet(addr(OWN, 2), hop=3))
    out = fwd.route_batch(buf, offsets)
    assert len(out.local) == 1 and out.local[0][0] == 0
    blob = bytes(out.local[0][1])
    assert blob == packet(addr(OWN), hop=9) + packet(addr(OWN, 2), hop=2)
    assert not out.transit and not out.icmp
    assert fwd.counters["data_local"] == 2 and fwd.counters["data_rx"] == 2


def test_the_numpy_pass_and_the_loop_agree_on_large_local_reads() -> None:
    pkts = [packet(addr(OWN, i % 4), hop=5 + i % 3) for i in range(40)]
    fast, slow = forwarder({}), forwarder({}, workers=2)  # two workers take the per-packet loop
    buf1, off1 = batch(*pkts)
    buf2, off2 = batch(*pkts)
    out1, out2 = fast.route_batch(buf1, off1), slow.route_batch(buf2, off2)
    assert b"".join(bytes(b) for _, b in out1.local) == bytes(buf1)  # one contiguous range, in place
    assert sorted(len(b) for _, b in out2.local) == [len(bytes(buf1))]  # one source /64: one worker
    assert bytes(out2.local[0][1]) == bytes(buf1)
    assert fast.stats.to_json() == slow.stats.to_json()


def test_small_reads_take_the_kernels_pass_and_agree_with_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the native kernel even a lone packet (an idle ping) takes the C
    pass; it must decide exactly as the per-packet loop does."""
    from services.peerd import forwarder as fwd_module

    if native.kernel is None:
        pytest.skip(f"native kernel not in use: {native.REASON}")
    for n in (1, 2, 5):
        pkts = [packet(addr(OWN, i), hop=2 + i) for i in range(n)] + [packet(addr(OWN), hop=1)] * (n == 5)
        results = []
        for threshold in (1, 10_000):  # the C pass, then the loop
            monkeypatch.setattr(fwd_module, "MIN_PACKETS", threshold)
            fwd = forwarder({})
            buf, offsets = batch(*pkts)
            out = fwd.route_batch(buf, offsets)
            results.append(
                ([(w, bytes(b)) for w, b in out.local], out.icmp, dict(fwd.counters), fwd.stats.to_json(), bytes(buf))
            )
        assert results[0] == results[1]
    assert local_batch.MIN_PACKETS == 1  # what peerd runs with the kernel


def test_workers_are_chosen_by_source_subnet() -> None:
    fwd = forwarder({}, workers=2)
    src1 = (1).to_bytes(8, "big") + bytes(8)
    src2 = (2).to_bytes(8, "big") + bytes(8)
    buf, offsets = batch(packet(addr(OWN), src=src1), packet(addr(OWN), src=src2), packet(addr(OWN), src=src1))
    out = fwd.route_batch(buf, offsets)
    by_worker = {w: bytes(b) for w, b in out.local}
    assert set(by_worker) == {0, 1}
    assert len(by_worker[1]) == 2 * len(packet(addr(OWN)))  # src1 % 2 == 1: both of its packets, joined


def test_transit_packets_are_grouped_per_next_hop_and_cached() -> None:
    fwd = forwarder({NET_B: "tcp-e-1", NET_C: "quic-e-2"})
    buf, offsets = batch(packet(addr(NET_B)), packet(addr(NET_C)), packet(addr(NET_B, 7)))
    out = fwd.route_batch(buf, offsets)
    assert set(out.transit) == {"tcp-e-1", "quic-e-2"}
    assert [bytes(p)[7] for p in out.transit["tcp-e-1"]] == [63, 63]
    assert fwd.cache == {NET_B: "tcp-e-1", NET_C: "quic-e-2"}
    # the next read takes the cached path: views into the new buffer, same grouping
    buf2, offsets2 = batch(packet(addr(NET_B)), packet(addr(NET_C)))
    out2 = fwd.route_batch(buf2, offsets2)
    assert {k: len(v) for k, v in out2.transit.items()} == {"tcp-e-1": 1, "quic-e-2": 1}
    assert isinstance(out2.transit["tcp-e-1"][0], memoryview)


def test_route_cache_is_dropped_on_fib_and_link_changes() -> None:
    fwd = forwarder({NET_B: "tcp-e-1"})
    fwd.route_batch(*batch(packet(addr(NET_B))))
    assert fwd.cache
    fwd.links_changed()
    assert not fwd.cache
    fwd.route_batch(*batch(packet(addr(NET_B))))
    fwd.fib.apply_delta({"epoch": 1, "seq": 1, "set": [[NET_B + bytes(8), 64, "tcp-e-9", b"k" * 32]]})
    fwd.fib_changed()
    out = fwd.route_batch(*batch(packet(addr(NET_B))))
    assert set(out.transit) == {"tcp-e-9"}


def test_no_cache_while_the_fib_has_longer_prefixes() -> None:
    f = fib({NET_B: "tcp-e-1"})
    f.apply_delta({"epoch": 1, "seq": 1, "set": [[addr(NET_B, 5), 128, "tcp-e-2", b"k" * 32]]})
    fwd = Forwarder(OWN, f)
    fwd.fib_changed()
    out = fwd.route_batch(*batch(packet(addr(NET_B, 5)), packet(addr(NET_B, 6))))
    assert {k: len(v) for k, v in out.transit.items()} == {"tcp-e-2": 1, "tcp-e-1": 1}
    assert not fwd.cache


def test_hop_limit_expiry_asks_for_time_exceeded() -> None:
    fwd = forwarder({NET_B: "tcp-e-1"})
    out = fwd.route_batch(*batch(packet(addr(NET_B), hop=1), packet(addr(OWN), hop=0), packet(addr(NET_B), hop=2)))
    assert [(t, c) for _, t, c in out.icmp] == [(TIME_EXCEEDED, CODE_HOP_LIMIT)] * 2
    assert bytes(out.icmp[0][0]) == packet(addr(NET_B), hop=1)  # as received
    assert {k: len(v) for k, v in out.transit.items()} == {"tcp-e-1": 1}
    assert not out.local and fwd.counters["data_drop_hop_limit"] == 2


def test_unknown_destination_waits_for_a_route_then_leaves() -> None:
    fwd = forwarder({NET_B: "tcp-e-1"})
    out = fwd.route_batch(*batch(packet(addr(NET_X)), packet(addr(NET_X, 2))))
    assert out.need_route == [addr(NET_X)] and not out.transit  # asked once per subnet
    assert len(fwd.pending) == 2
    fwd.fib.apply_delta({"epoch": 1, "seq": 1, "set": [[NET_X + bytes(8), 64, "tcp-e-3", b"k" * 32]]})
    released = fwd.fib_changed()
    assert [bytes(p)[7] for p in released.transit["tcp-e-3"]] == [63, 63]
    assert len(fwd.pending) == 0


def test_known_subnet_without_a_route_is_unreachable() -> None:
    fwd = forwarder({NET_B: None})
    out = fwd.route_batch(*batch(packet(addr(NET_B))))
    assert [(t, c) for _, t, c in out.icmp] == [(DEST_UNREACHABLE, CODE_NO_ROUTE)]
    assert fwd.counters["data_drop_no_route"] == 1


def test_pending_queue_is_bounded_per_subnet() -> None:
    fwd = forwarder({})
    pkts = [packet(addr(NET_X, i % 250)) for i in range(150)]
    out = fwd.route_batch(*batch(*pkts))
    assert len(fwd.pending) == 100  # per-subnet cap
    assert len(out.need_route) == 1 and len(out.icmp) == 50  # the overflow is answered unreachable


def test_forward_blob_walks_packets_and_stops_at_a_truncated_one() -> None:
    fwd = forwarder({NET_B: "tcp-e-1"})
    blob = packet(addr(NET_B)) + packet(addr(NET_B, 3)) + packet(addr(NET_B))[:-5]
    out = fwd.forward_blob(blob)
    assert len(out.transit["tcp-e-1"]) == 2
    assert fwd.counters["data_out_malformed"] == 1


def test_take_cached_lists_routes_in_use_and_starts_afresh() -> None:
    fwd = forwarder({NET_B: "tcp-e-1", NET_C: "tcp-e-1"})
    fwd.route_batch(*batch(packet(addr(NET_B)), packet(addr(NET_C))))
    assert sorted(fwd.take_cached()) == sorted([NET_B, NET_C])
    assert fwd.take_cached() == []
