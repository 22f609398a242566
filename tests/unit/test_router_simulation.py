"""Many RouterEngines on a virtual clock (services/router/simulation.py):
convergence, loop freedom after every event, failover, retraction, seqnos."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections import Counter

import pytest

from services.router.engine import RETRACTED_ROUTE_HOLD
from services.router.simulation import (
    RoutingLoop,
    Simulation,
    hub_mesh,
    line,
    mesh_convergence,
    random_mesh,
    ring,
    ring_failover,
    scale_run,
)


def converged_sim(sim: Simulation, timeout: float = 5.0) -> float:
    sim.request_all_routes()
    elapsed = sim.run_until_converged(timeout)
    assert elapsed is not None, f"no convergence; missing {sim.missing_routes()[:10]}"
    return elapsed


def assert_fib_mirrors_match(sim: Simulation) -> None:
    """The FibSet/FibDel stream, replayed, equals each engine's snapshot."""
    for node in sim.nodes:
        if node.alive:
            snapshot = {s.key: e.next_hop for s, e in node.engine.fib_snapshot().items()}  # fib: by key
            assert node.fib == snapshot, f"node {node.index}"


def bridges_free_links(sim: Simulation) -> list[tuple[int, int]]:
    """Live links whose removal keeps the live graph connected."""
    result = []
    live = [n.index for n in sim.nodes if n.alive]
    for link in sim.links:
        if not link.up:
            continue
        seen, stack = {live[0]}, [live[0]]
        while stack:
            x = stack.pop()
            for y in sim.neighbours(x):
                if {x, y} != {link.a, link.b} and y not in seen:
                    seen.add(y)
                    stack.append(y)
        if len(seen) == len(live):
            result.append((link.a, link.b))
    return result


def connected_without_node(sim: Simulation, gone: int) -> bool:
    live = [n.index for n in sim.nodes if n.alive and n.index != gone]
    seen, stack = {live[0]}, [live[0]]
    while stack:
        for y in sim.neighbours(stack.pop()):
            if y != gone and y not in seen:
                seen.add(y)
                stack.append(y)
    return len(seen) == len(live)


# ---------------------------------------------------------------------- convergence
def test_line_of_5_converges_along_the_line() -> None:
    sim = Simulation(seed=1, check_wire=True, check_loops=True)
    nodes = line(sim, 5)
    elapsed = converged_sim(sim)
    assert elapsed < 0.1
    assert sim.path(nodes[0], nodes[4]) == nodes
    assert sim.path(nodes[4], nodes[1]) == [4, 3, 2, 1]
    sim.assert_loop_free()
    assert_fib_mirrors_match(sim)
    # the FIB carries each destination's key and never our own subnet
    for node in sim.nodes:
        fib = node.engine.fib_snapshot()
        assert node.subnet not in fib
        for other in sim.nodes:
            if other is not node:
                assert fib[other.subnet].public_key == other.engine.public_key


def test_ring_of_6_converges_on_shortest_paths() -> None:
    sim = Simulation(seed=2, check_wire=True, check_loops=True)
    nodes = ring(sim, 6)
    converged_sim(sim)
    for a in nodes:
        for b in nodes:
            if a != b:
                path = sim.path(a, b)
                assert path is not None and len(path) - 1 == min((a - b) % 6, (b - a) % 6)
    assert_fib_mirrors_match(sim)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_mesh_of_30_converges_loop_free(seed: int) -> None:
    sim = Simulation(seed=seed, check_loops=True)
    random_mesh(sim, 30, 4.0)
    elapsed = converged_sim(sim)
    assert elapsed < 1.0
    sim.assert_loop_free()
    assert sim.loop_checks > 0
    assert_fib_mirrors_match(sim)


def test_mesh_figures_for_performance_doc(capsys: pytest.CaptureFixture[str]) -> None:
    figures = mesh_convergence(30, seed=1, check_loops=True)
    elapsed, packets = ring_failover(6, seed=1)
    assert figures.convergence_s is not None and figures.convergence_s < 1.0
    assert elapsed is not None and elapsed < 1.0
    with capsys.disabled():
        print(
            f"\n[router figures] 30-node mesh ({figures.links} links, 1 ms links): converged in "
            f"{figures.convergence_s:.3f} virtual s, {figures.packets} control packets {figures.packets_by_type}; "
            f"6-ring link cut rerouted in {elapsed:.3f} virtual s with {packets} packets"
        )


