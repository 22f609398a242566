"""Deterministic multi-node simulation of RouterEngines on a virtual clock.

Links are bidirectional FIFO pipes with a fixed one-way delay. Virtual time
advances in ticks (``tick``, 1 ms by default): a node handles everything that
reached it during a tick at once and then sends what that produced, as the
router service handles its input in slices; one-way delays and timers are
rounded up to whole ticks. An event is one node's turn in a tick, and events
run in (tick, order scheduled) order, so a run with the same seed is
reproducible bit for bit. Batching per node and tick is what keeps the
per-packet cost low enough for public-network sizes: one wheel slot per
(tick, node) instead of a heap item per packet, one drain per turn. Used by
the unit tests (routing behaviour, loop freedom after every event) and by
benchmarks.

Each node's FIB is mirrored from the engine's FibSet/FibDel stream, which is
what the data plane would see. With ``check_loops`` every event that changes
a FIB entry is followed by a walk of next hops from that node toward that
destination: a new loop must pass through the node whose entry changed, so
this checks loop freedom after every event at O(path length) cost.
Convergence ("every live node has a usable route to every other live node")
is tracked incrementally, so ``run_until_converged`` is exact to the event.

    python -m services.router.simulation   # prints the 30-node mesh figures
"""

from __future__ import annotations

import gc
import heapq
import ipaddress
import itertools
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from common.identity import address_of
from common.wire.subnet import Subnet
from common.wire.tlv import Tlv, decode_tlv

from .engine import FibDel, FibSet, PeerInfo, RouterEngine

_TRAFFIC = -1  # wheel slot of the traffic tick (node indices are >= 0)
_EPS = 1e-9

_TLV_NAMES = {4: "hello", 5: "ihu", 8: "update", 9: "route_request", 10: "seqno_request"}


class RoutingLoop(AssertionError):
    """Following FIB next hops toward a destination revisited a node."""


@dataclass(eq=False)
class SimLink:
    a: int
    b: int
    peer_at_a: str  # peer id node a uses for b
    peer_at_b: str
    delay: float
    up: bool = True
    blackhole: bool = False  # silently drop everything (for dead-peer detection)


@dataclass(eq=False)
class SimNode:
    index: int
    engine: RouterEngine
    address: ipaddress.IPv6Address
    alive: bool = True
    links: dict[str, SimLink] = field(default_factory=dict)  # local peer id -> link
    # Mirror of the published FIB, keyed by subnet key (Subnet.key:
    # an int hashes without a Python call, and loop walks look up every hop).
    fib: dict[int, str | None] = field(default_factory=dict)
    timer_tick: int | None = None  # the wheel slot armed for the engine's next timer

    @property
    def subnet(self) -> Subnet:
        return self.engine.own_subnet

    @property
    def key(self) -> int:
        """Its own subnet's key (``fib`` is keyed by these)."""
        return self.engine.own_subnet.key

    def neighbour(self, peer_id: str) -> int:
        link = self.links[peer_id]
        return link.b if link.a == self.index else link.a


