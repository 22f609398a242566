"""Deterministic multi-node simulation of RouterEngines on a virtual clock.

Links are bidirectional FIFO pipes with a fixed one-way delay; everything
happens in one event queue ordered by (time, insertion order), so a run with
the same seed is reproducible bit for bit. Used by the unit tests (routing
behaviour, loop freedom after every event) and by benchmarks.

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

import heapq
import ipaddress
import itertools
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from common.identity import address_of
from common.wire.subnet import Subnet
from common.wire.tlv import Tlv, decode_tlv

from .engine import FibDel, FibSet, PeerInfo, RouterEngine

_DELIVER = 0
_TIMER = 1

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
    fib: dict[Subnet, str | None] = field(default_factory=dict)  # mirror of the published FIB
    timer_at: float | None = None

    @property
    def subnet(self) -> Subnet:
        return self.engine.own_subnet

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
    ) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.delay = delay
        self.static_cost = static_cost
        self.check_wire = check_wire  # round-trip every TLV through the codec
        self.check_loops = check_loops  # loop check after every event
        self.now = start
        self.nodes: list[SimNode] = []
        self.links: list[SimLink] = []
        self.sent: Counter[str] = Counter()  # control packets by TLV type, plus "total"
        self.events_processed = 0
        self.loop_checks = 0
        self._queue: list[tuple[float, int, int, object]] = []
        self._seq = itertools.count()
        self._owner: dict[Subnet, int] = {}
        self._link_ids = itertools.count()
        self._missing = 0
        for _ in range(n_nodes):
            self.add_node()

    # ------------------------------------------------------------------ topology
    def add_node(self) -> int:
        index = len(self.nodes)
        while True:
            public_key = self.rng.randbytes(32)
            router_id = public_key + b"\0\0" + self.rng.randbytes(6)
            engine = RouterEngine(public_key, router_id, self.now, rng=random.Random(self.rng.random()))
            if engine.own_subnet not in self._owner:
                break
        node = SimNode(index, engine, address_of(public_key))
        self.nodes.append(node)
        self._owner[engine.own_subnet] = index
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
        node.alive = False
        for link in list(node.links.values()):
            if link.up:
                self._close(link, notify_a=link.a != n, notify_b=link.b != n)
        self._recount_missing()

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

    # ------------------------------------------------------------------ running
    def run_until(self, t: float, stop: Callable[[], bool] | None = None) -> bool:
        """Process events up to virtual time ``t``; True if ``stop`` became true first."""
        queue = self._queue
        while queue and queue[0][0] <= t:
            when, _, kind, data = heapq.heappop(queue)
            self.now = when
            self._process(kind, data)
            if stop is not None and stop():
                return True
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

    def _process(self, kind: int, data: Any) -> None:
        self.events_processed += 1
        if kind == _DELIVER:
            link, dst, peer_id, tlv = data
            if not link.up or link.blackhole:
                return
            node = self.nodes[dst]
            node.engine.receive_tlv(peer_id, tlv, self.now)
            self._drain(node)
        else:
            node = self.nodes[data]
            if not node.alive:
                return
            if node.timer_at is not None and node.timer_at <= self.now:
                node.timer_at = None
            due = node.engine.get_timer()
            if due is not None and due <= self.now:
                node.engine.handle_timer(self.now)
            self._drain(node)

    def _drain(self, node: SimNode) -> None:
        engine = node.engine
        for peer_id, tlv in engine.tlvs_to_send():
            link = node.links.get(peer_id)
            if link is None or not link.up:
                raise AssertionError(f"node {node.index} sent to unknown or closed peer {peer_id}")
            name = _TLV_NAMES[tlv.TYPE]
            self.sent[name] += 1
            self.sent["total"] += 1
            if self.check_wire:
                tlv = _wire_roundtrip(tlv)
            if link.a == node.index:
                dst, dst_peer = link.b, link.peer_at_b
            else:
                dst, dst_peer = link.a, link.peer_at_a
            heapq.heappush(self._queue, (self.now + link.delay, next(self._seq), _DELIVER, (link, dst, dst_peer, tlv)))
        changed = engine.fib_changes()
        for change in changed:
            self._apply_fib(node, change)
        if self.check_loops:
            for subnet in {c.subnet for c in changed}:
                self._check_path(node.index, subnet)
        for peer_id in engine.peers_to_close():
            link = node.links[peer_id]
            if link.up:
                self._close(link, notify_a=link.a != node.index, notify_b=link.b != node.index)
        due = engine.get_timer()
        if due is not None and (node.timer_at is None or due < node.timer_at):
            due = max(due, self.now)
            node.timer_at = due
            heapq.heappush(self._queue, (due, next(self._seq), _TIMER, node.index))

    def _apply_fib(self, node: SimNode, change: FibSet | FibDel) -> None:
        before = node.fib.get(change.subnet) is not None
        if isinstance(change, FibSet):
            node.fib[change.subnet] = change.entry.next_hop
        else:
            node.fib.pop(change.subnet, None)
        after = node.fib.get(change.subnet) is not None
        owner = self._owner.get(change.subnet)
        if before != after and owner is not None and owner != node.index and node.alive and self.nodes[owner].alive:
            self._missing += -1 if after else 1

    # ------------------------------------------------------------------ checks
    def _recount_missing(self) -> None:
        live = [n for n in self.nodes if n.alive]
        self._missing = sum(1 for x in live for y in live if x is not y and x.fib.get(y.subnet) is None)

    def all_converged(self) -> bool:
        """Every live node has a selected route to every other live node's subnet."""
        return self._missing == 0

    def missing_routes(self) -> list[tuple[int, int]]:
        live = [n for n in self.nodes if n.alive]
        return [(x.index, y.index) for x in live for y in live if x is not y and x.fib.get(y.subnet) is None]

    def path(self, src: int, dst: int) -> list[int] | None:
        """Nodes visited following FIB next hops from src toward dst's subnet; None on a black hole."""
        subnet = self.nodes[dst].subnet
        hops = [src]
        seen = {src}
        current = src
        while current != dst:
            next_hop = self.nodes[current].fib.get(subnet)
            if next_hop is None:
                return None
            current = self.nodes[current].neighbour(next_hop)
            if current in seen:
                raise RoutingLoop(f"loop toward node {dst} ({subnet}): {[*hops, current]}")
            seen.add(current)
            hops.append(current)
        return hops

    def _check_path(self, start: int, subnet: Subnet) -> None:
        """A new loop toward ``subnet`` must pass through the node whose FIB just changed."""
        self.loop_checks += 1
        owner = self._owner.get(subnet)
        seen = {start}
        current = start
        hops = [start]
        while current != owner:
            node = self.nodes[current]
            next_hop = node.fib.get(subnet)
            if next_hop is None:
                return
            link = node.links.get(next_hop)
            if link is None or not link.up:
                raise AssertionError(f"node {current} forwards {subnet} over closed link {next_hop}")
            current = node.neighbour(next_hop)
            if current in seen:
                raise RoutingLoop(f"loop toward {subnet} at t={self.now:.6f}: {[*hops, current]}")
            seen.add(current)
            hops.append(current)

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


# ---------------------------------------------------------------------- figures
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
