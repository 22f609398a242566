"""Sans-IO Babel routing engine, wire-compatible with Mycelium 0.7
(PROTOCOL.md sections 2.9, 5 and 6).

Shaped like aioquic's QuicConnection: a plain object fed with events
(``peer_up``, ``peer_down``, ``receive_tlv``, ``request_route``,
``handle_timer``) that queues actions (TLVs to send, FIB changes, links to
close) for the caller to drain. It owns no sockets, threads or clocks; every
input carries ``now`` (monotonic seconds), so a simulator can drive hundreds
of engines on a virtual clock.

Deliberate differences from the reference, none visible on the wire except
as ordinary, well-formed TLVs (each is marked "unlike the reference" below):

- a Hello goes out as soon as a link comes up (the reference waits for its
  global 20 s tick), so the first RTT sample arrives at once;
- fast failover: when a selected route is lost with no feasible fallback, a
  RouteRequest for the subnet goes to every remaining peer at once, and the
  loss is retried a few times (seqno request + route request at 1, 3, 7 and
  15 s) until a route is selected again; the reference never resends;
- seqno requests are answered from our table even when they duplicate one
  we forwarded earlier; duplicates are ignored for 4 s (not 60 s) and only
  while a copy is actually out along our current next hop; a request we
  cannot forward yet is parked and sent on as soon as we select a route;
  a seqno request aimed at a single peer is sent even if that peer asked us
  the same thing; an infeasible update to an unselected entry asks for a
  newer seqno when nothing is selected (as step 7 of 6.4 already does); an
  update answers every pending request for its seqno *or older* (RFC 8966),
  not only the exact one; requests driven by the data plane name the
  subnet owner's router id, not a retracting neighbour's;
- as originator, a bump refused by the 4 s rate limit is deferred, not
  dropped, and the first bump after start is not rate limited;
- route requests for prefixes no update could ever satisfy (IPv4, outside
  400::/7, shorter than /64) are dropped instead of flooded;
- every table fed by remote input has a size cap; input past the cap is
  dropped or the oldest cache entry evicted, and counted in ``counters``;
- fairness (none of it on the wire): no neighbour may hold more than half
  the routing table while another neighbour is up, and when the table is
  full a neighbour below its fair share (cap / live neighbours) takes room
  from the neighbour holding the most entries. The entries that go are the
  *newest* of the offending neighbour: a flood consists of new entries,
  while the old ones are what traffic and downstream nodes already use, so
  evicting the oldest would let a flood rotate every honest route out of the
  table (and each eviction of a selected route sends a retraction, so
  rotating would also amplify the flood). An incoming route past its
  neighbour's limit is the newest of all and is refused, unless we asked for
  that subnet (a route request of ours is outstanding): then the neighbour's
  newest entry makes room, so a node that joins after a flood is still
  reachable. Route requests forwarded and seqno requests held on a
  neighbour's behalf are limited to a fair share of their tables the same
  way (new ones refused). Everything is counted per neighbour
  (``neighbour_stats``) and in ``counters``.
"""

from __future__ import annotations

import heapq
import ipaddress
import random
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from common.identity import address_int, address_of, subnet_of
from common.wire.rules import OVERLAY_PREFIX, is_overlay_address
from common.wire.subnet import Subnet
from common.wire.tlv import (
    HELLO_UNICAST,
    Hello,
    Ihu,
    RouteRequest,
    SeqNoRequest,
    Tlv,
    Update,
)

from .caches import RouteRequestCache, SeqnoCache, SeqnoKey
from .metric import INFINITE, MAX_FINITE, metric_add, metric_sub
from .routing_table import Learned, RouteEntry, RoutingTable, SubnetRoutes
from .seqno import seqno_add, seqno_gt, seqno_lt
from .source_table import SourceKey, SourceTable, refresh_distance
from .timers import TimerQueue

# --- protocol constants (PROTOCOL.md section 10) ---------------------------
HELLO_INTERVAL = 20.0
HELLO_INTERVAL_CS = 2000
IHU_INTERVAL_CS = 6000
DEAD_PEER_THRESHOLD = 43.0
INITIAL_SMOOTHED_COST = 1000
UPDATE_INTERVAL_CS = 30_000  # advertised with every finite update (300 s)
NOT_REPEATING_INTERVAL_CS = 0  # 6 ms truncates to 0 cs
OWN_ROUTE_INTERVAL = 300.0
RETRACTED_ROUTE_HOLD = 6.0
SEQNO_BUMP_TIMEOUT = 4.0
SEQNO_REQUEST_RESEND = 4.0  # don't resend to the same targets sooner
SEQNO_DUPLICATE_WINDOW = 4.0  # incoming duplicates ignored this long (reference: 60 s)
SEQNO_CACHE_TTL = 60.0
SEQNO_REQUEST_HOP_COUNT = 64
SOURCE_ENTRY_LIFETIME = 1800.0
SOURCE_SWEEP_INTERVAL = 60.0  # expired source entries are purged by a sweep (no timer per entry)
ROUTE_QUERY_TIMEOUT = 15.0
RR_CACHE_TTL = 15.0
ROUTE_REFRESH_THRESHOLD = 15.0
MAX_RR_GENERATION = 16
RECOVERY_RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0)  # ours: re-ask for a lost route (the reference never retries)
SIGNIFICANT_METRIC_IMPROVEMENT = 10
BIG_METRIC_CHANGE = 10
PREFIX_LEN_MIN = 64

# --- local bounds on state fed by remote input ------------------------------
MAX_SUBNETS = 131_072  # subnets in the routing table (a public node carries ~100k)
MIN_FAIR_SHARE = 1_024  # a neighbour's share of a table never drops below this
MAX_EVICTION_TRIES = 8  # entries evicted at most to free one subnet slot
DEAD_PEER_SLICE = 4_096  # a dead peer's routes retracted at once; more go in handle_timer slices
MAX_QUERIED = 16_384
MAX_SOURCES = 2 * MAX_SUBNETS
MAX_SEQNO_CACHE = 16_384
MAX_RR_CACHE = 16_384
MAX_RECOVERIES = 16_384
_ADDRESS_CACHE_SIZE = 16_384  # each of the two memos below (a few MiB at most)

# Router id -> its key's overlay address as an int, and router id -> the key
# itself: memos of pure functions, shared by every engine in the process (the
# simulator runs a thousand, which all see the same few thousand router ids),
# keyed by the whole router id (no slice; a bytes object caches its hash, so an
# Update fanned out to many engines hashes it once). Cleared when full.
_ADDRESSES: dict[bytes, int] = {}
_PUBLIC_KEYS: dict[bytes, bytes] = {}


def _address_of_router(router_id: bytes) -> int:
    if len(_ADDRESSES) >= _ADDRESS_CACHE_SIZE:
        _ADDRESSES.clear()
    address = _ADDRESSES[router_id] = address_int(router_id[:32])
    return address


def _public_key_of_router(router_id: bytes) -> bytes:
    """``router_id[:32]``, one bytes object per router id rather than one per
    subnet entry (each table entry keeps its subnet's key: quirk 5)."""
    key = _PUBLIC_KEYS.get(router_id)
    if key is None:
        if len(_PUBLIC_KEYS) >= _ADDRESS_CACHE_SIZE:
            _PUBLIC_KEYS.clear()
        key = _PUBLIC_KEYS[router_id] = router_id[:32]
    return key


_TLV_NAMES = {
    Hello: "hello",
    Ihu: "ihu",
    Update: "update",
    RouteRequest: "route_request",
    SeqNoRequest: "seqno_request",
}
_RX_NAMES = {cls: f"rx_{name}" for cls, name in _TLV_NAMES.items()}
_HOT_COUNTERS = (
    ("rx_update", "_rx_updates"),
    ("tx_update", "_tx_updates"),
    ("update_infeasible", "_infeasible"),
    ("triggered_updates", "_triggered"),
)
_TX_NAMES = {cls: f"tx_{name}" for cls, name in _TLV_NAMES.items()}
# common/wire/rules' overlay prefix as a Subnet: the 6.3 filter then needs no
# network object per Update (is_overlay_network would build one).
_OVERLAY_SUBNET = Subnet(OVERLAY_PREFIX.network_address, OVERLAY_PREFIX.prefixlen)
# The same test on a subnet key (Subnet.key: network << 9 | prefix length << 1 | IPv6):
# the top OVERLAY_PREFIX.prefixlen bits of the network sit above bit 9 + 128 - prefixlen.
_OVERLAY_SHIFT = 9 + 128 - OVERLAY_PREFIX.prefixlen
_OVERLAY_TOP = _OVERLAY_SUBNET.key >> _OVERLAY_SHIFT

