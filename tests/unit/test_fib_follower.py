"""The FIB follower (common/fib.FibReplica) as the data-path processes use
it: deltas from a publisher arrive in order but some are lost (a SUB that
was not connected yet, a restart of the router: new epoch); on every gap
the follower takes a snapshot. Whatever is lost, it ends with the
publisher's table, and its longest-prefix lookups agree with ipaddress."""

from __future__ import annotations

import ipaddress
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from common.fib import FibReplica, Route, make_delta, make_head

PREFIXES = [0, 7, 48, 60, 63, 64, 65, 127, 128]


class Publisher:
    """What the router publishes (services/router/service.py flush and fib_snapshot)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.seq = 0
        self.table: dict[tuple[bytes, int], Route] = {}

    def snapshot(self) -> dict[str, object]:
        entries = [[net, plen, r.next_hop, r.public_key] for (net, plen), r in self.table.items()]
        return {"epoch": self.epoch, "seq": self.seq, "entries": entries}

    def change(self, changes: list[tuple[bytes, int, Route | None]]) -> dict[str, object]:
        """Changes in the order they happened (None: removed), published as the router does."""
        for net, plen, route in changes:
            if route is None:
                self.table.pop((net, plen), None)
            else:
                self.table[(net, plen)] = route
        self.seq += 1
        return make_delta(self.epoch, self.seq, changes)


def network(rng: random.Random, plen: int) -> bytes:
    net = ipaddress.IPv6Network((rng.getrandbits(128) & ~((1 << (128 - plen)) - 1), plen))
    return net.network_address.packed


def brute_force(table: dict[tuple[bytes, int], Route], addr: bytes) -> Route | None:
    ip = ipaddress.IPv6Address(addr)
    best: tuple[int, Route] | None = None
    for (net, plen), route in table.items():
        if ip in ipaddress.IPv6Network((net, plen)) and (best is None or plen > best[0]):
            best = (plen, route)
    return best[1] if best else None


def follow(seed: int, steps: int, loss: float, restarts: int) -> None:
    rng = random.Random(seed)
    pub = Publisher(epoch=rng.getrandbits(31))
    fib = FibReplica()
    fib.load_snapshot(pub.snapshot())
    known: list[tuple[bytes, int]] = []
    snapshots = gaps_seen = 0
    gap = False
    restart_at = set(rng.sample(range(steps), restarts)) if restarts else set()
    for step in range(steps):
        if step in restart_at:  # the router restarted: new epoch, table rebuilt from nothing
            pub = Publisher(epoch=rng.getrandbits(31))
            known = []
        changes: list[tuple[bytes, int, Route | None]] = []
        for _ in range(rng.randint(1, 6)):
            if known and rng.random() < 0.4:
                changes.append((*known.pop(rng.randrange(len(known))), None))
            else:
                if known and rng.random() < 0.3:  # the same prefix again (e.g. removed and back in one turn)
                    key = known[rng.randrange(len(known))]
                else:
                    plen = rng.choice(PREFIXES)
                    key = (network(rng, plen), plen)
                hop = rng.choice([None, "tcp-a-1", "tcp-b-2", "quic-c-3"])
                changes.append((*key, Route(hop, rng.randbytes(32))))
                known.append(key)
        delta = pub.change(changes)
        if rng.random() < loss:
            gap = True
            continue  # lost on the way
        if gap:
            gaps_seen += 1
            gap = False
        if not fib.apply_delta(delta):
            fib.load_snapshot(pub.snapshot())  # what tund/peerd/msgbus do on a gap
            snapshots += 1
    # the last deltas may have been lost: the router's next head (once a second) says so
    if not fib.apply_delta(make_head(pub.epoch, pub.seq)):
        fib.load_snapshot(pub.snapshot())
        snapshots += 1
    assert len(fib) == len(pub.table)
    probes = [net for net, _ in pub.table] + [rng.randbytes(16) for _ in range(50)]
    for net, _plen in list(pub.table)[:50]:
        probes.append(bytes(a | b for a, b in zip(net, rng.randbytes(16), strict=True)))  # inside or beside
    for addr in probes:
        assert fib.lookup(addr) == brute_force(pub.table, addr)
    assert snapshots >= min(gaps_seen, 1)  # a gap is never applied over


def test_follower_without_loss_needs_no_snapshot() -> None:
    follow(seed=1, steps=200, loss=0.0, restarts=0)


def test_follower_recovers_from_lost_deltas_and_restarts() -> None:
    for seed in range(5):
        follow(seed=seed, steps=200, loss=0.2, restarts=2)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), steps=st.integers(1, 60), loss=st.floats(0, 0.9), restarts=st.integers(0, 3))
def test_follower_always_ends_with_the_publishers_table(seed: int, steps: int, loss: float, restarts: int) -> None:
    follow(seed, steps, loss, min(restarts, steps))


def test_stale_and_duplicate_deltas_change_nothing() -> None:
    pub = Publisher(epoch=5)
    fib = FibReplica()
    d1 = pub.change([(bytes(16), 64, Route("a", bytes(32)))])
    fib.load_snapshot(pub.snapshot())
    assert fib.apply_delta(d1)  # already in the snapshot: accepted, nothing applied twice
    assert len(fib) == 1
    d2 = pub.change([(bytes(16), 64, None)])
    assert fib.apply_delta(d2) and len(fib) == 0
    assert fib.apply_delta(d1) and len(fib) == 0  # a late duplicate of an old delta


def test_a_prefix_removed_and_set_again_in_one_turn_stays() -> None:
    """The router's flush used to split one turn's changes into sets and dels;
    a replica applies sets first, so 'del then set' of one prefix lost the route."""
    net = bytes.fromhex("04" + "00" * 15)
    route = Route("tcp-a-1", bytes(32))
    delta = make_delta(1, 1, [(net, 64, Route("tcp-b-2", bytes(32))), (net, 64, None), (net, 64, route)])
    assert delta["del"] == [] and len(delta["set"]) == 1
    fib = FibReplica()
    fib.load_snapshot({"epoch": 1, "seq": 0, "entries": []})
    assert fib.apply_delta(delta)
    assert fib.lookup(net) == route
    gone = make_delta(1, 2, [(net, 64, route), (net, 64, None)])
    assert gone["set"] == [] and gone["del"] == [[net, 64]]


def test_a_head_reveals_a_lost_last_delta_and_changes_nothing() -> None:
    """No delta follows the last one, so only the router's head shows a
    replica that missed it (its SUB came up a moment too late)."""
    pub = Publisher(epoch=7)
    fib = FibReplica()
    assert not fib.apply_delta(make_head(7, 0))  # no snapshot yet
    fib.load_snapshot(pub.snapshot())
    assert fib.apply_delta(make_head(7, 0))  # up to date
    lost = pub.change([(bytes(16), 64, Route("a", bytes(32)))])
    assert lost["seq"] == 1 and len(fib) == 0
    assert not fib.apply_delta(make_head(7, 1))  # behind: take a snapshot
    assert fib.seq == 0 and len(fib) == 0  # a head applies nothing
    fib.load_snapshot(pub.snapshot())
    assert len(fib) == 1 and fib.apply_delta(make_head(7, 1))
    assert not fib.apply_delta(make_head(8, 1))  # the router restarted