def test_simulation_is_deterministic() -> None:
    runs = []
    for _ in range(2):
        sim = Simulation(seed=7)
        random_mesh(sim, 12, 3.0)
        elapsed = converged_sim(sim)
        runs.append((elapsed, dict(sim.sent), [sorted(map(str, n.fib)) for n in sim.nodes]))
    assert runs[0] == runs[1]


HASH_SEED_PROBE = """
from services.router.simulation import scale_run
f = scale_run(120, hubs=4, destinations=20, seed=3, loop_sample=50, churn=0.05, timeout=30.0)
print(f.convergence_s, f.packets, f.quiet_packets, f.loop_checks, f.events, f.routes_total,
      f.churn_away_s, f.churn_recovery_s, f.churn_packets, sorted(f.packets_by_type.items()))
"""


def test_scale_runs_repeat_under_any_hash_seed() -> None:
    """A failure of the suite's 1,000-node check must be reproducible from
    its seed alone, and pytest's hash seed differs per run: the same
    scenario with churn gives the same figures, to the packet, under three
    hash seeds (no decision may depend on the iteration order of a set or
    dict of bytes or str)."""
    outputs = set()
    for hash_seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-c", HASH_SEED_PROBE], capture_output=True, text=True, timeout=120, env=env
        )
        assert out.returncode == 0, out.stderr
        outputs.add(out.stdout)
    assert len(outputs) == 1, outputs


def test_late_joiner_becomes_reachable_on_demand() -> None:
    sim = Simulation(seed=3, check_loops=True)
    nodes = ring(sim, 5)
    converged_sim(sim)
    sim.run_for(5.0)
    newcomer = sim.add_node()
    sim.add_link(newcomer, nodes[2])
    sim.run_for(1.0)
    # Its own-subnet announcement reaches everyone through triggered updates...
    assert all(sim.path(n, newcomer) is not None for n in nodes)
    # ...but on link-up it only learns its neighbour's subnet (routing is on demand).
    assert sim.nodes[newcomer].fib.keys() == {sim.nodes[nodes[2]].key}
    sim.request_route(newcomer, sim.nodes[nodes[0]].address)  # traffic asks
    sim.run_for(0.1)
    assert sim.path(newcomer, nodes[0]) == [newcomer, nodes[2], nodes[1], nodes[0]]


# ---------------------------------------------------------------------- loop checker
def test_loop_checker_detects_a_forwarding_loop() -> None:
    sim = Simulation(seed=4)
    a, b, c = ring(sim, 3)
    converged_sim(sim)
    key = sim.nodes[c].key
    peer_ab = sim.find_link(a, b).peer_at_a
    peer_ba = sim.find_link(a, b).peer_at_b
    sim.nodes[a].fib[key] = peer_ab
    sim.nodes[b].fib[key] = peer_ba
    with pytest.raises(RoutingLoop):
        sim.path(a, c)
    with pytest.raises(RoutingLoop):
        sim.assert_loop_free()


# ---------------------------------------------------------------------- failover
@pytest.mark.parametrize("size", [4, 5, 6, 8])
def test_ring_link_cut_reroutes_within_one_second(size: int) -> None:
    sim = Simulation(seed=size, check_wire=True, check_loops=True)
    nodes = ring(sim, size)
    converged_sim(sim)
    sim.run_for(10.0)
    sim.remove_link(nodes[0], nodes[1])
    assert not sim.all_converged()  # the cut did break something
    elapsed = sim.run_until_converged(1.0)
    assert elapsed is not None and elapsed < 1.0, sim.missing_routes()
    assert sim.path(nodes[0], nodes[1]) == [nodes[0], *reversed(nodes[2:]), nodes[1]]
    sim.run_for(30.0)  # and it stays that way, loop-free
    assert sim.all_converged()
    assert_fib_mirrors_match(sim)