# Per-neighbour counters (``neighbour_stats``).
NEIGHBOUR_COUNTERS = (
    "routes_evicted",  # entries of this neighbour evicted to make room (fairness)
    "routes_refused",  # new entries refused: the neighbour was at its limit
    "route_requests_refused",  # forwarded route requests refused: its share of the query table is used
    "seqno_requests_refused",  # seqno requests refused: its share of the seqno cache is used
)


def hold_time_ms(interval_cs: int, metric: int) -> int:
    """How long a received route lives: 3.5 x its advertised interval, or 6 s
    for a retraction (PROTOCOL.md 6.4)."""
    if metric == INFINITE:
        return int(RETRACTED_ROUTE_HOLD * 1000)
    return interval_cs * 10 * 7 // 2


@dataclass(frozen=True)
class PeerInfo:
    """A link as the link layer reports it."""

    peer_id: str  # opaque unique id from the link layer, e.g. "tcp-3f2a-7"
    static_cost: int  # PROTOCOL 2.9: TCP v4 15 / v6 10, QUIC v4 12 / v6 7, vsock 5
    link_name: str = ""  # shown as Route.nextHop in the API


@dataclass(frozen=True, slots=True)
class FibEntry:
    """What the data plane needs for one destination subnet."""

    next_hop: str | None  # peer id of the selected route; None if the subnet has routes but none usable
    public_key: bytes  # key fixed when the subnet entry was created (PROTOCOL 4.5 / quirk 5)


@dataclass(frozen=True)
class FibSet:
    """Add or change the forwarding entry for ``subnet``."""

    subnet: Subnet
    entry: FibEntry


@dataclass(frozen=True)
class FibDel:
    """``subnet`` no longer has any route entries."""

    subnet: Subnet


FibChange = FibSet | FibDel


class RouteView(NamedTuple):
    """One row of the API's routes/selected and routes/fallback (a tuple:
    the API lists every route, so building rows must be cheap)."""

    subnet: Subnet
    next_hop: str  # peer id
    metric: int  # as advertised by the neighbour, without our link cost (0xFFFF = infinite)
    seqno: int
    router_id: bytes


class _Peer:
    """Per-link liveness and link-cost state (PROTOCOL.md 2.9)."""

    __slots__ = ("cost", "hello_seqno", "info", "next_hello", "smoothed", "t_hello", "t_last_heard", "t_last_ihu", "up")

    def __init__(self, info: PeerInfo, now: float) -> None:
        self.info = info
        self.hello_seqno = 0
        self.smoothed = INITIAL_SMOOTHED_COST
        self.cost = min(self.smoothed + info.static_cost, MAX_FINITE)  # link_cost, kept current (hot path)
        self.t_hello = now
        self.t_last_ihu = now
        self.t_last_heard = now  # any TLV at all (liveness under load, see _on_dead_timer)
        self.next_hello = now
        self.up = True  # False once removed (receive_tlvs checks it between TLVs)

    @property
    def link_cost(self) -> int:
        return self.cost

    def set_smoothed(self, smoothed: int) -> None:
        self.smoothed = smoothed
        self.cost = min(smoothed + self.info.static_cost, MAX_FINITE)


