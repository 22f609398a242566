"""Router building blocks (source table, caches, timers, routing table) and a
property test feeding the engine arbitrary input."""

from __future__ import annotations

import ipaddress
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from common.identity import address_of, subnet_of
from common.wire.subnet import Subnet
from common.wire.tlv import Hello, Ihu, RouteRequest, SeqNoRequest, Tlv, Update
from services.router.caches import RouteRequestCache, SeqnoCache
from services.router.engine import PeerInfo, RouterEngine
from services.router.metric import INFINITE
from services.router.routing_table import Learned, RouteEntry, RoutingTable, SubnetRoutes
from services.router.source_table import SourceTable
from services.router.timers import TimerQueue

S = Subnet(ipaddress.IPv6Address("400:1:2:3::"), 64)
RID = bytes(40)


# ---------------------------------------------------------------------- source table (6.1, 6.2)
def test_source_table_records_what_we_advertised() -> None:
    t = SourceTable(capacity=10)
    key = (S, RID)
    assert t.feasible(key, 0, 60_000)  # no entry: anything goes
    t.record(key, 100, 5, expires=10.0)
    assert t.get(key) is not None and (t.get(key).metric, t.get(key).seqno) == (100, 5)  # type: ignore[union-attr]
    t.record(key, 200, 5, expires=20.0)  # same seqno, worse metric: only the timer is refreshed
    fd = t.get(key)
    assert fd is not None and (fd.metric, fd.seqno, fd.expires) == (100, 5, 20.0)
    t.record(key, 50, 5, expires=30.0)  # same seqno, better metric: replaced
    assert (fd.metric, fd.seqno) == (50, 5)
    t.record(key, 900, 6, expires=40.0)  # newer seqno: replaced whatever the metric
    assert (fd.metric, fd.seqno) == (900, 6)
    t.record(key, INFINITE, 6, expires=50.0)  # a retraction does not even refresh
    assert (fd.metric, fd.seqno, fd.expires) == (900, 6, 40.0)


def test_feasibility_condition() -> None:
    t = SourceTable(capacity=10)
    key = (S, RID)
    t.record(key, 100, 5, expires=1.0)
    assert t.feasible(key, 5, 99)
    assert not t.feasible(key, 5, 100)
    assert not t.feasible(key, 4, 0)
    assert t.feasible(key, 6, 60_000)
    assert t.feasible(key, 4, INFINITE)  # retractions are always feasible
    wrapped = (S, bytes(39) + b"\1")
    t.record(wrapped, 100, 0xFFFF, expires=1.0)
    assert t.feasible(wrapped, 0, 5000)  # 0 is newer than 0xFFFF (wrapping)
    assert not t.feasible(wrapped, 0x7FFF, 0)  # exactly 32768 apart: neither newer nor equal


def test_source_table_capacity() -> None:
    t = SourceTable(capacity=1)
    assert t.can_record((S, RID))
    t.record((S, RID), 1, 1, 1.0)
    assert t.can_record((S, RID))
    assert not t.can_record((S, bytes(39) + b"\1"))
    # try_record: the same in one call; a known key is still recorded when full
    assert not t.try_record((S, bytes(39) + b"\1"), 1, 1, 1.0)
    assert t.get((S, bytes(39) + b"\1")) is None
    assert t.try_record((S, RID), 0, 1, 2.0)
    fd = t.get((S, RID))
    assert fd is not None and (fd.metric, fd.seqno, fd.expires) == (0, 1, 2.0)


# ---------------------------------------------------------------------- caches
def test_seqno_cache_tracks_targets_sources_and_evicts_oldest() -> None:
    c = SeqnoCache(capacity=2)
    k1, k2, k3 = (RID, S, 1), (RID, S, 2), (RID, S, 3)
    assert c.forward(k1, "a", None, 1.0) is None
    c.forward(k1, "b", "x", 2.0)
    c.forward(k1, None, "y", 3.0)  # only remembers the asker
    info = c.get(k1)
    assert info is not None
    assert (info.targets, info.sources, info.first_sent, info.last_sent) == (["a", "b"], ["x", "y"], 1.0, 2.0)
    c.forward(k2, "a", None, 4.0)
    assert c.forward(k3, "a", None, 5.0) == k1
    assert sorted(k[2] for k in c.keys_for(S)) == [2, 3]
    c.forget_peer("a")
    assert c.get(k2).targets == []  # type: ignore[union-attr]
    c.remove(k2)
    c.remove(k3)
    assert c.keys_for(S) == [] and len(c) == 0