class Simulation:
    def __init__(
        self,
        n_nodes: int = 0,
        *,
        seed: int = 0,
        delay: float = 0.001,
        static_cost: int = 10,
        check_wire: bool = False,
        check_loops: bool = False,
        start: float = 0.0,
        all_pairs: bool = True,
        loop_sample: set[Subnet] | None = None,
        tick: float = 0.001,
    ) -> None:
        if tick <= 0 or delay < tick:
            raise ValueError("tick must be positive and no longer than the link delay")
        self.rng = random.Random(seed)
        self.seed = seed
        self.delay = delay
        self.static_cost = static_cost
        self.check_wire = check_wire  # round-trip every TLV through the codec
        self.check_loops = check_loops  # loop check after every event
        self.now = start
        self.nodes: list[SimNode] = []
        self.links: list[SimLink] = []
        self.tick = tick
        self._counts = [0] * 16  # control packets sent, by TLV type
        self.events_processed = 0
        self.loop_checks = 0
        self.retired_counters: Counter[str] = Counter()  # engines replaced by rejoin_node
        # The timing wheel: tick -> {node index (or _TRAFFIC): arrivals
        # [(receiver's peer id, [TLV, ...])]}, and a heap of the ticks present.
        # An arrival is one sender turn's output over one link, in order (one
        # tuple and one link check per batch, not per packet).
        self._wheel: dict[int, dict[int, list[tuple[str, list[Tlv]]]]] = {}
        self._ticks: list[int] = []
        self._owner: dict[int, int] = {}  # subnet key -> node index
        self._link_ids = itertools.count()
        self._missing = 0
        # Convergence target: every pair (all_pairs) or only the pairs some
        # node asked for (``request_routes``; the large runs, where all
        # pairs would cost O(n^2) just to count).
        self._demand: dict[int, set[int]] | None = None if all_pairs else {}
        self.loop_sample = loop_sample  # loop checks only toward these subnets (None: all)
        self._neighbours_at_leave: dict[int, list[int]] = {}
        self._traffic_interval: float | None = None
        for _ in range(n_nodes):
            self.add_node()

    @property
    def loop_sample(self) -> set[Subnet] | None:
        """Loop checks run only toward these subnets (None: all)."""
        return self._loop_sample

    @loop_sample.setter
    def loop_sample(self, subnets: set[Subnet] | None) -> None:
        self._loop_sample = subnets
        self._loop_keys = None if subnets is None else {s.key for s in subnets}

    @property
    def sent(self) -> Counter[str]:
        """Control packets sent so far by TLV type, plus "total"."""
        out = Counter({_TLV_NAMES[t]: c for t, c in enumerate(self._counts) if c})
        out["total"] = sum(self._counts)
        return out

    # ------------------------------------------------------------------ topology
    def add_node(self) -> int:
        index = len(self.nodes)
        while True:
            public_key = self.rng.randbytes(32)
            router_id = public_key + b"\0\0" + self.rng.randbytes(6)
            engine = RouterEngine(public_key, router_id, self.now, rng=random.Random(self.rng.random()))
            if engine.own_subnet.key not in self._owner:
                break
        node = SimNode(index, engine, address_of(public_key))
        self.nodes.append(node)
        self._owner[engine.own_subnet.key] = index
        if self._demand is None:
            self._recount_missing()
        self._drain(node)
        return index

    def add_link(self, a: int, b: int, *, delay: float | None = None, static_cost: int | None = None) -> SimLink:
        if a == b or not (self.nodes[a].alive and self.nodes[b].alive):
            raise ValueError(f"cannot link {a} and {b}")
        k = next(self._link_ids)
        link = SimLink(a, b, f"n{a}>n{b}#{k}", f"n{b}>n{a}#{k}", self.delay if delay is None else delay)
        self.links.append(link)
        cost = self.static_cost if static_cost is None else static_cost
        for here, peer_id in ((a, link.peer_at_a), (b, link.peer_at_b)):
            node = self.nodes[here]
            node.links[peer_id] = link
            node.engine.peer_up(PeerInfo(peer_id, cost, f"SIM {peer_id}"), self.now)
        self._drain(self.nodes[a])
        self._drain(self.nodes[b])
        return link

    def find_link(self, a: int, b: int) -> SimLink:
        for link in self.links:
            if link.up and {link.a, link.b} == {a, b}:
                return link
        raise KeyError(f"no link between {a} and {b}")

    def neighbours(self, n: int) -> list[int]:
        return sorted({self.nodes[n].neighbour(pid) for pid, link in self.nodes[n].links.items() if link.up})

    def remove_link(self, a: int, b: int) -> None:
        """Close the link; both ends see peer_down at the same instant."""
        link = self.find_link(a, b)
        self._close(link, notify_a=True, notify_b=True)

    def blackhole_link(self, a: int, b: int) -> None:
        """Drop everything on the link without telling either end (dead-peer detection)."""
        self.find_link(a, b).blackhole = True

    def remove_node(self, n: int) -> None:
        """The node vanishes; its neighbours see their links close."""
        node = self.nodes[n]
        self._neighbours_at_leave[n] = self.neighbours(n)
        node.alive = False
        for link in list(node.links.values()):
            if link.up:
                self._close(link, notify_a=link.a != n, notify_b=link.b != n)
        self._recount_missing()

    def rejoin_node(self, n: int) -> None:
        """A node that left comes back as a restarted process: same key, a
        fresh router id and seqno, empty tables, its old links up again (to
        the neighbours still alive), and its traffic asking again."""
        node = self.nodes[n]
        if node.alive:
            raise ValueError(f"node {n} is alive")
        pk = node.engine.public_key
        self.retired_counters.update(node.engine.counters)
        router_id = pk + b"\0\0" + self.rng.randbytes(6)
        node.engine = RouterEngine(pk, router_id, self.now, rng=random.Random(self.rng.random()))
        node.alive = True
        node.links = {}
        node.fib = {}
        node.timer_tick = None
        self._recount_missing()
        for other in self._neighbours_at_leave.pop(n, []):
            if self.nodes[other].alive:
                self.add_link(n, other)
        for dst in sorted(self._demand.get(n, ())) if self._demand is not None else ():
            node.engine.request_route(self.nodes[dst].address, self.now)
        self._drain(node)

    def _close(self, link: SimLink, *, notify_a: bool, notify_b: bool) -> None:
        link.up = False
        for here, peer_id, notify in ((link.a, link.peer_at_a, notify_a), (link.b, link.peer_at_b, notify_b)):
            node = self.nodes[here]
            if notify and node.alive:
                node.engine.peer_down(peer_id, self.now)
                self._drain(node)

    # ------------------------------------------------------------------ traffic
    def request_all_routes(self) -> None:
        """Every node asks for every other live node's address, as traffic would."""
        live = [n for n in self.nodes if n.alive]
        for node in live:
            for other in live:
                if other is not node:
                    node.engine.request_route(other.address, self.now)
            self._drain(node)

    def request_route(self, n: int, address: ipaddress.IPv6Address) -> None:
        self.nodes[n].engine.request_route(address, self.now)
        self._drain(self.nodes[n])

    def request_routes(self, pairs: dict[int, list[int]]) -> None:
        """Each source asks for its destinations (as first traffic would), and
        those pairs become what convergence means (needs ``all_pairs=False``)."""
        if self._demand is None:
            raise ValueError("request_routes needs a Simulation(all_pairs=False)")
        for src, dsts in pairs.items():
            self._demand.setdefault(src, set()).update(dsts)
        self._recount_missing()
        for src, dsts in pairs.items():
            node = self.nodes[src]
            for dst in dsts:
                node.engine.request_route(self.nodes[dst].address, self.now)
            self._drain(node)

    def start_traffic(self, interval: float = 1.0) -> None:
        """From now on, every ``interval`` each wanted pair without a route asks
        again, as a data plane does on every FIB miss of ongoing traffic."""
        self._traffic_interval = interval
        self._slot(self._tick_after(self.now + interval), _TRAFFIC)

    def _traffic_tick(self) -> None:
        for src, dsts in (self._demand or {}).items():
            node = self.nodes[src]
            if not node.alive:
                continue
            asked = False
            for dst in dsts:
                other = self.nodes[dst]
                if other.alive and node.fib.get(other.key) is None:
                    node.engine.request_route(other.address, self.now)
                    asked = True
            if asked:
                self._drain(node)
        if self._traffic_interval is not None:
            self._slot(self._tick_after(self.now + self._traffic_interval), _TRAFFIC)

    # ------------------------------------------------------------------ running
    def _tick_after(self, when: float) -> int:
        """The first tick at or after ``when`` that is still to come."""
        t = math.ceil(when / self.tick - _EPS)
        now_tick = math.floor(self.now / self.tick + _EPS)
        return t if t > now_tick else now_tick + 1

    def _slot(self, t: int, index: int) -> list[tuple[str, list[Tlv]]]:
        """The arrival list of ``index`` at tick ``t`` (created, and the tick
        put on the heap, on first use)."""
        bucket = self._wheel.get(t)
        if bucket is None:
            bucket = self._wheel[t] = {}
            heapq.heappush(self._ticks, t)
        arrivals = bucket.get(index)
        if arrivals is None:
            arrivals = bucket[index] = []
        return arrivals

    def run_until(self, t: float, stop: Callable[[], bool] | None = None) -> bool:
        """Process events up to virtual time ``t``; True if ``stop`` became true first."""
        ticks, wheel, q = self._ticks, self._wheel, self.tick
        last = math.floor(t / q + _EPS)
        while ticks and ticks[0] <= last:
            tick = ticks[0]
            bucket = wheel[tick]
            self.now = tick * q
            while bucket:
                index = next(iter(bucket))
                self._turn(index, bucket.pop(index), tick)
                if stop is not None and stop():
                    if not bucket:
                        heapq.heappop(ticks)
                        del wheel[tick]
                    return True
            heapq.heappop(ticks)
            del wheel[tick]
        self.now = max(self.now, t)
        return False

    def run_for(self, dt: float, stop: Callable[[], bool] | None = None) -> bool:
        return self.run_until(self.now + dt, stop)

    def run_until_converged(self, timeout: float) -> float | None:
        """Virtual seconds until every node has a selected route to every other, or None."""
        start = self.now
        if self.all_converged():
            return 0.0
        if self.run_until(start + timeout, self.all_converged):
            return self.now - start
        return None

    def _turn(self, index: int, arrivals: list[tuple[str, list[Tlv]]], tick: int) -> None:
        """One node's turn in a tick: what reached it, then its due timers, then its output."""
        self.events_processed += 1
        if index == _TRAFFIC:
            self._traffic_tick()
            return
        node = self.nodes[index]
        if not node.alive:
            return
        engine = node.engine
        now = self.now
        if arrivals:
            links = node.links
            receive = engine.receive_tlvs
            for peer_id, tlvs in arrivals:
                link = links.get(peer_id)
                if link is not None and link.up and not link.blackhole:
                    receive(peer_id, tlvs, now)
        # A timer can only be due in the tick _drain armed for it (the engine
        # changes only in turns, each followed by a _drain): other turns skip
        # asking the engine.
        if node.timer_tick == tick:
            node.timer_tick = None
            due = engine.get_timer()
            if due is not None and due <= now + _EPS:
                engine.handle_timer(now)
        self._drain(node)

    def _drain(self, node: SimNode) -> None:
        engine = node.engine
        out = engine.tlvs_to_send()
        if out:
            counts = self._counts
            check_wire = self.check_wire
            lists: dict[str, list[Tlv]] = {}
            for peer_id, tlv in out:
                batch = lists.get(peer_id)
                if batch is None:
                    link = node.links.get(peer_id)
                    if link is None or not link.up:
                        raise AssertionError(f"node {node.index} sent to unknown or closed peer {peer_id}")
                    if link.a == node.index:
                        dst, dst_peer = link.b, link.peer_at_b
                    else:
                        dst, dst_peer = link.a, link.peer_at_a
                    batch = lists[peer_id] = []
                    self._slot(self._tick_after(self.now + link.delay), dst).append((dst_peer, batch))
                if check_wire:
                    tlv = _wire_roundtrip(tlv)
                batch.append(tlv)
                counts[tlv.TYPE] += 1
        changed = engine.fib_changes()
        if changed:
            for change in changed:
                self._apply_fib(node, change)
            if self.check_loops:
                sample = self._loop_keys
                for k in {c.subnet.key for c in changed}:
                    if sample is None or k in sample:
                        self._check_path(node.index, k)
        for peer_id in engine.peers_to_close():
            link = node.links[peer_id]
            if link.up:
                self._close(link, notify_a=link.a != node.index, notify_b=link.b != node.index)
        due = engine.get_timer()
        if due is not None:
            t = self._tick_after(due)
            if node.timer_tick is None or t < node.timer_tick:
                node.timer_tick = t
                self._slot(t, node.index)

    def _apply_fib(self, node: SimNode, change: FibSet | FibDel) -> None:
        fib, subnet = node.fib, change.subnet.key
        before = fib.get(subnet) is not None
        if type(change) is FibSet:
            after = (next_hop := change.entry.next_hop) is not None
            fib[subnet] = next_hop
        else:
            after = False
            fib.pop(subnet, None)
        if before == after:
            return
        owner = self._owner.get(subnet)
        if owner is None or owner == node.index or not node.alive or not self.nodes[owner].alive:
            return
        if self._demand is None or owner in self._demand.get(node.index, ()):
            self._missing += -1 if after else 1

    # ------------------------------------------------------------------ checks
    @property
    def demand(self) -> dict[int, set[int]]:
        """Destinations each node asked for (``request_routes``); empty with all_pairs."""
        return {src: set(dsts) for src, dsts in (self._demand or {}).items()}

    def _wanted_pairs(self) -> Iterator[tuple[SimNode, SimNode]]:
        nodes = self.nodes
        if self._demand is None:
            live = [n for n in nodes if n.alive]
            return ((x, y) for x in live for y in live if x is not y)
        return (
            (nodes[src], nodes[dst])
            for src, dsts in self._demand.items()
            if nodes[src].alive
            for dst in dsts
            if dst != src and nodes[dst].alive
        )

    def _recount_missing(self) -> None:
        self._missing = sum(1 for x, y in self._wanted_pairs() if x.fib.get(y.key) is None)

    def all_converged(self) -> bool:
        """Every live node has a selected route to every other live node's
        subnet (or, with a demand, to every destination it asked for)."""
        return self._missing == 0

    def missing_routes(self) -> list[tuple[int, int]]:
        return [(x.index, y.index) for x, y in self._wanted_pairs() if x.fib.get(y.key) is None]

    def wanted_pair_count(self) -> int:
        return sum(1 for _ in self._wanted_pairs())

    def path(self, src: int, dst: int) -> list[int] | None:
        """Nodes visited following FIB next hops from src toward dst's subnet; None on a black hole."""
        subnet = self.nodes[dst].subnet
        key = subnet.key
        hops = [src]
        seen = {src}
        current = src
        while current != dst:
            next_hop = self.nodes[current].fib.get(key)
            if next_hop is None:
                return None
            current = self.nodes[current].neighbour(next_hop)
            if current in seen:
                raise RoutingLoop(f"loop toward node {dst} ({subnet}): {[*hops, current]}")
            seen.add(current)
            hops.append(current)
        return hops

    def _check_path(self, start: int, subnet: int) -> None:
        """A new loop toward ``subnet`` (a subnet key) must pass through the node whose FIB just changed."""
        self.loop_checks += 1
        owner = self._owner.get(subnet)
        nodes = self.nodes
        seen = {start: None}  # the hops so far, in order
        current = start
        while current != owner:
            node = nodes[current]
            next_hop = node.fib.get(subnet)
            if next_hop is None:
                return
            link = node.links.get(next_hop)
            if link is None or not link.up:
                raise AssertionError(f"node {current} forwards {self._name(subnet)} over closed link {next_hop}")
            current = link.b if link.a == current else link.a  # node.neighbour(next_hop)
            if current in seen:
                raise RoutingLoop(f"loop toward {self._name(subnet)} at t={self.now:.6f}: {[*seen, current]}")
            seen[current] = None

    def _name(self, key: int) -> str:
        owner = self._owner.get(key)
        return f"node {owner}'s {self.nodes[owner].subnet}" if owner is not None else f"subnet key {key:#x}"

    def assert_loop_free(self) -> None:
        """Full check: from every live node toward every subnet in any FIB."""
        subnets = {s for n in self.nodes if n.alive for s in n.fib}
        for subnet in subnets:
            for node in self.nodes:
                if node.alive:
                    self._check_path(node.index, subnet)

    def subnet_in_any_fib(self, subnet: Subnet) -> list[int]:
        return [n.index for n in self.nodes if n.alive and subnet in n.engine.fib_snapshot()]