def test_ring_cut_needs_a_seqno_bump_at_the_originator() -> None:
    sim = Simulation(seed=6, check_loops=True)
    nodes = ring(sim, 6)
    converged_sim(sim)
    sim.run_for(10.0)
    seqnos = [n.engine.seqno for n in sim.nodes]
    requests = sim.sent["seqno_request"]
    sim.remove_link(nodes[0], nodes[1])
    assert sim.run_until_converged(1.0) is not None
    # Node 0 advertised node 1's route at its best metric; the longer way round is
    # infeasible until node 1 bumps its seqno on request.
    assert sim.sent["seqno_request"] > requests
    assert sim.nodes[nodes[1]].engine.seqno > seqnos[nodes[1]]
    assert sim.nodes[nodes[0]].engine.seqno > seqnos[nodes[0]]
    route = next(r for r in sim.nodes[nodes[0]].engine.selected_routes() if r.subnet == sim.nodes[nodes[1]].subnet)
    assert route.seqno > seqnos[nodes[1]]


@pytest.mark.parametrize("seed", [11, 12])
def test_mesh_link_cuts_reroute_within_one_second(seed: int) -> None:
    sim = Simulation(seed=seed, check_loops=True)
    random_mesh(sim, 30, 3.0)
    converged_sim(sim)
    sim.run_for(5.0)
    rng = random.Random(seed)
    for _ in range(8):
        a, b = rng.choice(bridges_free_links(sim))
        sim.remove_link(a, b)
        elapsed = sim.run_until_converged(1.0)
        assert elapsed is not None, f"cut {a}-{b}: missing {sim.missing_routes()[:10]}"
        sim.run_for(5.0)
    assert_fib_mirrors_match(sim)


def test_rapid_cuts_recover_despite_bump_rate_limit() -> None:
    sim = Simulation(seed=21, check_loops=True)
    random_mesh(sim, 30, 3.0)
    converged_sim(sim)
    sim.run_for(5.0)
    rng = random.Random(21)
    worst = 0.0
    for _ in range(8):
        a, b = rng.choice(bridges_free_links(sim))
        sim.remove_link(a, b)
        elapsed = sim.run_until_converged(20.0)
        assert elapsed is not None, sim.missing_routes()[:10]
        worst = max(worst, elapsed)
        sim.run_for(0.5)  # next cut well within the originators' 4 s bump limit
    assert worst < 10.0


def test_dead_link_detected_without_ihu_and_rerouted() -> None:
    sim = Simulation(seed=8, check_loops=True)
    nodes = ring(sim, 5)
    converged_sim(sim)
    sim.run_for(3.0)
    link = sim.find_link(nodes[0], nodes[1])
    sim.blackhole_link(nodes[0], nodes[1])
    start = sim.now
    assert sim.run_until(start + 60.0, lambda: not link.up)
    assert 23.0 <= sim.now - start <= 43.0  # last IHU was at most 20 s before the cut
    assert sim.run_until_converged(1.0) is not None
    assert sum(n.engine.counters["peers_dead"] for n in sim.nodes) >= 1


# ---------------------------------------------------------------------- retraction
@pytest.mark.parametrize("seed", [31, 32])
def test_removed_node_disappears_from_every_fib(seed: int) -> None:
    sim = Simulation(seed=seed, check_loops=True)
    random_mesh(sim, 20, 3.0)
    converged_sim(sim)
    sim.run_for(5.0)
    # the best-connected node whose removal leaves the rest connected
    victim = max((n for n in range(20) if connected_without_node(sim, n)), key=lambda n: len(sim.neighbours(n)))
    subnet = sim.nodes[victim].subnet
    key = subnet.key
    sim.remove_node(victim)
    start = sim.now
    sim.run_for(0.05)
    # At once: nobody forwards toward it any more...
    assert all(n.fib.get(key) is None for n in sim.nodes if n.alive)
    # ...and routes that went through it are rerouted quickly.
    assert sim.run_until_converged(1.0) is not None, sim.missing_routes()[:10]
    sim.run_until(start + RETRACTED_ROUTE_HOLD + 0.1)
    # Within the retraction hold the subnet is gone from every FIB.
    assert sim.subnet_in_any_fib(subnet) == []
    sim.run_for(60.0)  # the engines' retries find nothing to resurrect
    assert sim.subnet_in_any_fib(subnet) == []
    assert sim.all_converged()