def test_route_request_cache_ages_and_evicts() -> None:
    c = RouteRequestCache(capacity=1)
    c.record(S, 0, ["a"], 1.0)
    assert c.info(S, 16.0, 15.0) is not None
    assert c.info(S, 16.1, 15.0) is None
    other = Subnet(ipaddress.IPv6Address("400:9::"), 64)
    assert c.record(other, 3, ["b"], 2.0) == S
    c.forget_peer("b")
    assert c.info(other, 2.0, 15.0).receivers == []  # type: ignore[union-attr]


# ---------------------------------------------------------------------- timers
def test_timer_queue_keeps_earliest_deadline_per_key() -> None:
    q = TimerQueue()
    q.schedule("a", 10.0)
    q.schedule("a", 20.0)  # later: ignored, the handler re-arms when 10 fires
    q.schedule("b", 5.0)
    q.schedule("a", 3.0)  # earlier: replaces
    assert q.next_time() == 3.0
    assert q.pop_due(2.9) is None
    assert q.pop_due(3.0) == "a"
    assert q.pop_due(100.0) == "b"
    assert q.pop_due(100.0) is None  # the stale 10.0 item for "a" is skipped
    assert q.next_time() is None


def test_timer_queue_cancel_and_compaction() -> None:
    q = TimerQueue()
    for i in range(2000):
        q.schedule(i, float(i))
        q.cancel(i)
    assert q.next_time() is None
    assert len(q._heap) < 1000
    q.schedule("x", 1.0)
    q.cancel("x")
    q.schedule("x", 2.0)
    assert q.pop_due(5.0) == "x"
    assert q.pop_due(5.0) is None


# ---------------------------------------------------------------------- routing table
def test_subnet_routes_keep_selected_entry_first() -> None:
    r = SubnetRoutes(b"k" * 32, S)
    e1, e2, e3 = (RouteEntry(S, RID, p, 1, 0, 0.0) for p in ("a", "b", "c"))
    for e in (e1, e2, e3):
        r.add(e)
    assert r.selected() is None
    r.select(e3)
    assert r.entries[0] is e3 and r.selected() is e3
    r.select(e2)
    assert [e.neighbour for e in r.entries] == ["b", "c", "a"] and not e3.selected
    r.unselect()
    assert r.selected() is None and r.find("c") is e3


def test_routing_table_longest_prefix_lookup() -> None:
    t = RoutingTable()
    addr = ipaddress.IPv6Address("400:1:2:3::42")
    assert t.lookup(addr) is None
    t.mark_queried(S, 15.0)
    assert t.lookup(addr) == (S, None)
    routes = t.add_routes(S, b"k" * 32)  # replaces the query
    assert t.queried == {} and t.lookup(addr) == (S, routes)
    host = Subnet(addr, 128)
    host_routes = t.add_routes(host, b"h" * 32)
    assert t.lookup(addr) == (host, host_routes)
    assert t.lookup(ipaddress.IPv6Address("400:1:2:3::43")) == (S, routes)
    t.remove_routes(host)
    t.remove_routes(S)
    assert t.lookup(addr) is None
    assert t.lookup(ipaddress.IPv4Address("10.0.0.1")) is None


# ---------------------------------------------------------------------- engine fuzz
def _ident(i: int) -> tuple[bytes, Subnet]:
    pk = random.Random(i).randbytes(32)
    return pk + b"\0\0" + bytes(6), subnet_of(address_of(pk))


