"""Per-neighbour fairness of the router engine: no neighbour takes the
routing table, the query table or the seqno-request cache; when a limit is
hit the offending neighbour's *newest* entries go, counted per neighbour.

The caps are shrunk with monkeypatch so each rule shows with a handful of
Updates; the rules are the same at the real sizes.
"""

from __future__ import annotations

import pytest

from common.wire.tlv import RouteRequest, SeqNoRequest, Update
from services.router import engine as engine_mod
from services.router.engine import RouterEngine
from services.router.metric import INFINITE

from .test_router_engine import ME, Ident, drain, new_engine


@pytest.fixture
def small_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_mod, "MAX_SUBNETS", 8)
    monkeypatch.setattr(engine_mod, "MAX_QUERIED", 8)
    monkeypatch.setattr(engine_mod, "MAX_SEQNO_CACHE", 8)
    monkeypatch.setattr(engine_mod, "MIN_FAIR_SHARE", 1)


def flood(e: RouterEngine, peer: str, first: int, count: int, now: float = 1.0) -> list[Ident]:
    idents = [Ident(first + i) for i in range(count)]
    for ident in idents:
        e.receive_tlv(peer, ident.update(), now)
    return idents


def installed(e: RouterEngine) -> set:
    return {s for s, entry in e.fib_snapshot().items() if entry.next_hop is not None}


@pytest.mark.usefixtures("small_tables")
def test_a_flooding_neighbour_gets_half_the_table_and_honest_routes_survive() -> None:
    e = new_engine("flooder", "honest")
    honest = flood(e, "honest", 10, 2)
    flooded = flood(e, "flooder", 1000, 20)
    drain(e)
    assert e.neighbour_route_limit() == 4
    stats = e.neighbour_stats()
    assert stats["flooder"]["routes"] == 4
    assert stats["flooder"]["routes_refused"] == 16
    assert e.counters["drop_neighbour_route_limit"] == 16
    assert stats["honest"]["routes"] == 2 and stats["honest"]["routes_refused"] == 0
    routes = installed(e)
    assert {i.subnet for i in honest} <= routes
    # the oldest flood entries stay: the newest (incoming) ones were refused
    assert {i.subnet for i in flooded[:4]} <= routes
    assert not {i.subnet for i in flooded[4:]} & routes
    # a node that joins after the flood is reachable through the honest neighbour
    late = Ident(77)
    e.receive_tlv("honest", late.update(), 2.0)
    assert late.subnet in installed(e)


@pytest.mark.usefixtures("small_tables")
def test_full_table_a_neighbour_below_its_share_evicts_the_newest_of_the_biggest() -> None:
    e = new_engine("flooder")
    flooded = flood(e, "flooder", 2000, 8)  # alone it may fill the whole table
    drain(e)
    assert len(installed(e)) == 8
    e.peer_up(engine_mod.PeerInfo("honest", 10, "honest"), 2.0)
    drain(e)
    newcomer = Ident(88)
    e.receive_tlv("honest", newcomer.update(), 3.0)
    routes = installed(e)
    assert newcomer.subnet in routes
    assert flooded[-1].subnet not in routes  # the flooder's newest went
    assert {i.subnet for i in flooded[:-1]} <= routes
    stats = e.neighbour_stats()
    assert stats["flooder"]["routes_evicted"] == 1 and stats["honest"]["routes"] == 1
    # the evicted route had been advertised: we retract it, with our own router id
    retractions = [(p, t) for p, t in e.tlvs_to_send() if isinstance(t, Update) and t.metric == INFINITE]
    assert ("honest", Update(0, 30_000, 0, INFINITE, flooded[-1].subnet, ME.rid)) in retractions


@pytest.mark.usefixtures("small_tables")
def test_a_neighbour_at_or_above_its_share_cannot_evict() -> None:
    e = new_engine("a", "b")
    flood(e, "a", 3000, 4)
    flood(e, "b", 4000, 4)  # table full, both at their fair share (4)
    drain(e)
    e.receive_tlv("b", Ident(4100).update(), 2.0)
    assert e.counters["drop_neighbour_route_limit"] + e.counters["drop_routing_table_full"] == 1
    assert e.counters["routes_evicted"] == 0
    assert e.neighbour_stats()["a"]["routes"] == 4


