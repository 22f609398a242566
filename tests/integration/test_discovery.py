"""Link-local discovery between network namespaces (PROTOCOL.md 2.7): no
--peers anywhere. a and b, joined by a veth pair, find each other by
beacon, peer and route; c, joined to b by a veth pair too but restricted
with --peer-discovery-interface to an interface of its own, neither
announces itself to b nor hears b."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from common.wire.beacon import Beacon

from .netns import NODE_PORT, NetNode, Topology, cleanup_stale, in_netns, ping, privileged_marks
from .netns import wait_for as wait

pytestmark = privileged_marks("discovery tests")


@pytest.fixture(scope="module")
def lan(request: pytest.FixtureRequest) -> Iterator[Topology]:
    cleanup_stale()
    topo = Topology(["a", "b", "c"])
    try:
        topo.connect("a", "b", 1)
        topo.connect("b", "c", 2)
        # c's own interface pair: up, multicast, link-local, leading nowhere
        topo.exec("c", ["ip", "link", "add", "xc0", "type", "veth", "peer", "name", "xc1"], check=True)
        for dev in ("xc0", "xc1"):
            topo.exec("c", ["ip", "link", "set", dev, "up"], check=True)
        topo.add_node("a", discovery=True)
        topo.add_node("b", discovery=True)
        topo.add_node("c", tun=False, discovery=True, extra=["--peer-discovery-interface", "xc0"])
        yield topo
    finally:
        if request.session.testsfailed:
            for node in topo.nodes.values():
                print(f"\n===== log of {node.name} ({node.ns}) =====\n{node.log_tail()}")
        topo.close()


def discovered(node: NetNode) -> list[dict[str, object]]:
    return [p for p in node.rpc("peerd-tcp", "list_peers") if p["type"] == "linkLocalDiscovery"]


def alive(node: NetNode) -> int:
    return sum(1 for p in node.rpc("peerd-tcp", "list_peers") if p["connectionState"] == "alive")


def send_beacon(topo: Topology, ns: str, dev: str, port: int) -> None:
    """A beacon from inside ``ns`` out of ``dev`` (a stranger's router id)."""

    def send() -> None:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 1)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)  # not to b's own discovery
            s.sendto(Beacon(port, bytes(range(40))).encode(), ("ff02::cafe", 9650, 0, socket.if_nametoindex(dev)))

    in_netns(topo.ns(ns), send)


def test_discover_peer_and_route_without_peers(lan: Topology) -> None:
    a, b = lan.nodes["a"], lan.nodes["b"]
    a.start()
    b.start()
    a.wait_ready()
    b.wait_ready()
    wait("a and b to find and link each other", lambda: alive(a) >= 1 and alive(b) >= 1, 40)
    # the node started first heard the other's start-up beacon and dialled it
    # (the other heard nothing yet: the next beacons are 60 s away, as in the reference)
    entries = discovered(a) + discovered(b)
    assert entries
    for entry in entries:
        addr = entry["endpoint"]["addr"]["socket"]  # type: ignore[index]
        assert entry["endpoint"]["proto"] == "tcp" and addr.startswith("[fe80::"), entry  # type: ignore[index]
        assert addr.endswith(f"]:{NODE_PORT}") and "%" in addr  # dialled on the interface it came from
    assert sum(n.counters("peerd-tcp").get("discovery_beacons", 0) for n in (a, b)) >= 1
    wait("a's route to b", lambda: b.subnet in a.selected() and a.subnet in b.selected(), 30)
    assert ping(lan, "a", b.address), "no overlay ping a -> b over the discovered link"


def test_restricted_interface_neither_announces_nor_listens(lan: Topology) -> None:
    b, c = lan.nodes["b"], lan.nodes["c"]
    if b.proc is None:
        pytest.skip("needs the nodes of the first test")
    c.start().wait_ready()
    wait("c to join and beacon on xc0", lambda: c.counters("peerd-tcp").get("discovery_beacons_sent", 0) >= 1, 20)
    # a stranger's beacon out of b on the veth to c, and (the control) out of b to a
    send_beacon(lan, "b", "vbc", 4000)
    send_beacon(lan, "b", "vba", 4000)
    a = lan.nodes["a"]
    wait("a to hear the control beacon", lambda: any("4000" in str(p["endpoint"]) for p in discovered(a)), 10)
    assert c.counters("peerd-tcp").get("discovery_beacons", 0) == 0  # c does not listen on vcb
    # c's beacons went out of xc0 only: b, which dials what it discovers at once, never dialled c
    # (c beaconed before the control beacon went out, and a has heard that one already)
    assert discovered(c) == [] and alive(c) == 0
    assert c.counters("peerd-tcp").get("links_opened", 0) == 0