_IDS = [_ident(i) for i in range(6)]
_SUBNETS = st.one_of(
    st.sampled_from([s for _, s in _IDS]),
    st.builds(lambda n, p: Subnet(ipaddress.IPv4Address(n), p), st.integers(0, 2**32 - 1), st.integers(0, 32)),
    st.builds(lambda n, p: Subnet(ipaddress.IPv6Address(n), p), st.integers(0, 2**128 - 1), st.integers(0, 128)),
)
_RIDS = st.one_of(st.sampled_from([r for r, _ in _IDS]), st.binary(min_size=40, max_size=40))
_U16 = st.integers(0, 0xFFFF)
_TLVS = st.one_of(
    st.builds(Hello, _U16, _U16, _U16),
    st.builds(Ihu, _U16, _U16),
    st.builds(Update, st.just(0), _U16, _U16, st.one_of(_U16, st.just(INFINITE), st.just(0)), _SUBNETS, _RIDS),
    st.builds(RouteRequest, st.integers(0, 255), st.one_of(st.none(), _SUBNETS)),
    st.builds(SeqNoRequest, _U16, st.integers(1, 255), _RIDS, _SUBNETS),
)
_PEERS = st.sampled_from(["p1", "p2", "p3"])
_EVENTS = st.lists(
    st.one_of(
        st.tuples(st.just("tlv"), _PEERS, _TLVS),
        st.tuples(st.just("up"), _PEERS, st.integers(5, 15)),
        st.tuples(st.just("down"), _PEERS, st.none()),
        st.tuples(st.just("request"), st.none(), st.one_of(st.sampled_from([s for _, s in _IDS]), _SUBNETS)),
        st.tuples(st.just("time"), st.none(), st.floats(0.0, 400.0)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(_EVENTS)
def test_engine_survives_arbitrary_input_and_never_emits_ipv4(events: list[tuple[str, object, object]]) -> None:
    own_rid, own_subnet = _IDS[0]
    e = RouterEngine(own_rid[:32], own_rid, 0.0)
    now = 0.0
    peers: set[str] = set()
    out: list[tuple[str, Tlv]] = []
    for kind, peer, arg in events:
        if kind == "tlv":
            e.receive_tlv(peer, arg, now)  # type: ignore[arg-type]
        elif kind == "up":
            e.peer_up(PeerInfo(peer, arg), now)  # type: ignore[arg-type]
            peers.add(peer)  # type: ignore[arg-type]
        elif kind == "down":
            e.peer_down(peer, now)  # type: ignore[arg-type]
            peers.discard(peer)  # type: ignore[arg-type]
        elif kind == "request":
            e.request_route(arg.address, now)  # type: ignore[union-attr]
        else:
            now += arg  # type: ignore[operator]
            e.handle_timer(now)
        for peer_id in e.peers_to_close():
            peers.discard(peer_id)
        batch = e.tlvs_to_send()
        assert all(p in {x.peer_id for x in e.peers} for p, _ in batch)
        out += batch
        timer = e.get_timer()
        assert timer is not None  # the 300 s announcement is always armed
        fib = e.fib_snapshot()
        assert own_subnet not in fib
        assert all(s.is_ipv6 and s.prefix_len >= 64 for s in fib)
    for _, tlv in out:
        subnet = getattr(tlv, "subnet", None)
        assert subnet is None or subnet.is_ipv6
        tlv.encode_body()  # everything we emit is encodable


def test_source_table_keeps_several_router_ids_per_subnet() -> None:
    """Distances are stored per subnet with the router id on each; a second
    router id (an owner that restarted) is chained, looked up, counted and
    swept on its own."""
    t = SourceTable(capacity=10)
    old, new, third = (S, RID), (S, bytes(39) + b"\1"), (S, bytes(39) + b"\2")
    t.record(old, 100, 5, expires=10.0)
    t.record(new, 200, 1, expires=20.0)
    t.record(third, 300, 9, expires=30.0)
    assert len(t) == 3 and sorted(t) == sorted([old, new, third])
    got = [t.get(k) for k in (old, new, third)]
    assert [(fd.metric, fd.seqno) for fd in got if fd is not None] == [(100, 5), (200, 1), (300, 9)]
    assert not t.feasible(new, 1, 200) and t.feasible(old, 5, 99)
    assert t.sweep(15.0) == 1  # only the old router id's entry expired
    assert t.get(old) is None and t.get(new) is not None and t.get(third) is not None and len(t) == 2
    t.remove(third)
    assert sorted(t) == [new] and len(t) == 1
    assert t.sweep(25.0) == 1 and len(t) == 0 and list(t) == []


def test_learned_keeps_a_neighbours_entries_oldest_first() -> None:
    entries = [RouteEntry(S, RID, "a", i, 0, 0.0) for i in range(5)]
    learned = Learned()
    for e in entries:
        learned.append(e)
    assert len(learned) == 5 and learned.entries() == entries and learned.newest is entries[4]
    learned.unlink(entries[2])  # middle
    learned.unlink(entries[4])  # newest
    learned.unlink(entries[0])  # oldest
    assert len(learned) == 2 and learned.entries() == [entries[1], entries[3]]
    assert learned.oldest is entries[1] and learned.newest is entries[3]
    learned.append(entries[0])  # re-learned: now the newest
    assert learned.entries() == [entries[1], entries[3], entries[0]]
    for e in list(learned.entries()):
        learned.unlink(e)
    assert len(learned) == 0 and learned.entries() == [] and learned.oldest is learned.newest is None
