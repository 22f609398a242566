"""peerd's forwarding decisions (PROTOCOL.md 4.4-4.6), sans IO.

Data packets received from a link go through ``route_batch``: the hop
limit is checked and decremented in place, packets for this node are kept
as byte ranges for tund (one batch per tund worker, chosen by source /64),
and transit packets are grouped by the next hop the FIB names (cached per
destination /64 while every FIB prefix is at most a /64). A packet with no
route waits in a bounded queue while the router is asked for one.

Nothing here does IO: each call returns a ``Routed`` (what to hand to
tund, to which next hop, which ICMP errors to ask tund for, which routes
to ask the router for) and the service carries it out. The byte ranges
refer to the caller's buffer: use them before the buffer is reused.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from common.fib import FibReplica
from common.pending import PendingQueue
from common.wire.icmp import CODE_HOP_LIMIT, CODE_NO_ROUTE, DEST_UNREACHABLE, TIME_EXCEEDED
from common.wire.rules import DATA_PREFIX_SIZE, HOP_OFFSET, MIN_FORWARD_HOP_LIMIT, body_len

from .local_batch import MIN_PACKETS, all_local
from .packet_stats import PacketStats

Buffer = bytes | bytearray | memoryview
ROUTE_CACHE_MAX = 65_536
HEADER = DATA_PREFIX_SIZE  # common.wire.rules: body length at 5-6, hop limit at 7, dst at 24-40


@dataclass
class Routed:
    """What to do with the packets of one call."""

    local: list[tuple[int, Buffer]] = field(default_factory=list)  # (tund worker, packets back to back)
    transit: dict[str, list[Buffer]] = field(default_factory=dict)  # next hop -> packets (one batch each)
    icmp: list[tuple[Buffer, int, int]] = field(default_factory=list)  # (packet, ICMP type, code) for tund
    need_route: list[bytes] = field(default_factory=list)  # destination addresses to ask the router for

    def add_transit(self, next_hop: str, frame: Buffer) -> None:
        parts = self.transit.get(next_hop)
        if parts is None:
            self.transit[next_hop] = [frame]
        else:
            parts.append(frame)


class Forwarder:
    """FIB lookups, the route cache, hop limits and the local-delivery
    decision for one peerd."""

    def __init__(self, own_prefix: bytes, fib: FibReplica, workers: int = 1, counters: Counter[str] | None = None):
        self.own = own_prefix  # this node's /64 (8 bytes)
        self.fib = fib
        self.workers = max(1, workers)
        self.counters: Counter[str] = Counter() if counters is None else counters
        self.stats = PacketStats()
        self.pending: PendingQueue[bytes] = PendingQueue(per_subnet=100, total=10_000)
        self.cache: dict[bytes, str] = {}  # destination /64 -> next hop (link id)
        self.cacheable = True

    # --- events -----------------------------------------------------------

    def fib_changed(self, now: float | None = None) -> Routed:
        """The FIB changed: forget cached routes; queued packets whose
        destination now has a route leave."""
        self.cache.clear()
        self.cacheable = all(plen <= 64 for _, plen, _ in self.fib.entries())
        out = Routed()
        t = time.monotonic() if now is None else now
        for prefix in self.pending.subnets():
            route = self.fib.lookup(prefix + bytes(8))
            if route is not None and route.next_hop is not None:
                for frame in self.pending.pop(prefix):
                    self.forward(frame[24:40], frame, out, t)
        return out

    def links_changed(self) -> None:
        """A link went down: cached next hops may be gone."""
        self.cache.clear()

    def take_cached(self) -> list[bytes]:
        """The destination /64s in use since the last call (their routes are
        refreshed, PROTOCOL.md 4.4); the cache starts afresh."""
        used = list(self.cache)
        self.cache.clear()
        return used

    # --- packets ----------------------------------------------------------

    def count_local(self, runs: list[tuple[bytes, int, int]]) -> None:
        """Packets delivered to this node, as runs of one flow (source +
        destination, packets, body bytes): statistics and counters."""
        packets = 0
        add = self.stats.add
        for addrs, n, nbytes in runs:
            add(addrs[:16], addrs[16:], n, nbytes)
            packets += n
        self.counters["data_rx"] += packets
        self.counters["data_local"] += packets

    def route_batch(self, buf: bytearray, offsets: list[int]) -> Routed:
        """The data packets of one read, at ``offsets`` in ``buf`` (whole
        packets, already checked by the framing). Per packet only header
        bytes are read and the hop limit is decremented in place; runs of
        packets for this node stay contiguous ranges of ``buf``."""
        out = Routed()
        if not offsets:
            return out
        view = memoryview(buf)
        own = self.own
        workers = self.workers
        stats = self.stats
        counters = self.counters
        if workers == 1 and len(offsets) >= MIN_PACKETS:
            fast = all_local(buf, offsets, own)
            if fast is not None:  # every packet for this node (local_batch.py)
                ranges, runs = fast
                self.count_local(runs)
                if len(ranges) == 1:  # the usual case: straight into the ring, no join
                    out.local.append((0, view[ranges[0][0] : ranges[0][1]]))
                else:
                    out.local.append((0, b"".join([view[a:b] for a, b in ranges])))
                return out
        local: list[list[int]] = [[] for _ in range(workers)]  # per worker: start, end, start, end ...
        ranges_ = local[0]
        cache = self.cache
        slow: list[tuple[bytes, bytes]] = []
        n_local = 0
        # addresses of the current run of packets, for the statistics
        run_key = bytes(view[offsets[0] + 8 : offsets[0] + 40])
        run_n = run_b = 0
        if workers > 1:
            ranges_ = local[int.from_bytes(run_key[:8]) % workers]
        transit = out.transit
        min_hop = MIN_FORWARD_HOP_LIMIT
        for off in offsets:
            end = off + HEADER + (buf[off + 5] << 8 | buf[off + 6])
            if not buf.startswith(run_key, off + 8):
                if run_n:
                    stats.add(run_key[:16], run_key[16:], run_n, run_b)
                run_key, run_n, run_b = bytes(view[off + 8 : off + 40]), 0, 0
                if workers > 1:
                    ranges_ = local[int.from_bytes(run_key[:8]) % workers]
            run_n += 1
            run_b += end - off - HEADER
            hop = buf[off + HOP_OFFSET]
            if hop < min_hop:  # common.wire.rules.can_forward, as a local compare
                counters["data_drop_hop_limit"] += 1
                out.icmp.append((bytes(view[off:end]), TIME_EXCEEDED, CODE_HOP_LIMIT))
                continue
            buf[off + HOP_OFFSET] = hop - 1
            if buf.startswith(own, off + 24):  # for this node
                if ranges_ and ranges_[-1] == off:
                    ranges_[-1] = end
                else:
                    ranges_ += (off, end)
                n_local += 1
                continue
            next_hop = cache.get(bytes(view[off + 24 : off + 32]))
            if next_hop is None:
                slow.append((bytes(view[off + 24 : off + 40]), bytes(view[off:end])))
                continue
            parts = transit.get(next_hop)
            if parts is None:
                transit[next_hop] = [view[off:end]]
            else:
                parts.append(view[off:end])
        if run_n:
            stats.add(run_key[:16], run_key[16:], run_n, run_b)
        counters["data_rx"] += len(offsets)
        if n_local:
            counters["data_local"] += n_local
            for i, pairs in enumerate(local):
                if pairs:
                    out.local.append((i, b"".join([view[a:b] for a, b in zip(pairs[::2], pairs[1::2], strict=True)])))
        if slow:
            now = time.monotonic()
            for dst, frame in slow:
                self.forward(dst, frame, out, now)
        return out

    def forward(self, dst: bytes, frame: Buffer, out: Routed, now: float) -> None:
        """One transit packet (hop limit already decremented) to its next
        hop, or queued while the router looks for a route."""
        route = self.fib.lookup(dst)
        if route is None:
            full_before = self.pending.drops["pending_full"]
            if self.pending.push(dst[:8], bytes(frame), now):
                out.need_route.append(bytes(dst))
            elif self.pending.drops["pending_full"] != full_before:
                out.icmp.append((frame, DEST_UNREACHABLE, CODE_NO_ROUTE))
            return
        if route.next_hop is None:
            self.counters["data_drop_no_route"] += 1
            out.icmp.append((frame, DEST_UNREACHABLE, CODE_NO_ROUTE))
            return
        if self.cacheable and len(self.cache) < ROUTE_CACHE_MAX:
            self.cache[bytes(dst[:8])] = route.next_hop
        out.add_transit(route.next_hop, frame)

    def forward_blob(self, blob: Buffer, out: Routed | None = None) -> Routed:
        """Packets back to back (from tund, already counted) whose next hop
        is not a link here: one by one through the FIB."""
        out = Routed() if out is None else out
        pos, end = 0, len(blob)
        now = time.monotonic()
        while pos + HEADER <= end:
            nxt = pos + HEADER + body_len(blob, pos)
            if nxt > end:
                self.counters["data_out_malformed"] += 1
                break
            self.forward(bytes(blob[pos + 24 : pos + 40]), bytes(blob[pos:nxt]), out, now)
            pos = nxt
        return out

    def expire(self, now: float) -> None:
        """Drop queued packets that waited too long for a route."""
        self.pending.expire(now)