@pytest.mark.usefixtures("small_tables")
def test_a_route_we_asked_for_is_admitted_past_the_neighbours_limit() -> None:
    e = new_engine("flooder", "honest")
    flooded = flood(e, "flooder", 5000, 10)
    wanted = Ident(99)
    e.request_route(wanted.address, 2.0)
    e.receive_tlv("flooder", wanted.update(), 2.1)
    routes = installed(e)
    assert wanted.subnet in routes
    assert flooded[3].subnet not in routes  # its newest admitted entry made room
    assert e.neighbour_stats()["flooder"]["routes"] == 4


@pytest.mark.usefixtures("small_tables")
def test_forwarded_route_requests_are_limited_to_a_fair_share_per_neighbour() -> None:
    e = new_engine("a", "b", "c")  # share of the query table: 8 // 3 = 2
    for i in range(5):
        e.receive_tlv("a", RouteRequest(0, Ident(6000 + i).subnet), 1.0)
    stats = e.neighbour_stats()
    assert stats["a"]["queries"] == 2 and stats["a"]["route_requests_refused"] == 3
    e.receive_tlv("b", RouteRequest(0, Ident(6100).subnet), 1.0)
    assert e.neighbour_stats()["b"]["queries"] == 1
    # an answer frees the neighbour's share
    e.receive_tlv("c", Ident(6000).update(), 1.5)
    assert e.neighbour_stats()["a"]["queries"] == 1


@pytest.mark.usefixtures("small_tables")
def test_seqno_requests_held_for_a_neighbour_are_limited_to_its_share() -> None:
    e = new_engine("a", "b")  # share of the seqno cache: 8 // 2 = 4
    for i in range(6):
        ident = Ident(7000 + i)
        e.receive_tlv("a", SeqNoRequest(1, 64, ident.rid, ident.subnet), 1.0)
    stats = e.neighbour_stats()
    assert stats["a"]["seqno_requests"] == 4 and stats["a"]["seqno_requests_refused"] == 2
    ident = Ident(7100)
    e.receive_tlv("b", SeqNoRequest(1, 64, ident.rid, ident.subnet), 1.0)
    assert e.neighbour_stats()["b"]["seqno_requests"] == 1
    e.handle_timer(1.0 + engine_mod.SEQNO_CACHE_TTL + 1)  # (the peers are dead by then too)
    assert e._seqno_cache.owned_by("a") == 0


@pytest.mark.usefixtures("small_tables")
def test_a_dead_neighbours_entries_leave_its_index() -> None:
    e = new_engine("a", "b")
    flood(e, "a", 8000, 3)
    e.peer_down("a", 2.0)
    assert "a" not in e.neighbour_stats()
    e.handle_timer(2.0 + engine_mod.RETRACTED_ROUTE_HOLD + 1)
    e.handle_timer(2.0 + 2 * engine_mod.RETRACTED_ROUTE_HOLD + 2)
    assert "a" not in e._learned
    assert e.subnet_count() == 0


def test_a_neighbour_that_keeps_sending_stays_alive_without_ihus() -> None:
    """Its IHUs may queue behind the flood it forwards; any TLV proves the link works."""
    e = new_engine("busy", "quiet")
    for t in range(0, 100, 10):
        e.receive_tlv("busy", Ident(9000 + t).update(), float(t))
        e.handle_timer(float(t) + 0.5)
    assert "busy" in [p.peer_id for p in e.peers]
    assert "quiet" not in [p.peer_id for p in e.peers]  # heard nothing for 43 s


def test_a_dead_neighbours_many_routes_are_retracted_in_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_mod, "DEAD_PEER_SLICE", 3)
    e = new_engine("big", "other")
    flooded = flood(e, "big", 9500, 10)
    drain(e)
    e.peer_down("big", 2.0)
    assert e.get_timer() == 2.0  # the rest is due at once
    e.handle_timer(2.0, limit=4)
    retracted = [t for _, t in e.tlvs_to_send() if isinstance(t, Update) and t.metric == INFINITE]
    assert len(retracted) == 4
    e.handle_timer(2.0)
    retracted = [t for _, t in e.tlvs_to_send() if isinstance(t, Update) and t.metric == INFINITE]
    assert len(retracted) == 6
    assert all(entry.next_hop is None for s, entry in e.fib_snapshot().items() if s in {i.subnet for i in flooded})