def _wire_roundtrip(tlv: Tlv) -> Tlv:
    return decode_tlv(tlv.TYPE, tlv.encode_body())


# ---------------------------------------------------------------------- topologies
def line(sim: Simulation, n: int) -> list[int]:
    nodes = [sim.add_node() for _ in range(n)]
    for a, b in itertools.pairwise(nodes):
        sim.add_link(a, b)
    return nodes


def ring(sim: Simulation, n: int) -> list[int]:
    nodes = line(sim, n)
    sim.add_link(nodes[-1], nodes[0])
    return nodes


def random_mesh(sim: Simulation, n: int, degree: float = 4.0) -> list[int]:
    """A connected random graph: a random spanning tree plus random extra edges."""
    nodes = [sim.add_node() for _ in range(n)]
    edges: set[frozenset[int]] = set()
    rng = sim.rng
    for i in range(1, n):
        edges.add(frozenset((nodes[i], nodes[rng.randrange(i)])))
    target = max(n - 1, int(n * degree / 2))
    while len(edges) < min(target, n * (n - 1) // 2):
        a, b = rng.sample(nodes, 2)
        edges.add(frozenset((a, b)))
    for edge in sorted(tuple(sorted(e)) for e in edges):
        sim.add_link(*edge)
    return nodes


def hub_mesh(
    sim: Simulation,
    n: int,
    *,
    hubs: int = 10,
    hub_links: int | None = None,
    delays: tuple[float, float] = (0.002, 0.03),
) -> list[int]:
    """A public-network shape: ``n - hubs`` ordinary nodes in a connected
    random mesh of degree 3-4 (a random spanning tree, then random edges
    between nodes still below their drawn degree), plus ``hubs`` public
    nodes linked to each other and each to ``hub_links`` random ordinary
    nodes (default n // 50, at least 3). One-way link delays are drawn
    uniformly from ``delays``. Returns node indices; the hubs come first."""
    rng = sim.rng
    nodes = [sim.add_node() for _ in range(n)]
    hub_nodes, plain = nodes[:hubs], nodes[hubs:]
    edges: set[tuple[int, int]] = set()

    def edge(a: int, b: int) -> None:
        edges.add((min(a, b), max(a, b)))

    degree = dict.fromkeys(plain, 0)
    for i in range(1, len(plain)):
        a, b = plain[i], plain[rng.randrange(i)]
        edge(a, b)
        degree[a] += 1
        degree[b] += 1
    target = {x: rng.choice((3, 4)) for x in plain}
    open_nodes = [x for x in plain if degree[x] < target[x]]
    for _ in range(4 * len(plain)):  # bounded: pairing stubs at random
        if len(open_nodes) < 2:
            break
        a, b = rng.sample(open_nodes, 2)
        if (min(a, b), max(a, b)) in edges:
            continue
        edge(a, b)
        for x in (a, b):
            degree[x] += 1
        open_nodes = [x for x in open_nodes if degree[x] < target[x]]
    per_hub = max(3, n // 50) if hub_links is None else hub_links
    for i, h in enumerate(hub_nodes):
        for other in hub_nodes[i + 1 :]:
            edge(h, other)
        for x in rng.sample(plain, min(per_hub, len(plain))):
            edge(h, x)
    for a, b in sorted(edges):
        sim.add_link(a, b, delay=rng.uniform(*delays))
    return nodes


# ---------------------------------------------------------------------- figures
@dataclass
class ScaleFigures:
    nodes: int
    links: int
    wanted_pairs: int
    convergence_s: float | None  # virtual seconds from t=0 until every wanted pair has a route
    packets: int  # control packets until converged
    quiet_packets: int  # ... until routing went quiet (before the first Hello round)
    loop_checks: int
    events: int
    wall_s: float
    cpu_s: float = 0.0  # process CPU time of the run (the machine is shared: wall is an upper bound)
    routes_total: int = 0  # subnets with routes, summed over all nodes' tables (at the end of convergence)
    packets_by_type: dict[str, int] = field(default_factory=dict)  # until converged
    churned: int = 0
    churn_away_s: float | None = None  # virtual seconds from the leave until every remaining wanted pair is routed
    churn_recovery_s: float | None = None  # virtual seconds from rejoin until every wanted pair is routed again
    churn_packets: int = 0  # control packets from the leave until routed again after the rejoin
    sim: Simulation | None = field(default=None, repr=False, compare=False)  # with keep_sim=True


def scale_run(
    n: int,
    *,
    hubs: int = 10,
    destinations: int = 20,
    seed: int = 1,
    loop_sample: int | None = 200,
    churn: float = 0.0,
    timeout: float = 60.0,
    full_check: bool | None = None,
    keep_sim: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ScaleFigures:
    """The public-network scenario of the scale bench (bench/bench_sim.py):
    a ``hub_mesh`` comes up at t=0 and every node asks for ``destinations``
    random others. Loop freedom is checked after every FIB change toward
    ``loop_sample`` random subnets (None: all). With ``churn`` > 0 that
    fraction of the ordinary nodes then leaves at once, stays away 10 s,
    and rejoins; traffic keeps asking for missing routes every second.
    ``full_check`` (default: n <= 300) ends with a loop walk from every node
    toward every subnet in any FIB."""
    # The cyclic GC's full collections walk every object, and a large run
    # holds tens of millions that form no cycles (n^2 routes): off for the
    # run, as the router service freezes its long-lived objects.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        figures = _scale_run(n, hubs, destinations, seed, loop_sample, churn, timeout, full_check, progress)
        if not keep_sim:
            figures.sim = None
        return figures
    finally:
        if gc_was_enabled:
            gc.enable()


def _scale_run(
    n: int,
    hubs: int,
    destinations: int,
    seed: int,
    loop_sample: int | None,
    churn: float,
    timeout: float,
    full_check: bool | None,
    progress: Callable[[str], None] | None,
) -> ScaleFigures:
    started = time.perf_counter()
    cpu_started = time.process_time()
    say = progress or (lambda _text: None)
    sim = Simulation(seed=seed, check_loops=True, all_pairs=False)
    nodes = hub_mesh(sim, n, hubs=hubs)
    rng = sim.rng
    if loop_sample is not None:
        sim.loop_sample = {sim.nodes[i].subnet for i in rng.sample(nodes, min(loop_sample, n))}
    say(f"topology: {n} nodes, {len(sim.links)} links ({time.perf_counter() - started:.1f} s)")
    demand = {src: [d for d in rng.sample(nodes, min(destinations + 1, n)) if d != src][:destinations] for src in nodes}
    sim.request_routes(demand)
    sim.start_traffic(1.0)
    converged = sim.run_until_converged(timeout)
    sent = sim.sent
    packets = sent["total"]
    say(f"converged in {converged} virtual s, {packets} packets ({time.perf_counter() - started:.1f} s)")
    routes_total = sum(x.engine.subnet_count() for x in sim.nodes)
    sim.run_until(HELLO_QUIET_BEFORE)
    figures = ScaleFigures(n, len(sim.links), sim.wanted_pair_count(), converged, packets, sim.sent["total"], 0, 0, 0.0)
    figures.routes_total = routes_total
    figures.packets_by_type = {k: v for k, v in sent.items() if k != "total"}
    if churn > 0:
        leaving = rng.sample(nodes[hubs:], max(1, int((n - hubs) * churn)))
        before = sim.sent["total"]
        left_at = sim.now
        for x in leaving:
            sim.remove_node(x)
        figures.churn_away_s = sim.run_until_converged(timeout)
        sim.run_until(left_at + 10.0)
        for x in leaving:
            sim.rejoin_node(x)
        figures.churned = len(leaving)
        figures.churn_recovery_s = sim.run_until_converged(timeout)
        figures.churn_packets = sim.sent["total"] - before
        say(
            f"churn: {len(leaving)} left (the rest routed again after {figures.churn_away_s} virtual s) "
            f"and rejoined, routed again after {figures.churn_recovery_s} virtual s"
        )
    if n <= 300 if full_check is None else full_check:  # walks every pair
        sim.assert_loop_free()
    figures.loop_checks = sim.loop_checks
    figures.events = sim.events_processed
    figures.wall_s = time.perf_counter() - started
    figures.cpu_s = time.process_time() - cpu_started
    figures.sim = sim
    return figures


@dataclass
class MeshFigures:
    nodes: int
    links: int
    convergence_s: float | None  # virtual seconds from link-up to all pairs routed
    packets: int  # control packets sent until convergence
    packets_by_type: dict[str, int]
    quiet_packets: int  # control packets sent until routing went quiet (Hellos/IHUs included)
    wall_s: float


def mesh_convergence(n: int = 30, *, seed: int = 1, degree: float = 4.0, check_loops: bool = False) -> MeshFigures:
    """Every link comes up at t=0 and every node at once asks for every other
    node's address, as if traffic started with the network."""
    started = time.perf_counter()
    sim = Simulation(seed=seed, check_loops=check_loops)
    random_mesh(sim, n, degree)
    sim.request_all_routes()
    elapsed = sim.run_until_converged(30.0)
    packets = sim.sent["total"]
    by_type = {k: v for k, v in sim.sent.items() if k != "total"}
    sim.run_until(HELLO_QUIET_BEFORE)
    return MeshFigures(n, len(sim.links), elapsed, packets, by_type, sim.sent["total"], time.perf_counter() - started)


HELLO_QUIET_BEFORE = 19.0  # the next Hello round starts at t=20 s


def ring_failover(n: int = 6, *, seed: int = 1, warmup: float = 10.0) -> tuple[float | None, int]:
    """Virtual seconds until every node routes to every other again after one
    ring link is cut, and the control packets sent meanwhile."""
    sim = Simulation(seed=seed, check_loops=True)
    nodes = ring(sim, n)
    sim.request_all_routes()
    sim.run_until_converged(30.0)
    sim.run_for(warmup)
    before = sim.sent["total"]
    sim.remove_link(nodes[0], nodes[1])
    elapsed = sim.run_until_converged(30.0)
    return elapsed, sim.sent["total"] - before


def main(argv: list[str] | None = None) -> int:
    f = mesh_convergence()
    conv = "did not converge" if f.convergence_s is None else f"{f.convergence_s * 1000:.1f} ms"
    print(f"{f.nodes}-node random mesh ({f.links} links, 1 ms one-way delay), links up and all-pairs")
    print(f"route requests at t=0: converged in {conv} virtual time")
    print(f"  control packets until converged: {f.packets} {f.packets_by_type}")
    print(f"  control packets until quiet:     {f.quiet_packets}")
    print(f"  wall time: {f.wall_s:.2f} s")
    elapsed, packets = ring_failover()
    shown = "no recovery" if elapsed is None else f"{elapsed * 1000:.1f} ms"
    print(f"6-node ring, one link cut: every pair routed again after {shown} virtual, {packets} control packets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