def test_partition_heals_without_traffic() -> None:
    sim = Simulation(seed=9, check_loops=True)
    nodes = line(sim, 6)
    converged_sim(sim)
    sim.run_for(5.0)
    sim.remove_link(nodes[2], nodes[3])
    sim.run_for(2.0)
    assert sim.path(nodes[0], nodes[5]) is None
    sim.add_link(nodes[2], nodes[3])
    elapsed = sim.run_until_converged(20.0)
    assert elapsed is not None, sim.missing_routes()
    assert sim.path(nodes[0], nodes[5]) == nodes


@pytest.mark.parametrize("seed", [6, 7])
def test_churn_is_loop_free_after_every_event(seed: int) -> None:
    """Link cuts and node removals, loop-checked after every delivered event.
    (With the feasibility condition disabled these seeds loop within ms.)"""
    sim = Simulation(seed=seed, check_loops=True)
    random_mesh(sim, 30, 3.0)
    converged_sim(sim)
    sim.run_for(5.0)
    rng = random.Random(seed)
    for _ in range(8):
        if rng.random() < 0.5:
            sim.remove_link(*rng.choice(bridges_free_links(sim)))
        else:
            candidates = [n.index for n in sim.nodes if n.alive and connected_without_node(sim, n.index)]
            sim.remove_node(rng.choice(candidates))
        sim.run_for(3.0)
    assert sim.loop_checks > 1000
    # The last cut may need a seqno bump that the originator's 4 s rate limit defers.
    assert sim.run_until_converged(5.0) is not None, sim.missing_routes()[:10]
    sim.assert_loop_free()


# ---------------------------------------------------------------------- public-network shape (scale)
def test_hub_mesh_is_connected_with_the_drawn_degrees() -> None:
    sim = Simulation(seed=3, all_pairs=False)
    nodes = hub_mesh(sim, 60, hubs=4)
    plain_degrees = [len(sim.neighbours(x)) for x in nodes[4:]]
    assert min(plain_degrees) >= 1 and sum(plain_degrees) / len(plain_degrees) >= 2.5
    assert all(len(sim.neighbours(h)) >= 3 + 3 for h in nodes[:4])  # other hubs plus >= 3 ordinary nodes
    seen, stack = {nodes[0]}, [nodes[0]]
    while stack:
        for y in sim.neighbours(stack.pop()):
            if y not in seen:
                seen.add(y)
                stack.append(y)
    assert len(seen) == 60


def test_hub_mesh_with_demand_converges_loop_free_and_recovers_from_churn() -> None:
    """The scale bench's scenario, small: a degree 3-4 mesh with hubs, each
    node asking for 20 destinations, loop checks after every FIB change
    toward every subnet, then 5 % of the ordinary nodes leave and rejoin."""
    f = scale_run(80, hubs=4, destinations=20, seed=5, loop_sample=None, churn=0.05, timeout=30.0)
    assert f.convergence_s is not None
    assert f.wanted_pairs == 80 * 20
    assert f.loop_checks > 0
    assert f.churned == 3
    assert f.churn_recovery_s is not None  # every wanted pair routed again
    print(
        f"\n[router figures] 80-node hub mesh, 20 destinations each: converged in {f.convergence_s:.3f} virtual s, "
        f"{f.quiet_packets / f.nodes:.0f} control packets per node; churn of {f.churned}: "
        f"routed again {f.churn_recovery_s:.3f} virtual s after rejoin, {f.churn_packets} packets; "
        f"wall {f.wall_s:.1f} s"
    )


def test_rejoined_node_is_a_fresh_process_with_the_same_key() -> None:
    sim = Simulation(seed=9, check_loops=True, all_pairs=False)
    nodes = line(sim, 4)
    sim.request_routes({nodes[0]: [nodes[3]], nodes[3]: [nodes[0]]})
    assert sim.run_until_converged(5.0) is not None
    old_rid = sim.nodes[nodes[3]].engine.router_id
    sim.remove_node(nodes[3])
    sim.run_for(10.0)
    assert sim.nodes[nodes[0]].fib.get(sim.nodes[nodes[3]].key) is None  # the route went with the node
    sim.rejoin_node(nodes[3])
    engine = sim.nodes[nodes[3]].engine
    assert engine.router_id != old_rid and engine.router_id[:32] == old_rid[:32]
    assert sim.run_until_converged(10.0) is not None, sim.missing_routes()


