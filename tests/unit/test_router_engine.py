"""RouterEngine against the rules of PROTOCOL.md 2.9 and 6, one rule at a time.

Each test drives a single engine by hand: peers are plain ids, remote nodes
are identities whose router ids own their subnets, and time is whatever the
test passes as ``now``. A fresh link costs 1000 (initial smoothed RTT) plus
its static cost.
"""

from __future__ import annotations

import ipaddress
import random

import pytest

from common.identity import address_of, subnet_of
from common.wire.subnet import Subnet
from common.wire.tlv import HELLO_UNICAST, Hello, Ihu, RouteRequest, SeqNoRequest, Tlv, Update
from services.router import engine as engine_mod
from services.router.engine import FibDel, FibEntry, FibSet, PeerInfo, RouterEngine, RouteView
from services.router.metric import INFINITE

FRESH_COST = 1010  # 1000 + static cost 10


class Ident:
    """A remote node: key, router id, /64."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(seed)
        self.pk = rng.randbytes(32)
        self.rid = self.pk + b"\0\0" + rng.randbytes(6)
        self.address = address_of(self.pk)
        self.subnet = subnet_of(self.address)

    def update(
        self, *, seqno: int = 0, metric: int = 0, interval: int = 30_000, subnet: Subnet | None = None
    ) -> Update:
        return Update(0, interval, seqno, metric, subnet or self.subnet, self.rid)


ME, A, B, C = Ident(100), Ident(101), Ident(102), Ident(103)


def new_engine(*peers: str, now: float = 0.0, static_cost: int = 10) -> RouterEngine:
    e = RouterEngine(ME.pk, ME.rid, now)
    for p in peers:
        e.peer_up(PeerInfo(p, static_cost, f"link {p}"), now)
    drain(e)
    return e


def drain(e: RouterEngine) -> None:
    e.tlvs_to_send()
    e.fib_changes()


def sent(e: RouterEngine, kind: type | None = None) -> list[tuple[str, Tlv]]:
    return [(p, t) for p, t in e.tlvs_to_send() if kind is None or isinstance(t, kind)]


def retraction(subnet: Subnet, rid: bytes = B.rid, seqno: int = 0) -> Update:
    return Update(0, 30_000, seqno, INFINITE, subnet, rid)


def learn(e: RouterEngine, peer: str, ident: Ident, *, metric: int = 0, seqno: int = 0, now: float = 1.0) -> None:
    e.receive_tlv(peer, ident.update(metric=metric, seqno=seqno), now)
    drain(e)


# ---------------------------------------------------------------------- construction
def test_router_id_must_carry_the_public_key() -> None:
    with pytest.raises(ValueError):
        RouterEngine(ME.pk, A.rid, 0.0)


def test_own_subnet_and_identity() -> None:
    e = new_engine()
    assert e.own_subnet == ME.subnet
    assert e.router_id == ME.rid
    assert e.seqno == 0
    assert e.fib_snapshot() == {}


# ---------------------------------------------------------------------- Hello / IHU / link cost (2.9)
def test_peer_up_sends_hello_and_own_update_at_once() -> None:
    e = new_engine()
    e.peer_up(PeerInfo("p1", 10, "TCP a <-> b"), 0.0)
    assert e.tlvs_to_send() == [
        ("p1", Hello(HELLO_UNICAST, 0, 2000)),
        ("p1", Update(0, 30_000, 0, 0, ME.subnet, ME.rid)),
    ]
    assert e.peers == [PeerInfo("p1", 10, "TCP a <-> b")]
    assert e.link_cost("p1") == FRESH_COST
    assert e.feasibility_distance(ME.subnet, ME.rid) == (0, 0)  # our own update went through the source table
    assert e.get_timer() == 20.0


def test_hello_every_20_seconds_with_increasing_seqno() -> None:
    e = new_engine("p1")
    e.handle_timer(19.9)
    assert sent(e, Hello) == []
    e.handle_timer(20.0)
    assert sent(e, Hello) == [("p1", Hello(HELLO_UNICAST, 1, 2000))]
    e.handle_timer(40.0)
    assert sent(e, Hello) == [("p1", Hello(HELLO_UNICAST, 2, 2000))]


def test_every_hello_is_answered_with_an_ihu_carrying_the_link_cost() -> None:
    e = new_engine("p1", static_cost=7)
    e.receive_tlv("p1", Hello(HELLO_UNICAST, 5, 2000), 1.0)
    assert e.tlvs_to_send() == [("p1", Ihu(1007, 6000, None))]
    e.receive_tlv("p1", Hello(0, 6, 1), 1.1)  # contents ignored
    assert e.tlvs_to_send() == [("p1", Ihu(1007, 6000, None))]


def test_ihu_rtt_sample_smooths_link_cost() -> None:
    e = new_engine("p1")
    e.receive_tlv("p1", Ihu(0, 6000), 0.05)  # 50 ms after the Hello sent at peer_up
    assert e.link_cost("p1") == (1000 * 9 + 50) // 10 + 10  # 905 + 10
    e.receive_tlv("p1", Ihu(0, 6000), 0.1)  # unsolicited: still measured from the last Hello (quirk 6)
    assert e.link_cost("p1") == (905 * 9 + 100) // 10 + 10
    e.handle_timer(20.0)
    e.receive_tlv("p1", Ihu(0, 6000), 20.002)
    assert e.link_cost("p1") == (824 * 9 + 2) // 10 + 10


def test_rtt_sample_wraps_at_16_bits() -> None:
    e = new_engine("p1")
    e.receive_tlv("p1", Ihu(0, 6000), 66.0)  # 66000 ms -> 466
    assert e.link_cost("p1") == (1000 * 9 + 466) // 10 + 10


def test_two_engines_measure_each_other() -> None:
    a, b = RouterEngine(A.pk, A.rid, 0.0), RouterEngine(B.pk, B.rid, 0.0)
    a.peer_up(PeerInfo("b", 10), 0.0)
    b.peer_up(PeerInfo("a", 10), 0.0)
    pending = [(0.0, "a", t) for _, t in a.tlvs_to_send()] + [(0.0, "b", t) for _, t in b.tlvs_to_send()]
    while pending:  # 10 ms one-way
        t, src, tlv = pending.pop(0)
        dst, via = (b, "a") if src == "a" else (a, "b")
        dst.receive_tlv(via, tlv, t + 0.01)
        pending += [(t + 0.01, "b" if src == "a" else "a", x) for _, x in dst.tlvs_to_send()]
    assert a.link_cost("b") == (1000 * 9 + 20) // 10 + 10
    assert b.link_cost("a") == a.link_cost("b")
    assert a.fib_snapshot() == {B.subnet: FibEntry("b", B.pk)}
    assert b.fib_snapshot() == {A.subnet: FibEntry("a", A.pk)}


def test_dead_peer_after_43_seconds_without_ihu() -> None:
    e = new_engine("p1", "p2")
    learn(e, "p1", A, now=0.0)
    for t in (20.0, 40.0):
        e.handle_timer(t)
    e.receive_tlv("p2", Ihu(0, 6000), 40.01)
    e.handle_timer(42.99)
    assert e.peers_to_close() == []
    e.handle_timer(43.0)
    assert e.peers_to_close() == ["p1"]
    assert [p.peer_id for p in e.peers] == ["p2"]
    assert e.fib_snapshot()[A.subnet].next_hop is None  # its route was retracted at once
    e.handle_timer(83.0)
    assert e.peers_to_close() == []  # p2's IHU at 40.01 keeps it alive until 83.01
    e.handle_timer(83.01)
    assert e.peers_to_close() == ["p2"]
    assert e.counters["peers_dead"] == 2


def test_tlvs_from_unknown_or_dead_peers_are_discarded() -> None:
    e = new_engine("p1")
    e.peer_down("p1", 1.0)
    e.receive_tlv("p1", A.update(), 2.0)
    e.receive_tlv("ghost", Hello(HELLO_UNICAST, 0, 2000), 2.0)
    assert e.tlvs_to_send() == []
    assert e.fib_snapshot() == {}
    assert e.counters["rx_from_unknown_peer"] == 2


# ---------------------------------------------------------------------- update filters (6.3)
@pytest.mark.parametrize(
    ("subnet", "reason"),
    [
        (Subnet(ipaddress.IPv6Address("2001:db8::"), 64), "outside_overlay"),
        (Subnet(ipaddress.IPv4Address("10.1.2.0"), 24), "outside_overlay"),
        (Subnet(A.address, 48), "prefix_too_short"),
        (Subnet(A.address, 7), "prefix_too_short"),
        (B.subnet, "router_id_not_owner"),
    ],
)
def test_update_filters(subnet: Subnet, reason: str) -> None:
    e = new_engine("p1", "p2")
    e.receive_tlv("p1", A.update(subnet=subnet), 1.0)
    assert e.counters[f"update_filtered_{reason}"] == 1
    assert e.fib_snapshot() == {}
    assert e.tlvs_to_send() == []


def test_update_for_own_subnet_is_ignored() -> None:
    e = new_engine("p1", "p2")
    e.receive_tlv("p1", ME.update(seqno=9), 1.0)
    assert e.counters["update_filtered_own_subnet"] == 1
    assert e.fib_snapshot() == {}
    assert e.tlvs_to_send() == []


def test_longer_prefix_owned_by_the_router_id_is_accepted() -> None:
    e = new_engine("p1")
    host = Subnet(A.address, 128)
    e.receive_tlv("p1", A.update(subnet=host), 1.0)
    assert e.fib_snapshot() == {host: FibEntry("p1", A.pk)}


def test_retraction_from_a_non_owner_passes_the_filter() -> None:
    e = new_engine("p1", "p2")
    learn(e, "p1", A)
    e.receive_tlv("p1", retraction(A.subnet, rid=B.rid), 2.0)  # retractions carry the retracter's id (quirk 3)
    assert not any(k.startswith("update_filtered") for k in e.counters)
    assert e.fib_snapshot()[A.subnet].next_hop is None


# ---------------------------------------------------------------------- processing updates (6.4)
def test_accepted_update_installs_route_and_propagates_with_link_cost() -> None:
    e = new_engine("p1", "p2", "p3")
    e.receive_tlv("p1", A.update(metric=0, seqno=3), 1.0)
    assert e.fib_changes() == [FibSet(A.subnet, FibEntry("p1", A.pk))]
    assert e.selected_routes() == [RouteView(A.subnet, "p1", 0, 3, A.rid)]
    assert e.fallback_routes() == []
    expected = Update(0, 30_000, 3, FRESH_COST, A.subnet, A.rid)
    assert sent(e) == [("p2", expected), ("p3", expected)]  # never back to the next hop
    assert e.feasibility_distance(A.subnet, A.rid) == (FRESH_COST, 3)


def test_shared_key_is_fixed_when_the_subnet_entry_is_created() -> None:
    e = new_engine("p1", "p2")
    learn(e, "p1", A)
    # Another router id owning the same /64 (same key, new random part): key unchanged (quirk 5).
    other = Update(0, 30_000, 0, 0, A.subnet, A.pk + b"\0\0" + b"zzzzzz")
    e.receive_tlv("p2", other, 2.0)
    assert e.fib_snapshot()[A.subnet].public_key == A.pk


def test_infeasible_update_from_new_neighbour_is_not_installed() -> None:
    e = new_engine("p1", "p2", "p3")
    learn(e, "p1", A)  # we advertised (metric 1010, seqno 0): that is our feasibility distance
    e.receive_tlv("p2", A.update(metric=FRESH_COST), 2.0)
    assert e.fallback_routes() == []
    assert e.counters["update_infeasible"] == 1
    assert sent(e, SeqNoRequest) == []  # a route is selected, so nobody is asked
    e.receive_tlv("p2", A.update(metric=FRESH_COST - 1), 3.0)
    assert e.fallback_routes() == [RouteView(A.subnet, "p2", FRESH_COST - 1, 0, A.rid)]


def test_newer_seqno_is_feasible_whatever_the_metric() -> None:
    e = new_engine("p1", "p2", "p3")
    learn(e, "p1", A)
    e.receive_tlv("p2", A.update(metric=60_000, seqno=1), 2.0)
    assert [r.next_hop for r in e.fallback_routes()] == ["p2"]


def test_infeasible_update_without_selection_asks_sender_for_next_seqno() -> None:
    e = new_engine("p1", "p2")
    learn(e, "p1", A, seqno=7)
    e.peer_down("p1", 2.0)
    drain(e)
    e.receive_tlv("p2", A.update(metric=5000, seqno=7), 3.0)
    assert sent(e, SeqNoRequest) == [("p2", SeqNoRequest(8, 64, A.rid, A.subnet))]
    assert e.fib_snapshot()[A.subnet].next_hop is None
    e.receive_tlv("p2", A.update(metric=5000, seqno=8), 3.01)
    assert e.fib_snapshot()[A.subnet].next_hop == "p2"


def test_infeasible_update_for_unknown_subnet_asks_for_seqno() -> None:
    e = new_engine("p1", "p2")
    learn(e, "p1", A)
    e.peer_down("p1", 2.0)
    e.handle_timer(8.0)  # the retracted entry is gone after 6 s
    assert A.subnet not in e.fib_snapshot()
    drain(e)
    e.receive_tlv("p2", A.update(metric=5000), 9.0)
    assert sent(e, SeqNoRequest) == [("p2", SeqNoRequest(1, 64, A.rid, A.subnet))]
    assert A.subnet not in e.fib_snapshot()


def test_infeasible_update_on_selected_route_is_not_applied() -> None:
    e = new_engine("p1", "p2")
    learn(e, "p1", A, metric=100)
    e.receive_tlv("p1", A.update(metric=5000), 2.0)  # worse than what we advertised: infeasible
    assert sent(e, SeqNoRequest) == [("p1", SeqNoRequest(1, 64, A.rid, A.subnet))]
    assert e.selected_routes() == [RouteView(A.subnet, "p1", 100, 0, A.rid)]


def test_small_metric_change_is_not_propagated_big_one_is() -> None:
    e = new_engine("p1", "p2")
    learn(e, "p1", A, metric=100)
    e.receive_tlv("p1", A.update(metric=90), 2.0)
    assert sent(e, Update) == []
    e.receive_tlv("p1", A.update(metric=79), 3.0)
    assert sent(e, Update) == [("p2", Update(0, 30_000, 0, 79 + FRESH_COST, A.subnet, A.rid))]
    assert e.fib_changes() == []  # same next hop: no FIB change


# ---------------------------------------------------------------------- route selection (6.5)
@pytest.mark.parametrize(("metric", "switch"), [(95, False), (90, False), (89, True)])
def test_hysteresis_switches_only_when_better_by_more_than_10(metric: int, switch: bool) -> None:
    e = new_engine("p1", "p2", "p3")
    learn(e, "p1", A, metric=100)
    e.receive_tlv("p2", A.update(metric=metric), 2.0)
    assert e.fib_snapshot()[A.subnet].next_hop == ("p2" if switch else "p1")


def test_direct_announcement_wins_even_when_only_slightly_better() -> None:
    e = new_engine("p1", "p2", "p3")
    learn(e, "p1", A, metric=5)
    e.receive_tlv("p2", A.update(metric=0), 2.0)
    assert e.fib_snapshot()[A.subnet].next_hop == "p2"


def test_lower_link_cost_decides_between_equal_metrics() -> None:
    e = new_engine("p1")
    e.peer_up(PeerInfo("fast", 5), 0.0)
    drain(e)
    learn(e, "p1", A, metric=100)
    e.receive_tlv("fast", A.update(metric=100), 2.0)  # 1105 vs 1110: not better by more than 10
    assert e.fib_snapshot()[A.subnet].next_hop == "p1"
    e.receive_tlv("fast", Ihu(0, 6000), 2.5)  # RTT sample of 2.5 s... makes it slower
    e.receive_tlv("p1", Ihu(0, 6000), 0.001)  # and p1 much faster
    e.receive_tlv("p1", A.update(metric=100, seqno=1), 3.0)  # a feasible refresh re-runs selection
    assert e.fib_snapshot()[A.subnet].next_hop == "p1"


# ---------------------------------------------------------------------- retractions and loss
def test_retraction_of_only_route_unselects_and_retracts_with_our_own_id() -> None:
    e = new_engine("p1", "p2")
    learn(e, "p1", A)
    e.receive_tlv("p1", retraction(A.subnet), 5.0)
    assert e.fib_changes() == [FibSet(A.subnet, FibEntry(None, A.pk))]
    out = e.tlvs_to_send()
    ours = Update(0, 30_000, 0, INFINITE, A.subnet, ME.rid)  # our router id and seqno (quirk 3)
    assert ("p1", ours) in out and ("p2", ours) in out
    assert ("p1", SeqNoRequest(1, 64, A.rid, A.subnet)) in out  # to the neighbour that advertised it
    assert ("p2", RouteRequest(0, A.subnet)) in out  # fast failover
    assert e.selected_routes() == []
    assert e.fallback_routes() == [RouteView(A.subnet, "p1", INFINITE, 0, B.rid)]
    e.handle_timer(10.99)
    assert A.subnet in e.fib_snapshot()
    e.fib_changes()
    e.handle_timer(11.0)  # retracted entries are held 6 s
    assert e.fib_changes() == [FibDel(A.subnet)]
    assert e.fib_snapshot() == {}


def test_retraction_switches_to_feasible_fallback() -> None:
    e = new_engine("p1", "p2", "p3")
    learn(e, "p1", A, metric=0)
    e.receive_tlv("p2", A.update(metric=500), 2.0)
    drain(e)
    e.receive_tlv("p1", retraction(A.subnet), 3.0)
    assert e.fib_changes() == [FibSet(A.subnet, FibEntry("p2", A.pk))]
    expected = Update(0, 30_000, 0, 500 + FRESH_COST, A.subnet, A.rid)
    assert sent(e, Update) == [("p1", expected), ("p3", expected)]
    assert e.counters["failover_route_requests"] == 0


def test_retraction_for_unknown_subnet_is_ignored() -> None:
    e = new_engine("p1", "p2")
    e.receive_tlv("p1", retraction(A.subnet), 1.0)
    assert e.fib_snapshot() == {}
    assert e.tlvs_to_send() == []
    assert e.counters["update_retraction_unknown_subnet"] == 1


def test_retraction_of_retracted_entry_changes_nothing() -> None:
    e = new_engine("p1", "p2")
    learn(e, "p1", A)
    e.receive_tlv("p1", retraction(A.subnet), 2.0)
    drain(e)
    e.receive_tlv("p1", retraction(A.subnet, seqno=5), 4.0)
    assert e.tlvs_to_send() == []
    e.handle_timer(8.0)  # expiry not extended by the second retraction
    assert e.fib_snapshot() == {}


# ---------------------------------------------------------------------- expiry (6.6.3)
def test_selected_route_expires_then_is_retracted_and_removed() -> None:
    e = new_engine("p1", "p2")
    e.receive_tlv("p1", A.update(interval=100), 1.0)  # hold 3.5 s
    drain(e)
    e.handle_timer(4.49)
    assert e.tlvs_to_send() == [] and e.fib_changes() == []
    e.handle_timer(4.5)
    assert e.counters["route_expired_selected"] == 1
    assert e.fib_changes() == [FibSet(A.subnet, FibEntry(None, A.pk))]
    ours = Update(0, 30_000, 0, INFINITE, A.subnet, ME.rid)
    out = e.tlvs_to_send()
    assert ("p1", ours) in out and ("p2", ours) in out
    e.handle_timer(10.5)
    assert e.fib_changes() == [FibDel(A.subnet)]


def test_unselected_route_expires_silently() -> None:
    e = new_engine("p1", "p2", "p3")
    learn(e, "p1", A, metric=0)
    e.receive_tlv("p2", A.update(metric=500, interval=100), 2.0)
    drain(e)
    e.handle_timer(5.5)
    assert e.counters["route_expired_fallback"] == 1
    assert e.tlvs_to_send() == []
    assert e.fib_changes() == []
    assert e.fallback_routes() == []
    assert e.fib_snapshot()[A.subnet].next_hop == "p1"


def test_refresh_extends_the_hold_time() -> None:
    e = new_engine("p1")
    e.receive_tlv("p1", A.update(interval=100), 1.0)
    e.receive_tlv("p1", A.update(interval=100), 4.0)
    e.handle_timer(7.4)
    assert e.fib_snapshot()[A.subnet].next_hop == "p1"
    e.handle_timer(7.5)
    assert e.fib_snapshot()[A.subnet].next_hop is None


def test_zero_interval_finite_route_expires_at_once() -> None:
    e = new_engine("p1")
    e.receive_tlv("p1", A.update(interval=0), 1.0)
    assert e.get_timer() == 1.0
    e.handle_timer(1.0)
    assert e.fib_snapshot()[A.subnet].next_hop is None


# ---------------------------------------------------------------------- dead peers (6.6.4)
def test_peer_down_reroutes_at_once_to_feasible_fallback() -> None:
    e = new_engine("p1", "p2", "p3")
    learn(e, "p1", A, metric=0)
    e.receive_tlv("p2", A.update(metric=300), 2.0)
    learn(e, "p1", B, metric=0)
    drain(e)
    e.peer_down("p1", 3.0)
    changes = e.fib_changes()
    assert FibSet(A.subnet, FibEntry("p2", A.pk)) in changes
    assert FibSet(B.subnet, FibEntry(None, B.pk)) in changes
    out = e.tlvs_to_send()
    assert ("p3", Update(0, 30_000, 0, 300 + FRESH_COST, A.subnet, A.rid)) in out
    assert not any(p == "p2" and isinstance(t, Update) and t.subnet == A.subnet for p, t in out)
    # B is lost: retraction and fast-failover route request to every remaining peer
    for peer in ("p2", "p3"):
        assert (peer, Update(0, 30_000, 0, INFINITE, B.subnet, ME.rid)) in out
        assert (peer, RouteRequest(0, B.subnet)) in out
    assert all(p != "p1" for p, _ in out)


def test_peer_down_of_unknown_peer_is_harmless() -> None:
    e = new_engine("p1")
    e.peer_down("nope", 1.0)
    assert e.counters["peer_down_unknown"] == 1


def test_failover_answer_from_another_neighbour_restores_route() -> None:
    e = new_engine("p1", "p2")
    learn(e, "p1", A)
    e.peer_down("p1", 2.0)
    assert ("p2", RouteRequest(0, A.subnet)) in e.tlvs_to_send()
    e.receive_tlv("p2", A.update(metric=900, seqno=1), 2.01)  # the neighbour's answer, after a bump
    assert e.fib_snapshot()[A.subnet].next_hop == "p2"


def test_lost_route_is_asked_for_again_until_found() -> None:
    e = new_engine("p1", "p2")
    learn(e, "p1", A)
    e.peer_down("p1", 2.0)
    drain(e)
    asked = []
    for t in (3.0, 5.0, 9.0, 17.0, 40.0):
        e.handle_timer(t)
        asked.append([p for p, tlv in e.tlvs_to_send() if isinstance(tlv, RouteRequest)])
    assert asked == [["p2"], ["p2"], ["p2"], ["p2"], []]  # retries at 1, 3, 7 and 15 s, then give up


# ---------------------------------------------------------------------- route requests (6.7)
def test_request_route_queries_all_peers_once() -> None:
    e = new_engine("p1", "p2")
    e.request_route(A.address, 1.0)
    assert e.tlvs_to_send() == [("p1", RouteRequest(0, A.subnet)), ("p2", RouteRequest(0, A.subnet))]
    assert e.queried_subnets(2.5) == [(A.subnet, 13)]
    e.request_route(A.address, 2.0)
    e.request_route(ipaddress.IPv6Address(int(A.address) + 1), 2.0)  # same /64
    assert e.tlvs_to_send() == []
    e.handle_timer(16.0)
    assert e.queried_subnets(16.0) == []
    e.request_route(A.address, 16.5)
    assert len(sent(e, RouteRequest)) == 2


def test_request_route_ignores_own_subnet_and_foreign_addresses() -> None:
    e = new_engine("p1")
    e.request_route(ME.address, 1.0)
    e.request_route(ipaddress.IPv6Address("2001:db8::1"), 1.0)
    e.request_route(ipaddress.IPv4Address("10.0.0.1"), 1.0)
    assert e.tlvs_to_send() == []
    assert e.queried_subnets(1.0) == []


def test_new_peer_receives_outstanding_queries() -> None:
    e = new_engine("p1")
    e.request_route(A.address, 1.0)
    drain(e)
    e.peer_up(PeerInfo("p2", 10), 2.0)
    assert ("p2", RouteRequest(0, A.subnet)) in e.tlvs_to_send()


def test_answer_to_query_replaces_queried_marker() -> None:
    e = new_engine("p1")
    e.request_route(A.address, 1.0)
    e.receive_tlv("p1", A.update(), 1.1)
    assert e.queried_subnets(1.1) == []
    assert e.fib_snapshot() == {A.subnet: FibEntry("p1", A.pk)}


def test_request_route_refreshes_route_about_to_expire() -> None:
    e = new_engine("p1", "p2")
    e.receive_tlv("p1", A.update(interval=1000), 1.0)  # hold 35 s -> expires at 36
    drain(e)
    e.request_route(A.address, 20.0)
    assert sent(e, RouteRequest) == []
    e.request_route(A.address, 21.5)  # expires within 15 s
    assert len(sent(e, RouteRequest)) == 2


def test_request_route_with_only_fallbacks_asks_for_seqno() -> None:
    e = new_engine("p1", "p2")
    learn(e, "p1", A)
    e.receive_tlv("p2", A.update(metric=500), 1.5)  # feasible fallback...
    e.receive_tlv("p2", A.update(metric=2000), 1.6)  # ...turned infeasible
    e.receive_tlv("p1", retraction(A.subnet), 2.0)
    drain(e)
    assert e.fib_snapshot()[A.subnet].next_hop is None
    e.request_route(A.address, 7.0)  # > 4 s after the loss's own seqno request
    request = SeqNoRequest(1, 64, A.rid, A.subnet)  # for the owner's router id, not the retracter's
    assert sent(e, SeqNoRequest) == [("p1", request), ("p2", request)]


def test_request_route_with_only_retractions_looks_for_a_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_mod, "RR_CACHE_TTL", 0.5)
    e = new_engine("p1", "p2")
    learn(e, "p1", A)
    e.receive_tlv("p1", retraction(A.subnet), 2.0)  # only a retracted entry (router id of the retracter) remains
    drain(e)
    e.request_route(A.address, 3.0)
    # No seqno request for the retracter's router id (nobody could bump it): a route request instead.
    assert sent(e) == [("p1", RouteRequest(0, A.subnet)), ("p2", RouteRequest(0, A.subnet))]


def test_route_request_for_own_subnet_is_answered_with_our_64() -> None:
    e = new_engine("p1")
    e.receive_tlv("p1", RouteRequest(3, Subnet(ME.address, 128)), 1.0)
    assert e.tlvs_to_send() == [("p1", Update(0, 30_000, 0, 0, ME.subnet, ME.rid))]


def test_route_request_answered_from_selected_route() -> None:
    e = new_engine("p1", "p2")
    learn(e, "p1", A, metric=40, seqno=2)
    e.receive_tlv("p2", RouteRequest(0, A.subnet), 2.0)
    assert e.tlvs_to_send() == [("p2", Update(0, 30_000, 2, 40 + FRESH_COST, A.subnet, A.rid))]
    e.receive_tlv("p1", RouteRequest(0, A.subnet), 2.0)  # never to the route's own next hop
    assert e.tlvs_to_send() == []


def test_route_request_forwarded_when_unknown() -> None:
    e = new_engine("p1", "p2", "p3")
    e.receive_tlv("p1", RouteRequest(4, A.subnet), 1.0)
    assert e.tlvs_to_send() == [("p2", RouteRequest(5, A.subnet)), ("p3", RouteRequest(5, A.subnet))]
    assert [s for s, _ in e.queried_subnets(1.0)] == [A.subnet]
    e.receive_tlv("p2", RouteRequest(0, A.subnet), 1.1)  # already queried: nothing
    assert e.tlvs_to_send() == []
    e.receive_tlv("p2", A.update(), 1.2)  # the answer reaches the asker as a triggered update
    assert ("p1", Update(0, 30_000, 0, FRESH_COST, A.subnet, A.rid)) in e.tlvs_to_send()


@pytest.mark.parametrize(("generation", "forwarded"), [(14, True), (15, False), (200, False)])
def test_route_request_generation_limit(generation: int, forwarded: bool) -> None:
    e = new_engine("p1", "p2")
    e.receive_tlv("p1", RouteRequest(generation, A.subnet), 1.0)
    assert e.tlvs_to_send() == ([("p2", RouteRequest(15, A.subnet))] if forwarded else [])
    assert e.counters["route_request_generation_limit"] == (0 if forwarded else 1)


def test_route_request_with_routes_but_no_selection_is_not_answered() -> None:
    e = new_engine("p1", "p2")
    learn(e, "p1", A)
    e.receive_tlv("p1", retraction(A.subnet), 2.0)
    drain(e)
    e.receive_tlv("p2", RouteRequest(0, A.subnet), 2.5)
    assert e.tlvs_to_send() == []


def test_wildcard_route_request_dumps_selected_routes_and_own_subnet() -> None:
    e = new_engine("p1", "p2")
    learn(e, "p1", A)
    learn(e, "p2", B, metric=7)
    e.receive_tlv("p1", RouteRequest(0, None), 3.0)
    assert e.tlvs_to_send() == [
        ("p1", Update(0, 30_000, 0, 7 + FRESH_COST, B.subnet, B.rid)),
        ("p1", Update(0, 30_000, 0, 0, ME.subnet, ME.rid)),
    ]


@pytest.mark.parametrize(
    "subnet",
    [
        Subnet(ipaddress.IPv4Address("10.0.0.0"), 8),
        Subnet(ipaddress.IPv6Address("2001:db8::"), 64),
        Subnet(ipaddress.IPv6Address("400::"), 7),
    ],
)
def test_route_request_for_impossible_prefix_is_not_forwarded(subnet: Subnet) -> None:
    e = new_engine("p1", "p2")
    e.receive_tlv("p1", RouteRequest(0, subnet), 1.0)
    assert e.tlvs_to_send() == []
    assert e.queried_subnets(1.0) == []


# ---------------------------------------------------------------------- seqno requests (6.8)
def test_seqno_request_for_own_subnet_bumps_and_announces() -> None:
    e = new_engine("p1", "p2")
    e.receive_tlv("p1", SeqNoRequest(1, 64, ME.rid, ME.subnet), 0.5)  # first bump: no rate limit
    assert e.seqno == 1
    own = Update(0, 30_000, 1, 0, ME.subnet, ME.rid)
    assert e.tlvs_to_send() == [("p1", own), ("p2", own)]


def test_seqno_bump_rate_limit_defers_the_bump() -> None:
    e = new_engine("p1", "p2")
    e.receive_tlv("p1", SeqNoRequest(1, 64, ME.rid, ME.subnet), 10.0)
    drain(e)
    e.receive_tlv("p2", SeqNoRequest(2, 64, ME.rid, ME.subnet), 11.0)
    assert e.seqno == 1 and e.tlvs_to_send() == []
    assert e.counters["seqno_bump_deferred"] == 1
    e.handle_timer(13.99)
    assert e.seqno == 1
    e.handle_timer(14.0)
    assert e.seqno == 2
    assert len(sent(e, Update)) == 2


def test_seqno_request_not_newer_than_ours_does_not_bump() -> None:
    e = new_engine("p1")
    e.receive_tlv("p1", SeqNoRequest(1, 64, ME.rid, ME.subnet), 1.0)
    drain(e)
    e.receive_tlv("p1", SeqNoRequest(1, 64, ME.rid, ME.subnet), 9.0)
    e.receive_tlv("p1", SeqNoRequest(0x8001, 64, ME.rid, ME.subnet), 9.0)  # "older" in wrapping order
    assert e.seqno == 1
    assert e.tlvs_to_send() == []


def test_seqno_request_with_another_router_id_for_our_subnet_is_not_a_bump() -> None:
    e = new_engine("p1")
    stale = ME.pk + b"\0\0" + b"oldrid"
    e.receive_tlv("p1", SeqNoRequest(5, 64, stale, ME.subnet), 1.0)
    assert e.seqno == 0


def test_seqno_request_answered_with_requesters_link_cost() -> None:
    e = new_engine("p1")
    e.peer_up(PeerInfo("p2", 15), 0.0)
    drain(e)
    learn(e, "p1", A, metric=100, seqno=4)
    e.receive_tlv("p2", SeqNoRequest(4, 64, A.rid, A.subnet), 2.0)
    # metric uses the requester's link (1015), not the next hop's (1010): quirk 4
    assert e.tlvs_to_send() == [("p2", Update(0, 30_000, 4, 100 + 1015, A.subnet, A.rid))]
    e.receive_tlv("p2", SeqNoRequest(9, 64, B.rid, A.subnet), 2.1)  # other router id: answer too
    assert len(sent(e, Update)) == 1


def test_seqno_request_forwarded_once_and_answer_returned_to_asker() -> None:
    e = new_engine("p1", "p2", "p3")
    learn(e, "p1", A, metric=100)
    e.receive_tlv("p2", SeqNoRequest(1, 10, A.rid, A.subnet), 2.0)
    assert e.tlvs_to_send() == [("p1", SeqNoRequest(1, 9, A.rid, A.subnet))]
    e.receive_tlv("p3", SeqNoRequest(1, 64, A.rid, A.subnet), 2.5)  # duplicate while in flight
    assert e.tlvs_to_send() == []
    assert e.counters["seqno_request_duplicate"] == 1
    e.receive_tlv("p1", A.update(metric=100, seqno=1), 2.6)  # no trigger: same metric and router id
    answer = Update(0, 30_000, 1, 100 + FRESH_COST, A.subnet, A.rid)
    assert e.tlvs_to_send() == [("p2", answer), ("p3", answer)]


def test_seqno_request_with_hop_count_1_is_dropped() -> None:
    e = new_engine("p1", "p2")
    learn(e, "p1", A)
    e.receive_tlv("p2", SeqNoRequest(1, 1, A.rid, A.subnet), 2.0)
    assert e.tlvs_to_send() == []
    assert e.counters["seqno_request_hop_limit"] == 1


def test_seqno_request_never_sent_back_to_asker_and_parked_until_route() -> None:
    e = new_engine("p1", "p2")
    learn(e, "p1", A)
    e.receive_tlv("p1", SeqNoRequest(1, 64, A.rid, A.subnet), 2.0)
    assert e.tlvs_to_send() == []
    assert e.counters["seqno_request_parked"] == 1
    e.receive_tlv("p1", retraction(A.subnet), 2.1)
    e.receive_tlv("p2", A.update(metric=50, seqno=0), 2.2)  # a new path: the parked request follows it
    assert ("p2", SeqNoRequest(1, 63, A.rid, A.subnet)) in e.tlvs_to_send()


def test_seqno_request_prefers_feasible_next_hop() -> None:
    e = new_engine("p1", "p2", "p3")
    learn(e, "p1", A, metric=0)
    e.receive_tlv("p2", A.update(metric=500), 2.0)  # feasible fallback
    drain(e)
    e.receive_tlv("p1", SeqNoRequest(1, 64, A.rid, A.subnet), 3.0)
    assert e.tlvs_to_send() == [("p2", SeqNoRequest(1, 63, A.rid, A.subnet))]


def test_seqno_request_with_ipv4_prefix_is_dropped() -> None:
    e = new_engine("p1", "p2")
    e.receive_tlv("p1", SeqNoRequest(1, 64, A.rid, Subnet(ipaddress.IPv4Address("10.0.0.0"), 8)), 1.0)
    assert e.tlvs_to_send() == []


# ---------------------------------------------------------------------- periodic own announcement
def test_own_subnet_announced_every_300_seconds() -> None:
    e = new_engine("p1", "p2")
    for t in range(20, 300, 20):
        e.handle_timer(float(t))
        for p in ("p1", "p2"):
            e.receive_tlv(p, Ihu(0, 6000), t + 0.01)
    assert sent(e, Update) == []
    e.handle_timer(300.0)
    own = Update(0, 30_000, 0, 0, ME.subnet, ME.rid)
    assert sent(e, Update) == [("p1", own), ("p2", own)]


# ---------------------------------------------------------------------- bounded state
def test_routing_table_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_mod, "MAX_SUBNETS", 3)
    e = new_engine("p1")
    for i in range(6):
        e.receive_tlv("p1", Ident(200 + i).update(), 1.0)
    assert len(e.fib_snapshot()) == 3
    assert e.counters["drop_routing_table_full"] == 3


def test_query_table_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_mod, "MAX_QUERIED", 2)
    e = new_engine("p1", "p2")
    for i in range(5):
        e.receive_tlv("p1", RouteRequest(0, Ident(300 + i).subnet), 1.0)
    assert len(e.queried_subnets(1.0)) == 2
    assert e.counters["drop_query_table_full"] == 3


def test_source_and_cache_tables_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_mod, "MAX_SOURCES", 4)
    monkeypatch.setattr(engine_mod, "MAX_SEQNO_CACHE", 2)
    monkeypatch.setattr(engine_mod, "MAX_RR_CACHE", 2)
    e = new_engine("p1", "p2")  # own subnet takes one source entry
    for i in range(6):
        e.receive_tlv("p1", Ident(400 + i).update(), 1.0)
        e.receive_tlv("p1", SeqNoRequest(1, 64, Ident(500 + i).rid, Ident(500 + i).subnet), 1.0)
        e.request_route(Ident(600 + i).address, 1.0)
    assert e.source_table_size() == 4
    assert e.counters["drop_source_table_full"] > 0
    assert len(e._seqno_cache) <= 2
    assert len(e._rr_cache) <= 2
    # Finite updates that cannot be recorded are never sent (feasibility would be unsound).
    recorded = {s for s, _ in e._sources}  # subnet keys
    assert all(t.subnet.key in recorded for _, t in e.tlvs_to_send() if isinstance(t, Update) and t.metric != INFINITE)


def test_timer_heap_stays_small_under_refreshes() -> None:
    e = new_engine("p1")
    for i in range(5000):
        e.receive_tlv("p1", A.update(seqno=i % 60_000), 1.0 + i * 0.001)
        e.receive_tlv("p1", Ihu(0, 6000), 1.0 + i * 0.001)
    assert len(e._timers._heap) < 300


def test_receive_tlvs_equals_receive_tlv_one_by_one() -> None:
    """The batch entry point (one peer lookup per batch) changes nothing but speed."""
    batch: list[Tlv] = [Ident(700 + i).update(seqno=i, metric=10 * i) for i in range(20)]
    batch += [Hello(HELLO_UNICAST, 1, 2000), Ident(700).update(seqno=0, metric=INFINITE), Ihu(0, 6000)]
    batch += [RouteRequest(0, Ident(705).subnet), Ident(703).update(seqno=3, metric=5), Ident(701).update(seqno=0)]
    one, many = new_engine("p1", "p2"), new_engine("p1", "p2")
    for e in (one, many):
        e.receive_tlv("p2", Ident(710).update(), 0.5)
    for tlv in batch:
        one.receive_tlv("p1", tlv, 1.0)
        one.receive_tlv("gone", tlv, 1.0)
    many.receive_tlvs("p1", batch, 1.0)
    many.receive_tlvs("gone", batch, 1.0)
    assert one.tlvs_to_send() == many.tlvs_to_send()
    assert one.fib_changes() == many.fib_changes()
    assert one.counters == many.counters and one.counters["rx_from_unknown_peer"] == len(batch)
    assert one.selected_routes() == many.selected_routes() and one.get_timer() == many.get_timer()