class RouterEngine:
    def __init__(self, public_key: bytes, router_id: bytes, now: float, *, rng: random.Random | None = None) -> None:
        if len(public_key) != 32 or len(router_id) != 40 or router_id[:32] != public_key:
            raise ValueError("router id must be the 32-byte public key followed by 8 bytes")
        self._public_key = public_key
        self._router_id = router_id
        self._address = address_of(public_key)
        self._own_subnet = subnet_of(self._address)
        self._own_key = self._own_subnet.key
        self._rng = rng or random.Random()  # for future jitter; today the engine is deterministic given its inputs
        self._seqno = 0
        self._last_bump: float | None = None
        self._bump_pending = False

        self._peers: dict[str, _Peer] = {}
        self._table = RoutingTable()
        self._sources = SourceTable(MAX_SOURCES)
        self._seqno_cache = SeqnoCache(MAX_SEQNO_CACHE)
        self._rr_cache = RouteRequestCache(MAX_RR_CACHE)
        self._timers = TimerQueue()
        # Tables are keyed by the subnet's int key (Subnet.key), not the Subnet.
        self._recoveries: dict[int, list] = {}  # subnet key -> [router id to ask about, retries done, subnet]
        # Fairness bookkeeping (see the module docstring).
        self._learned: dict[str, Learned] = {}  # neighbour -> its entries, oldest first
        self._query_origin: dict[int, str] = {}  # queried subnet key -> neighbour whose request we forwarded
        self._queries_by: Counter[str] = Counter()
        self._nstats: dict[str, Counter[str]] = {}

        self._tlvs_out: list[tuple[str, Tlv]] = []
        self._fib_out: list[FibChange] = []
        self._close_out: list[str] = []
        self._counters: Counter[str] = Counter()
        # The hottest counters are plain ints, folded into ``counters`` when it is read.
        self._rx_updates = 0  # counters["rx_update"]
        self._tx_updates = 0  # counters["tx_update"]
        self._infeasible = 0  # counters["update_infeasible"]
        self._triggered = 0  # counters["triggered_updates"]

        # Route expiry has its own timers: deadline -> the entries armed for it,
        # in arming order, and a heap of the deadlines present (exactly the
        # dict's keys). Input handled with one ``now`` (a slice in the service,
        # a tick in the simulator) arms many entries for one deadline, so an
        # entry costs a list slot, not a heap item with its own tuple and
        # sequence number (memory per route). Entries fire in (deadline, arming
        # order), as from a heap of (deadline, seq, entry); an item whose entry
        # is no longer armed for that deadline is stale and skipped.
        self._expiry: dict[float, list[RouteEntry]] = {}
        self._expiry_heap: list[float] = []
        self._expiry_items = 0  # list slots in _expiry, stale ones included
        self._route_timers = 0  # entries with an armed expiry
        self._dead_work: deque[tuple[str, list[int], float]] = deque()  # dead peers' routes still to retract

        self._next_announce = now + OWN_ROUTE_INTERVAL
        self._timers.schedule(("announce",), self._next_announce)
        self._timers.schedule(("source_sweep",), now + SOURCE_SWEEP_INTERVAL)

    # ------------------------------------------------------------------ queries
    @property
    def counters(self) -> Counter[str]:
        """Event counters by name (drops, requests, updates...)."""
        for name, attr in _HOT_COUNTERS:
            value = getattr(self, attr)
            if value:
                self._counters[name] += value
                setattr(self, attr, 0)
        return self._counters

    @property
    def own_subnet(self) -> Subnet:
        return self._own_subnet

    @property
    def router_id(self) -> bytes:
        return self._router_id

    @property
    def public_key(self) -> bytes:
        return self._public_key

    @property
    def seqno(self) -> int:
        return self._seqno

    @property
    def peers(self) -> list[PeerInfo]:
        return [p.info for p in self._peers.values()]

    def link_cost(self, peer_id: str) -> int:
        """Smoothed RTT in ms plus the link's static cost; KeyError for unknown peers."""
        return self._peers[peer_id].link_cost

    def fib_snapshot(self) -> dict[Subnet, FibEntry]:
        # (each subnet's FIB entry lives on its table entry: SubnetRoutes.fib)
        return {r.subnet: r.fib for r in self._table.routes.values() if r.fib is not None}

    def lookup_public_key(self, address: ipaddress.IPv6Address) -> bytes | None:
        """Key of the longest subnet with routes covering ``address`` (None if none)."""
        found = self._table.lookup(address)
        if found is None or found[1] is None:
            return None
        return found[1].public_key

    def selected_routes(self) -> list[RouteView]:
        return [_view(r.subnet, e) for r in self._table.routes.values() for e in r.entries if e.selected]

    def fallback_routes(self) -> list[RouteView]:
        return [_view(r.subnet, e) for r in self._table.routes.values() for e in r.entries if not e.selected]

    def queried_subnets(self, now: float) -> list[tuple[Subnet, int]]:
        subnets = self._table.queried_subnets
        return [(subnets[k], max(0, int(deadline - now))) for k, deadline in self._table.queried.items()]

    def source_table_size(self) -> int:
        return len(self._sources)

    def subnet_count(self) -> int:
        return len(self._table.routes)

    def selected_count(self) -> int:
        """Subnets with a selected route (cheap enough for periodic stats: no views built)."""
        return sum(1 for r in self._table.routes.values() if r.entries and r.entries[0].selected)

    def neighbour_stats(self) -> dict[str, dict[str, int]]:
        """Per live neighbour: entries held, queries and seqno requests held on
        its behalf, and the fairness counters (``NEIGHBOUR_COUNTERS``)."""
        out: dict[str, dict[str, int]] = {}
        for peer_id in self._peers:
            row = {name: 0 for name in NEIGHBOUR_COUNTERS}
            row.update(self._nstats.get(peer_id, ()))
            row["routes"] = len(self._learned.get(peer_id, ()))
            row["queries"] = self._queries_by.get(peer_id, 0)
            row["seqno_requests"] = self._seqno_cache.owned_by(peer_id)
            out[peer_id] = row
        return out

    def neighbour_route_limit(self) -> int:
        """Entries one neighbour may hold: all of the table when it is our
        only neighbour, half of it otherwise."""
        return MAX_SUBNETS if len(self._peers) <= 1 else MAX_SUBNETS // 2

    def fair_share(self, capacity: int) -> int:
        return max(MIN_FAIR_SHARE, capacity // max(1, len(self._peers)))

    def feasibility_distance(self, subnet: Subnet, router_id: bytes) -> tuple[int, int] | None:
        """(metric, seqno) we last advertised for this source, for tests and diagnostics."""
        fd = self._sources.get((subnet.key, router_id))
        return None if fd is None else (fd.metric, fd.seqno)

    # ------------------------------------------------------------------ outputs
    def tlvs_to_send(self) -> list[tuple[str, Tlv]]:
        out, self._tlvs_out = self._tlvs_out, []
        return out

    def fib_changes(self) -> list[FibChange]:
        out, self._fib_out = self._fib_out, []
        return out

    def peers_to_close(self) -> list[str]:
        out, self._close_out = self._close_out, []
        return out

    def get_timer(self) -> float | None:
        when = self._timers.next_time()
        if self._dead_work:
            since = self._dead_work[0][2]
            when = since if when is None or since < when else when
        heap = self._expiry_heap
        expiry = self._expiry
        while heap:
            at = heap[0]
            bucket = expiry[at]
            for i, entry in enumerate(bucket):
                if entry.timer_at == at:
                    if i:
                        del bucket[:i]  # stale items ahead of it
                        self._expiry_items -= i
                    return at if when is None or at < when else when
            heapq.heappop(heap)  # all stale
            del expiry[at]
            self._expiry_items -= len(bucket)
        return when

    # ------------------------------------------------------------------ links
    def peer_up(self, peer: PeerInfo, now: float) -> None:
        if peer.peer_id in self._peers:
            self._counters["peer_up_duplicate"] += 1
            return
        p = _Peer(peer, now)
        self._peers[peer.peer_id] = p
        self._nstats[peer.peer_id] = Counter()
        self._counters["peers_up"] += 1
        self._send_hello(p, now)
        self._timers.schedule(("dead", peer.peer_id), now + DEAD_PEER_THRESHOLD)
        self._send_own_update([peer.peer_id], now)
        # Queries in progress must reach the new neighbour too (6.7).
        for k, subnet in self._table.queried_subnets.items():
            self._send(peer.peer_id, RouteRequest(0, subnet))
            info = self._rr_cache.info(k, now, RR_CACHE_TTL)
            if info is not None and peer.peer_id not in info.receivers:
                info.receivers.append(peer.peer_id)

    def peer_down(self, peer_id: str, now: float) -> None:
        """The link closed: the peer is dead at once (6.6.4)."""
        if peer_id not in self._peers:
            self._counters["peer_down_unknown"] += 1
            return
        self._counters["peers_down"] += 1
        self._remove_peer(peer_id, now)

    # ------------------------------------------------------------------ input
    def receive_tlv(self, peer_id: str, tlv: Tlv, now: float) -> None:
        peer = self._peers.get(peer_id)
        if peer is None:
            self._counters["rx_from_unknown_peer"] += 1  # TLVs from dead peers are discarded (5.5)
            return
        peer.t_last_heard = now
        kind = type(tlv)
        if kind is Update:  # the common cases first, without the generic dispatch
            self._rx_updates += 1
            self._handle_update(peer_id, tlv, now)  # type: ignore[arg-type]
            return
        if kind is RouteRequest:
            self._counters["rx_route_request"] += 1
            self._handle_route_request(peer_id, tlv, now)  # type: ignore[arg-type]
            return
        name = _RX_NAMES.get(kind)
        if name is None:
            self._counters["rx_unknown_tlv"] += 1
            return
        self._counters[name] += 1
        if isinstance(tlv, Update):  # a subclass
            self._handle_update(peer_id, tlv, now)
        elif isinstance(tlv, Hello):
            self._send(peer_id, Ihu(peer.link_cost, IHU_INTERVAL_CS, None))
        elif isinstance(tlv, Ihu):
            self._handle_ihu(peer, now)
        elif isinstance(tlv, RouteRequest):
            self._handle_route_request(peer_id, tlv, now)
        elif isinstance(tlv, SeqNoRequest):
            self._handle_seqno_request(peer_id, tlv, now)

    def receive_tlvs(self, peer_id: str, tlvs: Iterable[Tlv], now: float) -> None:
        """``receive_tlv`` for each of ``tlvs`` in order, with one peer lookup
        for the lot (a link delivers its TLVs in batches)."""
        peer = self._peers.get(peer_id)
        if peer is None:
            for tlv in tlvs:
                self.receive_tlv(peer_id, tlv, now)
            return
        peer.t_last_heard = now
        handle_update = self._handle_update
        for tlv in tlvs:
            if type(tlv) is Update and peer.up:  # (handling a TLV never closes the link; checked anyway)
                self._rx_updates += 1
                handle_update(peer_id, tlv, now)
            else:
                self.receive_tlv(peer_id, tlv, now)

    def request_route(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address, now: float) -> None:
        """The data plane needs a next hop or key for ``address`` (4.4, 4.5).

        Cheap and idempotent: call it on every FIB miss, for destinations
        whose FIB entry has no next hop, and (to refresh routes before they
        expire) for destinations being forwarded to.
        """
        if not is_overlay_address(address):
            self._counters["request_route_outside_overlay"] += 1
            return
        if self._own_subnet.contains_address(address):
            return
        found = self._table.lookup(address)
        if found is None:
            self._originate_route_request(subnet_of(address), now)
            return
        subnet, routes = found
        if routes is None:
            return  # query in progress
        selected = routes.selected()
        if selected is not None and selected.metric != INFINITE:
            if selected.expires - now < ROUTE_REFRESH_THRESHOLD:
                self._originate_route_request(subnet_of(address), now)
            return
        if routes.entries:
            # Only fallback (infeasible or retracted) routes: ask for a newer seqno.
            # A retracted entry carries the retracting node's router id (quirk
            # 3), which nobody can bump; unlike the reference, prefer the owner's.
            owner = next((e for e in routes.entries if self._owns(e.router_id, subnet)), None)
            if owner is not None:
                self._send_seqno_request(subnet, owner.router_id, None, None, now)
            else:  # only retractions left: look for any path again
                self._originate_route_request(subnet, now)

    def handle_timer(self, now: float, limit: int | None = None) -> None:
        """Run due timers; at most ``limit`` events (the rest stay due, so
        ``get_timer`` says to call again at once)."""
        budget = -1 if limit is None else limit
        while self._dead_work and budget != 0:
            peer_id, subnets, _ = self._dead_work[0]
            take = len(subnets) if budget < 0 else min(budget, len(subnets))
            chunk = subnets[len(subnets) - take :]
            del subnets[len(subnets) - take :]
            self._retract_peer_routes(peer_id, chunk, now)
            if budget > 0:
                budget -= take
            if not subnets:
                self._dead_work.popleft()
        while self._expiry_heap and self._expiry_heap[0] <= now and budget != 0:
            # (re-read each round: a handler's _set_expiry may compact them into new objects)
            heap, expiry = self._expiry_heap, self._expiry
            at = heapq.heappop(heap)
            bucket = expiry.pop(at)
            self._expiry_items -= len(bucket)
            i = 0
            for entry in bucket:
                if budget == 0:
                    break
                i += 1
                if entry.timer_at == at:
                    entry.timer_at = None
                    self._route_timers -= 1
                    self._on_route_timer(entry.subnet, entry.neighbour, now)
                    budget -= 1
            if i < len(bucket):  # out of budget: the rest stay due, ahead of any armed since
                expiry = self._expiry
                newer = expiry.pop(at, None)
                if newer is None:
                    heapq.heappush(self._expiry_heap, at)
                else:
                    self._expiry_items -= len(newer)
                expiry[at] = rest = bucket[i:] + (newer or [])
                self._expiry_items += len(rest)
        while budget != 0:
            budget -= 1
            key = self._timers.pop_due(now)
            if key is None:
                return
            kind = key[0]
            if kind == "hello":
                self._on_hello_timer(key[1], now)
            elif kind == "dead":
                self._on_dead_timer(key[1], now)
            elif kind == "queried":
                self._on_query_timer(key[1], now)
            elif kind == "source_sweep":
                self._sources.sweep(now)
                self._timers.schedule(("source_sweep",), now + SOURCE_SWEEP_INTERVAL)
            elif kind == "seqno":
                self._on_seqno_cache_timer((key[1], key[2], key[3]), now)
            elif kind == "rr":
                self._on_rr_cache_timer(key[1], now)
            elif kind == "announce":
                self._on_announce_timer(now)
            elif kind == "bump":
                self._on_bump_timer(now)
            elif kind == "recover":
                self._on_recovery_timer(key[1], now)  # a subnet key

    # ------------------------------------------------------------------ Hello / IHU (2.9)
    def _send_hello(self, peer: _Peer, now: float) -> None:
        self._send(peer.info.peer_id, Hello(HELLO_UNICAST, peer.hello_seqno, HELLO_INTERVAL_CS))
        peer.hello_seqno = seqno_add(peer.hello_seqno, 1)
        peer.t_hello = now
        peer.next_hello = now + HELLO_INTERVAL
        self._timers.schedule(("hello", peer.info.peer_id), peer.next_hello)

    def _handle_ihu(self, peer: _Peer, now: float) -> None:
        # The sample runs from the last Hello we sent, solicited or not (quirk 6).
        sample = int((now - peer.t_hello) * 1000 + 1e-6) & 0xFFFF
        peer.set_smoothed(((peer.smoothed * 9 + sample) // 10) & 0xFFFF)
        peer.t_last_ihu = now

    def _on_hello_timer(self, peer_id: str, now: float) -> None:
        peer = self._peers.get(peer_id)
        if peer is None:
            return
        if now < peer.next_hello:
            self._timers.schedule(("hello", peer_id), peer.next_hello)
            return
        self._send_hello(peer, now)

    def _on_dead_timer(self, peer_id: str, now: float) -> None:
        peer = self._peers.get(peer_id)
        if peer is None:
            return
        # Unlike the reference, any TLV from the peer keeps it alive, not only
        # an IHU: a neighbour busy forwarding a flood to us may get its IHUs
        # to us late (they queue behind its Updates), yet the link plainly works.
        deadline = max(peer.t_last_ihu, peer.t_last_heard) + DEAD_PEER_THRESHOLD
        if now < deadline:
            self._timers.schedule(("dead", peer_id), deadline)
            return
        self._counters["peers_dead"] += 1
        self._close_out.append(peer_id)
        self._remove_peer(peer_id, now)

    def _remove_peer(self, peer_id: str, now: float) -> None:
        """Dead peer handling (6.6.4): retract its selected routes, drop the rest."""
        self._peers.pop(peer_id).up = False
        if any(p == peer_id for p, _ in self._tlvs_out):
            self._tlvs_out = [(p, t) for p, t in self._tlvs_out if p != peer_id]
        self._timers.cancel(("hello", peer_id))
        self._timers.cancel(("dead", peer_id))
        self._nstats.pop(peer_id, None)
        self._seqno_cache.forget_peer(peer_id)
        self._rr_cache.forget_peer(peer_id)
        learned = self._learned.get(peer_id)
        subnets = [e.subnet.key for e in learned.entries()] if learned is not None else []
        if len(subnets) <= DEAD_PEER_SLICE:
            self._retract_peer_routes(peer_id, subnets, now)
        else:
            # A neighbour that held tens of thousands of routes: retract them in
            # slices from handle_timer, so the caller can answer in between.
            self._counters["dead_peer_cleanup_deferred"] += 1
            self._dead_work.append((peer_id, subnets, now))

    def _retract_peer_routes(self, peer_id: str, keys: list[int], now: float) -> None:
        reselect: list[Subnet] = []
        table = self._table.routes
        for k in keys:
            routes = table.get(k)
            entry = routes.find(peer_id) if routes is not None else None
            if routes is None or entry is None:
                continue
            subnet = entry.subnet  # the Subnet this neighbour's entry was learned under
            if entry.selected:
                entry.metric = INFINITE
                self._set_expiry(entry, now + RETRACTED_ROUTE_HOLD)
                reselect.append(subnet)
            else:
                self._remove_entry(subnet, routes, entry)
        for subnet in reselect:
            self._route_selection(subnet, now)

    # ------------------------------------------------------------------ updates (6.3, 6.4)
    def _owns(self, router_id: bytes, subnet: Subnet) -> bool:
        address = _ADDRESSES.get(router_id)
        if address is None:
            address = _address_of_router(router_id)
        return subnet.contains_int6(address)

    def _update_filter(self, update: Update) -> str | None:
        """Why an Update is dropped before processing, or None to accept it."""
        subnet = update.subnet
        if not _OVERLAY_SUBNET.contains(subnet):  # rules.is_overlay_network, on the int key
            return "outside_overlay"
        if subnet.prefix_len < PREFIX_LEN_MIN:
            return "prefix_too_short"
        if update.metric != INFINITE and not self._owns(update.router_id, subnet):
            return "router_id_not_owner"
        if subnet == self._own_subnet:
            return "own_subnet"
        return None

    def _handle_update(self, peer_id: str, update: Update, now: float) -> None:
        subnet, router_id, seqno, metric = update.subnet, update.router_id, update.seqno, update.metric
        k = subnet.key
        plen = subnet.prefix_len
        # The filters of 6.3 (``_update_filter``), inline on the int key: this is the hot path.
        if plen < PREFIX_LEN_MIN or k >> _OVERLAY_SHIFT != _OVERLAY_TOP or not k & 1 or k == self._own_key:
            owned = False
        elif metric == INFINITE:
            owned = True
        else:
            address = _ADDRESSES.get(router_id)  # _owns, inline
            if address is None:
                address = _address_of_router(router_id)
            owned = address >> (128 - plen) == k >> (137 - plen)
        if not owned:
            reason = self._update_filter(update)
            if reason is not None:
                self._counters[f"update_filtered_{reason}"] += 1
                return
        seqno_cache = self._seqno_cache
        interested = (
            self._interested_peers(subnet, router_id, seqno, metric)
            if metric != INFINITE and seqno_cache.entries and seqno_cache.has_subnet(k)
            else ()
        )
        if metric == INFINITE:
            feasible = True
        else:
            fd = self._sources.by_subnet.get(k)  # SourceTable.lookup, inline
            while fd is not None and fd.router_id != router_id:
                fd = fd.next
            feasible = (
                fd is None
                or (seqno != fd.seqno and ((fd.seqno - seqno) & 0xFFFF) > 0x8000)  # seqno_gt, inline
                or (seqno == fd.seqno and metric < fd.metric)
            )
        if not feasible:
            self._infeasible += 1

        routes = self._table.routes.get(k)
        entry = None
        if routes is None:
            if not feasible:
                self._send_seqno_request(subnet, router_id, peer_id, None, now)
                self._start_recovery(subnet, router_id, now)
                return
            if metric == INFINITE:
                self._counters["update_retraction_unknown_subnet"] += 1
                return
            if not self._admit_fast(peer_id) and not self._admit(peer_id, subnet, True, now):
                return
            routes = self._add_routes(subnet, _public_key_of_router(router_id))
            old = None
        else:
            for entry in routes:  # routes.find, inline
                if entry.neighbour == peer_id:
                    break
            else:
                entry = None
                # (admission only ever evicts entries of other subnets here)
                if (
                    metric != INFINITE
                    and feasible
                    and not self._admit_fast(peer_id)
                    and not self._admit(peer_id, subnet, False, now)
                ):
                    return
            old = routes[0] if routes and routes[0].selected else None  # routes.selected()
        if old is not None:
            old_router_id = old.router_id
            old_metric = old.metric
        else:
            old_router_id = None
            old_metric = INFINITE

        if entry is not None:
            if entry.selected and not feasible and entry.router_id == router_id:
                # Not applied; ask for a newer seqno instead.
                self._send_seqno_request(subnet, entry.router_id, peer_id, None, now)
                return
            if entry.metric == INFINITE and metric == INFINITE:
                return
            entry.seqno, entry.metric, entry.router_id = seqno, metric, router_id
            if feasible:
                expires = now + hold_time_ms(update.interval, metric) / 1000
                at = entry.timer_at
                if at is not None and at <= expires:  # _set_expiry's common case: the armed deadline stays
                    entry.expires = expires
                else:
                    self._set_expiry(entry, expires)
            if not entry.selected and not feasible:
                # The reference stops here silently; like step 7 we ask for a
                # newer seqno when nothing is selected, or the subnet stays
                # unreachable although this neighbour has a route.
                if routes.selected() is None:
                    self._send_seqno_request(subnet, router_id, peer_id, None, now)
                    self._start_recovery(subnet, router_id, now)
                return
            if entry.selected and not feasible:
                entry.selected = False
        else:
            if metric == INFINITE or not feasible:
                if not feasible and routes.selected() is None:
                    self._send_seqno_request(subnet, router_id, peer_id, None, now)
                    self._start_recovery(subnet, router_id, now)
                return
            entries = routes  # (the entries list itself)
            if entries:  # share objects between a subnet's entries (memory per route)
                first = entries[0]
                if first.subnet.same_address == subnet.same_address:
                    subnet = first.subnet
                if first.router_id == router_id:
                    router_id = first.router_id
            entry = RouteEntry(subnet, router_id, peer_id, metric, seqno, now)
            entries.append(entry)
            learned = self._learned.get(peer_id)
            if learned is None:
                learned = self._learned[peer_id] = Learned()
            learned.append(entry)
            self._set_expiry(entry, now + update.interval * 35 / 1000)  # hold_time_ms (finite) / 1000

        new = self._find_best(k, routes)
        lost = False
        if new is not None:
            if new is not old or not new.selected:
                routes.select(new)
            next_hop = new.neighbour if new.metric != INFINITE else None
        else:
            if old is not None:
                self._send_seqno_request(subnet, old_router_id, None, None, now)  # type: ignore[arg-type]
                routes.unselect()
                lost = True
            next_hop = None
        fib_entry = routes.fib  # _sync_fib, unless nothing changed
        if fib_entry is None or fib_entry.next_hop != next_hop:
            self._sync_fib(subnet, routes)

        if old is not None and new is not None:
            trigger = new.router_id != old_router_id or abs(new.metric - old_metric) > BIG_METRIC_CHANGE
        else:
            trigger = (old is None) != (new is None)
        if trigger:
            self._triggered += 1
            self._propagate(subnet, None, now, routes)
            if lost:
                self._route_lost(subnet, old_router_id, now)  # type: ignore[arg-type]
        elif interested:
            self._propagate(subnet, interested, now, routes)
        if new is not None and new is not old and seqno_cache.entries:
            self._forward_pending_seqno_requests(subnet, now)

    # ------------------------------------------------------------------ fairness
    def _admit_fast(self, peer_id: str) -> bool:
        """True when ``_admit`` surely admits a new entry (the table and the
        neighbour below every limit) without evicting anything."""
        if len(self._table.routes) >= MAX_SUBNETS:
            return False
        learned = self._learned.get(peer_id)
        return learned is None or len(learned) < MAX_SUBNETS // 2

    def _admit(self, peer_id: str, subnet: Subnet, new_subnet: bool, now: float) -> bool:
        """Room for a new entry from ``peer_id`` (see the module docstring)."""
        learned = self._learned.get(peer_id)
        limit = self.neighbour_route_limit()
        at_limit = learned is not None and limit < MAX_SUBNETS and len(learned) >= limit
        # Past the limit the incoming route is the newest of all and is refused,
        # unless one of our queries asked for it: then the neighbour's newest entry goes.
        if at_limit and (subnet.key not in self._table.queried or not self._evict_newest(peer_id, now)):
            self._nstats[peer_id]["routes_refused"] += 1
            self._counters["drop_neighbour_route_limit"] += 1
            return False
        if new_subnet and len(self._table.routes) >= MAX_SUBNETS and not self._make_room(peer_id, now):
            self._nstats[peer_id]["routes_refused"] += 1
            self._counters["drop_routing_table_full"] += 1
            return False
        return True

    def _make_room(self, peer_id: str, now: float) -> bool:
        """The table is full: a neighbour below its fair share takes a subnet
        slot from the neighbour holding the most entries, if that one is
        above its share."""
        share = self.fair_share(MAX_SUBNETS)
        mine = len(self._learned.get(peer_id, ()))
        if mine >= share:
            return False
        victim = max((q for q in self._learned if q != peer_id), key=lambda q: len(self._learned[q]), default=None)
        if victim is None or len(self._learned[victim]) <= max(share, mine + 1):
            return False
        for _ in range(MAX_EVICTION_TRIES):
            if len(self._table.routes) < MAX_SUBNETS or not self._evict_newest(victim, now):
                break
        return len(self._table.routes) < MAX_SUBNETS

    def _evict_newest(self, peer_id: str, now: float) -> bool:
        """Drop ``peer_id``'s newest entry; a selected one is replaced by a
        fallback or retracted, as if it had expired."""
        learned = self._learned.get(peer_id)
        newest = learned.newest if learned is not None else None
        if newest is None:
            return False
        k = newest.subnet.key
        routes = self._table.routes.get(k)
        entry = routes.find(peer_id) if routes is not None else None
        if routes is None or entry is not newest:  # cannot happen; keep the index honest anyway
            learned.unlink(newest)  # type: ignore[union-attr]
            if not learned:
                del self._learned[peer_id]
            return True
        subnet = entry.subnet
        stats = self._nstats.get(peer_id)
        if stats is not None:
            stats["routes_evicted"] += 1
        self._counters["routes_evicted"] += 1
        was_selected = entry.selected
        self._remove_entry(subnet, routes, entry)
        if was_selected:
            if k in self._table.routes:
                self._route_selection(subnet, now)
            else:
                self._propagate(subnet, None, now)  # our retraction: downstream must not keep using us
        return True

    def _release_query(self, k: int) -> None:
        origin = self._query_origin.pop(k, None)
        if origin is not None:
            left = self._queries_by[origin] - 1
            if left > 0:
                self._queries_by[origin] = left
            else:
                del self._queries_by[origin]

    # ------------------------------------------------------------------ selection (6.5)
    def _find_best(self, k: int, routes: SubnetRoutes) -> RouteEntry | None:
        """``k``: the subnet's key."""
        current = routes.selected()
        best: RouteEntry | None = None
        best_total = INFINITE
        lookup = self._sources.lookup
        peers = self._peers
        fd_rid: bytes | None = None
        fd = None
        for entry in routes:
            metric = entry.metric
            if metric == INFINITE:
                continue
            rid = entry.router_id
            if rid != fd_rid:  # a subnet's entries nearly always share one router id: one lookup
                fd_rid, fd = rid, lookup(k, rid)
            if fd is not None:
                seqno = entry.seqno
                fd_seqno = fd.seqno
                # SourceTable.feasible, inline (seqno_gt spelled out)
                if seqno == fd_seqno:
                    if metric >= fd.metric:
                        continue
                elif ((fd_seqno - seqno) & 0xFFFF) <= 0x8000:
                    continue
            peer = peers.get(entry.neighbour)
            if peer is None:
                total = INFINITE
            else:
                total = metric + peer.cost  # metric_add: both finite here
                if total > MAX_FINITE:
                    total = MAX_FINITE
            if best is None or total < best_total:
                best, best_total = entry, total
        if best is not None and current is not None and best is not current:
            current_total = metric_add(current.metric, self._cost(current.neighbour))
            significant = best_total < metric_sub(current_total, SIGNIFICANT_METRIC_IMPROVEMENT)
            if not (significant or best.metric == 0):
                return current
        return best

    def _route_selection(self, subnet: Subnet, now: float) -> None:
        """Re-select after expiry or a dead peer; propagates unless nothing changed."""
        routes = self._table.routes.get(subnet.key)
        if routes is None:
            return
        current = routes.selected()
        best = self._find_best(subnet.key, routes)
        lost = False
        if best is not None:
            if best is current:
                return
            if best.metric == INFINITE and current is not None and current.metric == INFINITE:
                return
            routes.select(best)
        elif current is not None:
            self._send_seqno_request(subnet, current.router_id, None, None, now)
            routes.unselect()
            lost = True
        self._sync_fib(subnet, routes)
        self._propagate(subnet, None, now, routes)
        if lost:
            self._route_lost(subnet, current.router_id, now)  # type: ignore[union-attr]
        else:
            self._forward_pending_seqno_requests(subnet, now)

    # ------------------------------------------------------------------ announcing (6.6)
    def _advertised_interval(self, entry: RouteEntry, now: float) -> int:
        if entry.metric == INFINITE and entry.expires < now:
            return NOT_REPEATING_INTERVAL_CS
        return UPDATE_INTERVAL_CS

    def _selected_update(self, entry: RouteEntry, metric: int, subnet: Subnet, now: float) -> Update:
        # _advertised_interval, inline
        interval = NOT_REPEATING_INTERVAL_CS if entry.metric == INFINITE and entry.expires < now else UPDATE_INTERVAL_CS
        return Update(0, interval, entry.seqno, metric, subnet, entry.router_id)

    def _propagate(
        self, subnet: Subnet, targets: Iterable[str] | None, now: float, routes: SubnetRoutes | None = None
    ) -> None:
        """Triggered update for ``subnet`` (6.6.1): the selected route, or our own retraction.
        ``routes``: the subnet's table entry if the caller has it at hand."""
        if routes is None:
            routes = self._table.routes.get(subnet.key)
        entries = routes
        selected = entries[0] if entries and entries[0].selected else None  # routes.selected()
        if selected is not None:
            skip: str | None = selected.neighbour
            metric = metric_add(selected.metric, self._cost(skip))  # type: ignore[arg-type]
            update = self._selected_update(selected, metric, selected.subnet, now)
        else:
            update = Update(0, UPDATE_INTERVAL_CS, self._seqno, INFINITE, subnet, self._router_id)
            skip = None
        if not self._record_advertised(update, now):
            return
        if targets is None:
            self._send_all(update, skip)
        else:
            for peer_id in targets:
                if peer_id != skip:
                    self._send(peer_id, update)

    def _own_update(self) -> Update:
        return Update(0, UPDATE_INTERVAL_CS, self._seqno, 0, self._own_subnet, self._router_id)

    def _send_own_update(self, targets: Iterable[str], now: float) -> None:
        update = self._own_update()
        self._record_advertised(update, now)
        for peer_id in targets:
            self._send(peer_id, update)

    def _on_announce_timer(self, now: float) -> None:
        if now < self._next_announce:
            self._timers.schedule(("announce",), self._next_announce)
            return
        self._send_own_update(list(self._peers), now)
        self._next_announce = now + OWN_ROUTE_INTERVAL
        self._timers.schedule(("announce",), self._next_announce)

    def _record_advertised(self, update: Update, now: float) -> bool:
        """Apply an outgoing Update to the source table (6.1). A finite update
        that cannot be recorded (table full) must not be sent: it would
        escape the feasibility bookkeeping that keeps routes loop-free."""
        key: SourceKey = (update.subnet.key, update.router_id)
        sources = self._sources
        fd = sources.lookup(key[0], key[1])  # SourceTable.try_record, inline
        if fd is not None:
            refresh_distance(fd, update.metric, update.seqno, now + SOURCE_ENTRY_LIFETIME)
            return True
        if not sources.try_record(key, update.metric, update.seqno, now + SOURCE_ENTRY_LIFETIME):
            self._counters["drop_source_table_full"] += 1
            return update.metric == INFINITE
        return True

    def _route_lost(self, subnet: Subnet, router_id: bytes, now: float) -> None:
        """Additions to the reference once the selected route is gone with no
        feasible fallback (after its seqno request and retraction)."""
        self._failover_request(subnet, now)
        self._start_recovery(subnet, router_id, now)

    def _failover_request(self, subnet: Subnet, now: float) -> None:
        """Fast failover: look for another path through every remaining
        neighbour at once instead of waiting for the data plane to ask."""
        if not self._peers:
            return
        self._counters["failover_route_requests"] += 1
        request = RouteRequest(0, subnet)
        peers = list(self._peers)
        for peer_id in peers:
            self._send(peer_id, request)
        self._record_rr(subnet, 0, peers, now)

    def _start_recovery(self, subnet: Subnet, router_id: bytes, now: float) -> None:
        """Keep asking for a route we lost (or only hear infeasible offers
        for) a few times. Requests and bumps can be dropped along the way
        (rate limits, duplicates, next hops that changed), and the reference
        never resends, so without this a subnet could stay unreachable until
        traffic or a 300 s announcement happens to ask again."""
        k = subnet.key
        recovery = self._recoveries.get(k)
        if recovery is not None:
            recovery[0] = router_id
            return
        if len(self._recoveries) >= MAX_RECOVERIES:
            self._counters["drop_recovery_table_full"] += 1
            return
        self._recoveries[k] = [router_id, 0, subnet]
        self._timers.schedule(("recover", k), now + RECOVERY_RETRY_DELAYS[0])

    def _on_recovery_timer(self, k: int, now: float) -> None:
        recovery = self._recoveries.get(k)
        if recovery is None:
            return
        routes = self._table.routes.get(k)
        selected = routes.selected() if routes is not None else None
        if selected is not None and selected.metric != INFINITE:
            del self._recoveries[k]
            return
        router_id, done, subnet = recovery
        self._counters["recovery_retries"] += 1
        self._send_seqno_request(subnet, router_id, None, None, now)
        self._failover_request(subnet, now)  # replies reveal who has a route; infeasible ones get asked directly
        done += 1
        if done >= len(RECOVERY_RETRY_DELAYS):
            del self._recoveries[k]
            return
        recovery[1] = done
        self._timers.schedule(("recover", k), now + RECOVERY_RETRY_DELAYS[done])

    # ------------------------------------------------------------------ expiry (6.6.3)
    def _on_route_timer(self, subnet: Subnet, peer_id: str, now: float) -> None:
        routes = self._table.routes.get(subnet.key)
        entry = routes.find(peer_id) if routes is not None else None
        if routes is None or entry is None:
            return
        if now < entry.expires:
            self._set_expiry(entry, entry.expires)
            return
        if not entry.selected:
            self._counters["route_expired_fallback"] += 1
            self._remove_entry(subnet, routes, entry)
            return
        self._counters["route_expired_selected"] += 1
        entry.metric = INFINITE
        self._set_expiry(entry, now + RETRACTED_ROUTE_HOLD)
        best = self._find_best(subnet.key, routes)
        lost = best is None
        if best is not None:
            routes.select(best)
        else:
            routes.unselect()
        self._sync_fib(subnet, routes)
        self._propagate(subnet, None, now, routes)
        if lost:
            self._route_lost(subnet, entry.router_id, now)
        else:
            self._forward_pending_seqno_requests(subnet, now)

    # ------------------------------------------------------------------ route requests (6.7)
    def _originate_route_request(self, subnet: Subnet, now: float) -> None:
        k = subnet.key
        if k not in self._table.routes and k not in self._table.queried:
            if len(self._table.queried) >= MAX_QUERIED:
                self._counters["drop_query_table_full"] += 1
                return
            self._mark_queried(subnet, now)
        info = self._rr_cache.info(k, now, RR_CACHE_TTL)
        skip = info.receivers if info is not None and info.generation == 0 else ()
        request = RouteRequest(0, subnet)
        sent = False
        for peer_id in self._peers:
            if peer_id not in skip:
                self._send(peer_id, request)
                sent = True
        if sent:
            self._counters["route_requests_originated"] += 1
        self._record_rr(subnet, 0, list(self._peers), now)

    def _handle_route_request(self, peer_id: str, request: RouteRequest, now: float) -> None:
        subnet = request.subnet
        if subnet is None:
            self._answer_wildcard(peer_id, now)
            return
        # On the subnet key (Subnet.key): bit 0 says IPv6, the
        # network sits above bit 9, so the top p bits of the address are k >> (137 - p).
        k = subnet.key
        v6 = k & 1
        plen = subnet.prefix_len
        if v6 and plen >= 64 and k >> 73 == self._own_key >> 73:  # self._own_subnet.contains(subnet)
            self._send_own_update([peer_id], now)
            return
        if not v6 or plen < PREFIX_LEN_MIN or k >> _OVERLAY_SHIFT != _OVERLAY_TOP:  # is_overlay_address
            # Nobody can hold such a route (updates for it are filtered), and
            # forwarding IPv4 prefixes can crash reference nodes (5.6).
            self._counters["route_request_invalid_prefix"] += 1
            return
        routes = self._table.routes.get(k)
        if routes is not None:
            entries = routes
            selected = entries[0] if entries and entries[0].selected else None  # routes.selected()
            if selected is None or selected.neighbour == peer_id:
                return
            metric = metric_add(selected.metric, self._cost(selected.neighbour))
            update = self._selected_update(selected, metric, subnet, now)
            if self._record_advertised(update, now):
                self._send(peer_id, update)
            return
        if k in self._table.queried:
            return
        # Unknown: forward.
        if request.generation + 1 >= MAX_RR_GENERATION:
            self._counters["route_request_generation_limit"] += 1
            return
        if len(self._table.queried) >= MAX_QUERIED:
            self._counters["drop_query_table_full"] += 1
            return
        if self._queries_by.get(peer_id, 0) >= self.fair_share(MAX_QUERIED):
            self._nstats[peer_id]["route_requests_refused"] += 1
            self._counters["drop_neighbour_query_limit"] += 1
            return
        generation = request.generation + 1
        self._mark_queried(subnet, now)
        self._query_origin[k] = peer_id
        self._queries_by[peer_id] += 1
        info = self._rr_cache.info(k, now, RR_CACHE_TTL)
        skip = info.receivers if info is not None and generation >= info.generation else ()
        forwarded = RouteRequest(generation, subnet)
        # _send to each (all live peers, an IPv6 subnet: its checks hold)
        out = [(other, forwarded) for other in self._peers if other != peer_id and other not in skip]
        if out:
            self._counters["tx_route_request"] += len(out)
            self._tlvs_out += out
        self._counters["route_requests_forwarded"] += 1
        self._record_rr(subnet, generation, list(self._peers), now)

    def _answer_wildcard(self, peer_id: str, now: float) -> None:
        for routes in list(self._table.routes.values()):
            selected = routes.selected()
            if selected is None or selected.neighbour == peer_id:
                continue
            metric = metric_add(selected.metric, self._cost(selected.neighbour))
            update = self._selected_update(selected, metric, selected.subnet, now)
            if self._record_advertised(update, now):
                self._send(peer_id, update)
        self._send_own_update([peer_id], now)

    def _mark_queried(self, subnet: Subnet, now: float) -> None:
        deadline = now + ROUTE_QUERY_TIMEOUT
        self._table.mark_queried(subnet, deadline)
        self._timers.schedule(("queried", subnet.key), deadline)

    def _on_query_timer(self, k: int, now: float) -> None:
        deadline = self._table.queried.get(k)
        if deadline is None:
            return
        if now < deadline:
            self._timers.schedule(("queried", k), deadline)
            return
        self._counters["route_queries_timed_out"] += 1
        self._table.drop_query(k, self._table.queried_subnets[k].prefix_len)
        self._release_query(k)

    def _record_rr(self, subnet: Subnet, generation: int, receivers: list[str], now: float) -> None:
        k = subnet.key
        evicted = self._rr_cache.record(k, generation, receivers, now)
        if evicted is not None:
            self._counters["rr_cache_evicted"] += 1
            self._timers.cancel(("rr", evicted))
        self._timers.cancel(("rr", k))
        self._timers.schedule(("rr", k), now + RR_CACHE_TTL)

    def _on_rr_cache_timer(self, k: int, now: float) -> None:
        info = self._rr_cache.entries.get(k)
        if info is None:
            return
        if now < info.sent + RR_CACHE_TTL:
            self._timers.schedule(("rr", k), info.sent + RR_CACHE_TTL)
            return
        self._rr_cache.remove(k)

    # ------------------------------------------------------------------ seqno requests (6.8)
    def _send_seqno_request(
        self, subnet: Subnet, router_id: bytes, to: str | None, origin: str | None, now: float
    ) -> None:
        k = subnet.key
        fd = self._sources.get((k, router_id))
        seqno = seqno_add(fd.seqno if fd is not None else 0, 1)
        key: SeqnoKey = (router_id, k, seqno)
        info = self._seqno_cache.get(key)
        targets: list[str]
        if to is not None:
            targets = [to]
        else:
            recent = info.targets if info is not None and now - info.last_sent < SEQNO_REQUEST_RESEND else ()
            routes = self._table.routes.get(k)
            if routes is None:
                targets = list(self._peers) if origin is None else []
            else:
                targets = [e.neighbour for e in routes.entries if e.neighbour not in recent]
            # Skip peers that asked us for this very request. Unlike the
            # reference we don't apply this to a request aimed at one peer:
            # that peer just advertised a route, so it no longer waits on us.
            if info is not None:
                targets = [t for t in targets if t not in info.sources]
        request = SeqNoRequest(seqno, SEQNO_REQUEST_HOP_COUNT, router_id, subnet)
        for target in targets:
            if target in self._peers:
                self._send(target, request)
                self._cache_seqno_request(key, target, origin, now)

    def _bump_seqno(self, now: float) -> None:
        self._seqno = seqno_add(self._seqno, 1)
        self._last_bump = now
        self._bump_pending = False
        self._counters["seqno_bumps"] += 1
        self._send_own_update(list(self._peers), now)

    def _on_bump_timer(self, now: float) -> None:
        if not self._bump_pending or self._last_bump is None:
            return
        due = self._last_bump + SEQNO_BUMP_TIMEOUT
        if now < due:
            self._timers.schedule(("bump",), due)
            return
        self._bump_seqno(now)

    def _cache_seqno_request(self, key: SeqnoKey, target: str | None, origin: str | None, now: float) -> None:
        is_new = self._seqno_cache.get(key) is None
        evicted = self._seqno_cache.forward(key, target, origin, now)
        if evicted is not None:
            self._counters["seqno_cache_evicted"] += 1
            self._timers.cancel(("seqno", *evicted))
        if is_new:
            self._timers.schedule(("seqno", *key), now + SEQNO_CACHE_TTL)

    def _on_seqno_cache_timer(self, key: SeqnoKey, now: float) -> None:
        info = self._seqno_cache.get(key)
        if info is None:
            return
        if now < info.first_sent + SEQNO_CACHE_TTL:
            self._timers.schedule(("seqno", *key), info.first_sent + SEQNO_CACHE_TTL)
            return
        self._seqno_cache.remove(key)

    def _interested_peers(self, subnet: Subnet, router_id: bytes, seqno: int, metric: int) -> list[str]:
        """Peers whose seqno requests this update answers. The reference only
        matches the exact seqno asked for; a newer one (the originator may
        have bumped twice) answers the request just as well (RFC 8966
        3.8.1.2), so we take those too and forget the askers once served."""
        if metric == INFINITE:
            return []
        peers: list[str] = []
        for key in self._seqno_cache.keys_for(subnet.key):
            info = self._seqno_cache.get(key)
            if info is None or key[0] != router_id or seqno_lt(seqno, key[2]) or not info.sources:
                continue
            peers += [p for p in info.sources if p not in peers]
            if key[2] != seqno:
                info.sources.clear()
        return peers

    def _park_seqno_request(self, key: SeqnoKey, asker: str, now: float) -> None:
        """No neighbour to forward to yet. The reference drops the request; we
        remember the asker so the request goes out (and the answer comes
        back) as soon as we select a route (``_forward_pending_seqno_requests``)."""
        self._counters["seqno_request_parked"] += 1
        self._cache_seqno_request(key, None, asker, now)

    def _seqno_request_in_flight(self, targets: list[str], selected: RouteEntry | None, asker: str) -> bool:
        """Whether a copy we sent earlier can still bring the answer.

        The reference ignores every duplicate for 60 s, which stalls recovery
        when the earlier copy went back to the asker, to a peer now dead, or
        to a next hop we have since left: the request then never reaches the
        originator. A copy counts only if it went along our current next
        hop, or (with no usable route) to some other live peer."""
        if selected is not None and selected.metric != INFINITE and selected.neighbour != asker:
            return selected.neighbour in targets
        return any(t != asker and t in self._peers for t in targets)

    def _forward_pending_seqno_requests(self, subnet: Subnet, now: float) -> None:
        """A route for ``subnet`` was just selected: send requests that peers
        are still waiting on along it. Without this a request that reached us
        while we had no route (and was parked as a duplicate) would die here."""
        keys = self._seqno_cache.keys_for(subnet.key)
        if not keys:
            return
        routes = self._table.routes.get(subnet.key)
        selected = routes.selected() if routes is not None else None
        if selected is None or selected.metric == INFINITE:
            return
        hop = selected.neighbour
        for key in keys:
            info = self._seqno_cache.get(key)
            router_id, _, seqno = key
            if info is None or not info.sources or hop in info.targets or hop in info.sources:
                continue
            if router_id == selected.router_id and not seqno_lt(selected.seqno, seqno):
                continue  # our route already satisfies it
            self._send(hop, SeqNoRequest(seqno, SEQNO_REQUEST_HOP_COUNT - 1, router_id, subnet))
            self._cache_seqno_request(key, hop, None, now)
            self._counters["seqno_request_forwarded_pending"] += 1

    def _handle_seqno_request(self, peer_id: str, request: SeqNoRequest, now: float) -> None:
        subnet, router_id, seqno = request.subnet, request.router_id, request.seqno
        if not subnet.is_ipv6:
            self._counters["seqno_request_invalid_prefix"] += 1
            return
        k = subnet.key
        key: SeqnoKey = (router_id, k, seqno)
        info = self._seqno_cache.get(key)
        routes = self._table.routes.get(k)
        selected = routes.selected() if routes is not None else None
        if (
            selected is not None
            and selected.metric != INFINITE
            and (router_id != selected.router_id or not seqno_lt(selected.seqno, seqno))
        ):
            # Reply; the metric uses the requester's link cost, as the reference does (quirk 4).
            # Unlike the reference we answer even a duplicate of a request we
            # forwarded earlier: that one may have been satisfied long ago.
            metric = metric_add(selected.metric, self._cost(peer_id))
            update = self._selected_update(selected, metric, selected.subnet, now)
            if self._record_advertised(update, now):
                self._send(peer_id, update)
            self._counters["seqno_request_answered"] += 1
            return
        if (
            info is not None
            and now - info.last_sent <= SEQNO_DUPLICATE_WINDOW
            and self._seqno_request_in_flight(info.targets, selected, peer_id)
        ):
            if peer_id not in info.sources:
                info.sources.append(peer_id)  # so the answer reaches it too
            self._counters["seqno_request_duplicate"] += 1
            return
        if router_id == self._router_id and seqno_gt(seqno, self._seqno) and k == self._own_key:
            if self._last_bump is not None and now - self._last_bump < SEQNO_BUMP_TIMEOUT:
                # The reference drops the request; we bump as soon as the rate
                # limit allows, so the requester need not retry.
                self._counters["seqno_bump_deferred"] += 1
                self._bump_pending = True
                self._timers.schedule(("bump",), self._last_bump + SEQNO_BUMP_TIMEOUT)
                return
            self._bump_seqno(now)
            return
        if request.hop_count < 2:
            self._counters["seqno_request_hop_limit"] += 1
            return
        if router_id == self._router_id:
            self._counters["seqno_request_unhandled"] += 1
            return
        if info is None and self._seqno_cache.owned_by(peer_id) >= self.fair_share(MAX_SEQNO_CACHE):
            self._nstats[peer_id]["seqno_requests_refused"] += 1
            self._counters["drop_neighbour_seqno_limit"] += 1
            return
        if routes is None:
            self._park_seqno_request(key, peer_id, now)
            return
        visited = info.targets if info is not None and now - info.last_sent < SEQNO_REQUEST_RESEND else ()
        candidates = [
            e
            for e in routes.entries
            if e.neighbour != peer_id
            and e.neighbour in self._peers
            and e.metric != INFINITE
            and e.neighbour not in visited
        ]
        feasible = self._sources.feasible
        target = next((e for e in candidates if feasible((k, e.router_id), e.seqno, e.metric)), None)
        if target is None and candidates:
            target = candidates[0]
        if target is None:
            self._park_seqno_request(key, peer_id, now)
            return
        forwarded = SeqNoRequest(seqno, request.hop_count - 1, router_id, subnet)
        self._send(target.neighbour, forwarded)
        self._cache_seqno_request(key, target.neighbour, peer_id, now)
        self._counters["seqno_request_forwarded"] += 1

    # ------------------------------------------------------------------ helpers
    def _cost(self, peer_id: str) -> int:
        peer = self._peers.get(peer_id)
        return INFINITE if peer is None else peer.cost

    def _send_all(self, update: Update, skip: str | None) -> None:
        """``_send`` of one Update to every live peer but ``skip`` (the hot path of triggered updates)."""
        if not update.subnet.key & 1:  # is_ipv6
            self._counters["tx_ipv4_suppressed"] += 1
            return
        out = [(p, update) for p in self._peers if p != skip]
        if out:
            self._tx_updates += len(out)
            self._tlvs_out += out

    def _send(self, peer_id: str, tlv: Tlv) -> None:
        if peer_id not in self._peers:
            self._counters["tx_to_dead_peer_suppressed"] += 1
            return
        subnet = getattr(tlv, "subnet", None)
        if subnet is not None and not subnet.key & 1:  # not subnet.is_ipv6
            self._counters["tx_ipv4_suppressed"] += 1  # never send IPv4 prefixes (5.6)
            return
        self._counters[_TX_NAMES[type(tlv)]] += 1
        self._tlvs_out.append((peer_id, tlv))

    def _add_routes(self, subnet: Subnet, public_key: bytes) -> SubnetRoutes:
        queried = self._table.queried
        if queried and subnet.key in queried:
            self._timers.cancel(("queried", subnet.key))
            self._release_query(subnet.key)
        return self._table.add_routes(subnet, public_key)

    def _remove_routes(self, subnet: Subnet) -> None:
        routes = self._table.routes.get(subnet.key)
        self._table.remove_routes(subnet)
        if routes is not None and routes.fib is not None:
            routes.fib = None
            self._fib_out.append(FibDel(subnet))

    def _remove_entry(self, subnet: Subnet, routes: SubnetRoutes, entry: RouteEntry) -> None:
        routes.remove(entry)
        if entry.timer_at is not None:
            entry.timer_at = None
            self._route_timers -= 1
        learned = self._learned.get(entry.neighbour)
        if learned is not None:
            learned.unlink(entry)
            if not learned:
                del self._learned[entry.neighbour]
        if not routes.entries:
            self._remove_routes(subnet)
        else:
            self._sync_fib(subnet, routes)

    def _set_expiry(self, entry: RouteEntry, expires: float) -> None:
        """Deadlines usually move later: the armed one then fires early and re-arms."""
        entry.expires = expires
        at = entry.timer_at
        if at is not None and at <= expires:
            return
        if at is None:
            self._route_timers += 1
        entry.timer_at = expires
        bucket = self._expiry.get(expires)
        if bucket is None:
            self._expiry[expires] = [entry]
            heapq.heappush(self._expiry_heap, expires)
        else:
            bucket.append(entry)
        self._expiry_items += 1
        if self._expiry_items > 2 * self._route_timers + 1024:  # stale items of removed entries
            self._compact_expiry()

    def _compact_expiry(self) -> None:
        kept: dict[float, list[RouteEntry]] = {}
        for at, bucket in self._expiry.items():
            live = [entry for entry in bucket if entry.timer_at == at]
            if live:
                kept[at] = live
        self._expiry = kept
        self._expiry_heap = list(kept)
        heapq.heapify(self._expiry_heap)
        self._expiry_items = sum(len(bucket) for bucket in kept.values())

    def _sync_fib(self, subnet: Subnet, routes: SubnetRoutes | None = None) -> None:
        """Emit a FIB change if ``subnet``'s forwarding state differs from what we last published."""
        if routes is None:
            routes = self._table.routes.get(subnet.key)
        if routes is None:
            return  # gone: _remove_routes sent the FibDel
        entries = routes
        selected = entries[0] if entries and entries[0].selected else None  # routes.selected()
        next_hop = selected.neighbour if selected is not None and selected.metric != INFINITE else None
        entry = routes.fib
        if entry is None or entry.next_hop != next_hop:
            entry = FibEntry(next_hop, routes.public_key)
            routes.fib = entry
            self._fib_out.append(FibSet(subnet, entry))


def _view(subnet: Subnet, entry: RouteEntry) -> RouteView:
    return RouteView(subnet, entry.neighbour, entry.metric, entry.seqno, entry.router_id)