# The suite size (#14). 1,000 nodes take 95-190 s CPU and ~1.7 GiB on
# the 2-core VM (quiet / loaded), so the check runs in a child process at nice 19
# beside the rest of the suite (tests/background.py) and this test, moved to
# the end, only collects its result: on a 2-core machine the integration
# tests leave a core mostly idle, and the suite does not grow by 3 minutes.
PUBLIC_MESH_NODES = 1000


def public_mesh_check(n: int = PUBLIC_MESH_NODES) -> dict[str, object]:
    """The scale bench's scenario at suite size: a degree 3-4 mesh plus 10
    hubs, every node asking for 20 random destinations at t=0, loop checks
    after every FIB change toward 200 sampled subnets; then 1 % of the
    ordinary nodes leave and rejoin. Returns the figures."""
    f = scale_run(n, hubs=10, destinations=20, seed=2, loop_sample=200, churn=0.01, timeout=30.0, keep_sim=True)
    sim = f.sim
    assert sim is not None
    assert f.convergence_s is not None, sim.missing_routes()[:10]
    assert f.churn_away_s is not None and f.churn_recovery_s is not None, sim.missing_routes()[:10]
    assert f.churned == (n - 10) // 100
    assert f.loop_checks > 10_000
    # Every node reaches every destination it asked for, along a loop-free
    # path of FIB next hops (``path`` raises RoutingLoop on a cycle).
    pairs = 0
    for src, dsts in sim.demand.items():
        for dst in dsts:
            path = sim.path(src, dst)
            assert path is not None and path[0] == src and path[-1] == dst, (src, dst)
            pairs += 1
    assert pairs == n * 20
    # Every route spreads to every node (PROTOCOL.md 6.4 step 9): n routes a table.
    assert f.routes_total >= n * (n - 1) * 0.99
    # The engines' own counters agree with what the simulator carried, and no
    # table limit or filter was hit by this honest network.
    totals: Counter[str] = Counter(sim.retired_counters)
    for node in sim.nodes:
        totals.update(node.engine.counters)
    sent = sim.sent
    assert totals["tx_update"] == sent["update"]
    assert totals["tx_route_request"] == sent["route_request"]
    assert totals["rx_update"] <= sent["update"]
    bad = {k: v for k, v in totals.items() if k.startswith(("drop_", "update_filtered_router_id")) or "refused" in k}
    assert bad == {}
    return {
        "nodes": n,
        "convergence_s": f.convergence_s,
        "packets_per_node": f.quiet_packets / n,
        "routes_total": f.routes_total,
        "loop_checks": f.loop_checks,
        "churned": f.churned,
        "churn_away_s": f.churn_away_s,
        "churn_recovery_s": f.churn_recovery_s,
        "wall_s": f.wall_s,
        "cpu_s": f.cpu_s,
    }


@pytest.mark.background("tests.unit.test_router_simulation:public_mesh_check")
@pytest.mark.timeout(1300)
def test_public_network_mesh_converges_loop_free_and_survives_churn(background_figures: dict[str, object]) -> None:
    """1,000 nodes: see ``public_mesh_check``, run in the background."""
    f = background_figures
    assert f["nodes"] == PUBLIC_MESH_NODES
    print(
        f"\n[router figures] {f['nodes']}-node public mesh: converged in {f['convergence_s']:.3f} virtual s, "
        f"{f['packets_per_node']:.0f} control packets per node, {f['routes_total']} routes; churn of {f['churned']}: "
        f"rest routed {f['churn_away_s']:.3f} s after the leave, all {f['churn_recovery_s']:.3f} s after the rejoin; "
        f"wall {f['wall_s']:.1f} s, CPU {f['cpu_s']:.1f} s (in the background, nice 19)"
    )
