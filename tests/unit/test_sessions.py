"""Session keys, replay defences and downgrade resistance (docs/EXTENSIONS.md)
with two real DataPlanes and their SessionEngines wired back to back."""

from __future__ import annotations

import os
import struct

from common.crypto import SessionKey, shared_secret
from common.fib import FibReplica
from common.identity import Identity
from common.replay import NonceFilter, ReplayWindow
from common.wire.inner import L3_HEADER
from common.wire.session import SESSION_HEADER, Init, Resp, decode_session
from services.tund.dataplane import DataPlane, KeyCache
from services.tund.sessions import BLOCKED, SessionConfig, SessionEngine

T0 = 1000.0


def ident() -> Identity:
    return Identity.from_secret(os.urandom(32))


def node(me: Identity, peer: Identity, hop: str, cfg: SessionConfig | None = None, sessions: bool = True) -> DataPlane:
    fib = FibReplica()
    fib.load_snapshot(
        {"epoch": 1, "seq": 0, "entries": [[peer.address.packed[:8] + bytes(8), 64, hop, peer.public_key]]}
    )
    keys = KeyCache(me.private_key)
    engine = SessionEngine(me, keys.get, cfg or SessionConfig()) if sessions else None
    return DataPlane(me, fib, keys, tun=True, vnet=False, sessions=engine)


def echo(src: Identity, dst: Identity, seq: int) -> bytes:
    from common.wire.icmp import build_icmpv6

    return build_icmpv6(src.address.packed, dst.address.packed, 64, 128, 0, struct.pack("!HH", 7, seq) + bytes(40))


class Pair:
    """A and B joined directly; ``wire`` keeps every blob that crossed (a capture)."""

    def __init__(self, cfg: SessionConfig | None = None, b_sessions: bool = True) -> None:
        self.ia, self.ib = ident(), ident()
        self.a = node(self.ia, self.ib, "to-b", cfg)
        self.b = node(self.ib, self.ia, "to-a", cfg, sessions=b_sessions)
        self.wire: list[tuple[str, bytes]] = []
        self.drop_session_packets = False

    def pump(self, now: float, rounds: int = 10) -> None:
        for _ in range(rounds):
            moved = False
            for src, dst, name in ((self.a, self.b, "a->b"), (self.b, self.a, "b->a")):
                for blob in src.take_out().values():
                    moved = True
                    for pkt in packets(blob):
                        self.wire.append((name, pkt))
                        if self.drop_session_packets and is_negotiation(pkt):
                            continue
                        dst.from_peer(pkt, now)
            if not moved:
                return

    def send(self, src: str, seq: int, now: float) -> None:
        dp, me, peer = (self.a, self.ia, self.ib) if src == "a" else (self.b, self.ib, self.ia)
        dp.from_tun([echo(me, peer, seq)], now)

    def delivered(self, dp: DataPlane) -> list[int]:
        return [struct.unpack_from("!H", b"".join(bytes(x) for x in w), 50)[0] for w in dp.gro.flush()]


def packets(blob: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(blob):
        n = struct.unpack_from("!H", blob, pos + 5)[0]
        out.append(bytes(blob[pos : pos + 40 + n]))
        pos += 40 + n
    return out


def is_negotiation(pkt: bytes) -> bool:
    return len(pkt) - 40 - 28 in (4 + 88, 4 + 92, 4 + 8)  # INIT, RESP, CONFIRM sizes (no IPv6 packet is this short)


def negotiated(p: Pair, now: float = T0) -> None:
    p.send("a", 0, now)
    p.pump(now)
    p.send("b", 0, now)
    p.pump(now)
    p.delivered(p.a), p.delivered(p.b)


def test_negotiation_then_data_under_session_keys_not_the_static_key() -> None:
    p = Pair()
    negotiated(p)
    assert p.ia.address.packed[:8] in p.b.capable and p.ib.address.packed[:8] in p.a.capable
    start = len(p.wire)
    for i in range(1, 6):
        p.send("a", i, T0 + 1)
    p.pump(T0 + 1)
    assert p.delivered(p.b) == [1, 2, 3, 4, 5]
    static = SessionKey(shared_secret(p.ia.private_key, p.ib.public_key))
    data = [pkt for _, pkt in p.wire[start:]]
    assert len(data) == 5
    for pkt in data:
        try:
            static.open(pkt[40:])
            raise AssertionError("a session packet opened with the static key")
        except Exception as exc:
            assert "authentication" in str(exc)
    nonces = [pkt[-12:] for pkt in data]
    assert len({n[:4] for n in nonces}) == 1  # one session index ...
    ctrs = [int.from_bytes(n[4:], "big") for n in nonces]
    assert ctrs == sorted(ctrs) and len(set(ctrs)) == 5  # ... and a counter


def test_replayed_session_and_static_packets_are_dropped_and_counted() -> None:
    p = Pair()
    p.send("a", 0, T0)  # before negotiation: static key, random nonce
    p.pump(T0)
    assert p.delivered(p.b) == [0]
    p.send("b", 0, T0)
    p.pump(T0)
    p.delivered(p.a)
    for i in range(1, 4):
        p.send("a", i, T0 + 1)
    p.pump(T0 + 1)
    assert p.delivered(p.b) == [1, 2, 3]
    captured = [pkt for d, pkt in p.wire if d == "a->b"]
    before = p.b.all_counters()
    for pkt in captured:
        p.b.from_peer(pkt, T0 + 2)
    assert p.delivered(p.b) == []  # nothing written twice
    after = p.b.all_counters()
    replays = after["replay"] - before["replay"]
    downgrade = after["rx_downgrade"] - before["rx_downgrade"]
    assert replays >= 3 and replays + downgrade >= len(captured) - 1
    assert after["session_init_stale"] > before["session_init_stale"] or replays == len(captured)


def test_static_nonce_filter_catches_exact_replays_from_a_reference_peer() -> None:
    p = Pair(b_sessions=False)  # B behaves as the reference: static keys, drops the INIT type; A filters nonces
    p.send("a", 1, T0)
    p.pump(T0)
    assert p.delivered(p.b) == [1]
    p.send("b", 2, T0)
    p.pump(T0)
    assert p.delivered(p.a) == [2]
    assert p.a.all_counters()["session_init_sent"] >= 1
    assert p.b.counters["rx_inner_malformed"] >= 1  # the INIT, dropped like the reference drops it
    (data,) = [pkt for d, pkt in p.wire if d == "b->a"]
    p.a.from_peer(data, T0 + 1)
    assert p.delivered(p.a) == [] and p.a.counters["replay"] == 1


def test_rotation_keeps_delivering_and_old_keys_are_erased() -> None:
    cfg = SessionConfig(rekey_after=5.0, keep_old=2.0)
    p = Pair(cfg)
    negotiated(p)
    engine = p.a.sessions
    assert engine is not None
    first = engine.peers[p.ib.public_key].current
    got: list[int] = []
    seq = 1
    now = T0
    for step in range(40):  # 20 s in 0.5 s steps: several rotations
        now = T0 + step * 0.5
        for side in (p.a, p.b):
            side.tick(now)
        p.send("a", seq, now)
        seq += 1
        p.pump(now)
        got += p.delivered(p.b)
        p.send("b", 0, now)
        p.pump(now)
        p.delivered(p.a)
    assert got == list(range(1, seq))  # no packet lost across the rotations
    assert engine.counters["session_rekey"] >= 3
    assert first not in engine.peers[p.ib.public_key].sessions and first.send.aead is None  # type: ignore[union-attr]
    assert len(engine.by_index) <= 3


def test_rotation_after_a_packet_count() -> None:
    p = Pair(SessionConfig(rekey_packets=10))
    negotiated(p)
    engine = p.a.sessions
    assert engine is not None
    for i in range(12):
        p.send("a", i, T0 + 1)
    p.pump(T0 + 1)
    p.a.tick(T0 + 1)
    assert engine.counters["session_rekey"] >= 1


def test_middle_node_dropping_negotiation_blocks_visibly_never_static() -> None:
    cfg = SessionConfig(rekey_after=5.0, keep_old=1.0)
    p = Pair(cfg)
    negotiated(p)
    p.drop_session_packets = True
    start = len(p.wire)
    for step in range(1, 120):  # 60 s: past reject_after (25 s)
        now = T0 + step * 0.5
        p.a.tick(now)
        p.b.tick(now)
        p.send("a", step, now)
        p.pump(now)
        p.delivered(p.b)
    engine = p.a.sessions
    assert engine is not None
    assert engine.send_state(p.ib.public_key, T0 + 61) is BLOCKED
    assert p.a.counters["tx_session_blocked"] > 0
    assert any("blocked" in line for line in engine.log)
    static = SessionKey(shared_secret(p.ia.private_key, p.ib.public_key))
    for d, pkt in p.wire[start:]:
        if d == "a->b" and not is_negotiation(pkt):
            try:
                pt = static.open(pkt[40:])
            except Exception:
                continue
            raise AssertionError(f"data sent with the static key: {pt[:8].hex()}")


def test_restart_of_the_receiver_renegotiates() -> None:
    p = Pair()
    negotiated(p)
    p.b = node(p.ib, p.ia, "to-a")  # B restarts: no sessions, nothing remembered
    p.send("a", 1, T0 + 1)  # under the old session: B cannot open it, asks for a new one
    p.pump(T0 + 1)
    p.send("a", 2, T0 + 1.1)
    p.pump(T0 + 1.1)
    assert 2 in p.delivered(p.b)
    assert p.b.sessions is not None and p.b.sessions.counters["session_restart_hint"] == 1


def test_restart_of_the_sender_renegotiates_and_static_data_is_refused_meanwhile() -> None:
    p = Pair()
    negotiated(p)
    p.a = node(p.ia, p.ib, "to-b")  # A restarts
    p.send("a", 1, T0 + 1)  # static (A forgot), refused by B: A had shown support
    p.pump(T0 + 1)
    assert p.b.counters["rx_downgrade"] == 1
    p.send("a", 2, T0 + 1.2)  # negotiated meanwhile
    p.pump(T0 + 1.2)
    assert p.delivered(p.b) == [2]


def test_bad_session_packets_are_counted() -> None:
    p = Pair()
    negotiated(p)
    static = SessionKey(shared_secret(p.ia.private_key, p.ib.public_key))
    src, dst = p.ia.address.packed, p.ib.address.packed
    engine = p.b.sessions
    assert engine is not None

    def inject(pt: bytes) -> None:
        body = static.seal(pt)
        p.b.from_peer(struct.pack("!BBxxxHB", 1, 0, len(body), 63) + src + dst + body, T0 + 2)

    inject(SESSION_HEADER + b"\x01\x01\x00\x00")  # truncated INIT
    inject(SESSION_HEADER + b"\x09\x01\x00\x00")  # unknown kind
    inject(SESSION_HEADER + b"\x01\x07\x00\x00" + bytes(84))  # unknown version
    # an INIT that claims B is the initiator (a reflection)
    inject(Init(b"abcd", 1 << 62, p.ib.public_key, dst, dst, bytes(8)).encode())
    # a RESP nobody asked for
    inject(Resp(b"abcd", b"efgh", 1, p.ib.public_key, dst, src, bytes(8)).encode())
    c = engine.counters
    assert c["session_malformed"] == 3 and c["session_misaddressed"] == 1 and c["session_resp_unexpected"] == 1
    assert decode_session(Init(b"abcd", 1, bytes(32), src, dst, bytes(8)).encode()[4:]).timestamp == 1
    # a replayed (old) INIT from A
    inject(Init(b"wxyz", 1, p.ia.public_key, src, dst, bytes(8)).encode())
    assert c["session_init_stale"] == 1


def test_replay_window_edges() -> None:
    w = ReplayWindow(64)
    assert w.check_and_mark(0) and not w.check_and_mark(0)
    assert w.check_and_mark(5) and w.check_and_mark(3) and not w.check_and_mark(3)
    assert w.check_and_mark(100)
    assert not w.fresh(100 - 64)  # exactly the window's size behind: too old
    assert w.check_and_mark(100 - 63) and not w.check_and_mark(100 - 63)
    assert w.check_and_mark(100 + 64 + 10)  # a jump past the window clears it
    assert not w.fresh(100) and w.fresh(100 + 64 + 9)
    w2 = ReplayWindow(2048)
    for i in range(5000):
        assert w2.check_and_mark(i)
    assert not w2.fresh(4999 - 2048) and not w2.fresh(4000)


def test_nonce_filter_is_bounded() -> None:
    f = NonceFilter(4)
    for i in range(10):
        f.add(bytes([i]) * 12)
    assert len(f) == 4 and bytes([9]) * 12 in f and bytes([0]) * 12 not in f


def test_static_reference_packet_still_delivered_with_sessions_on() -> None:
    p = Pair()
    negotiated(p)
    # a third node, reference style (random nonce, static key), to B
    c = ident()
    p.b.fib.load_snapshot(
        {
            "epoch": 2,
            "seq": 0,
            "entries": [
                [p.ia.address.packed[:8] + bytes(8), 64, "to-a", p.ia.public_key],
                [c.address.packed[:8] + bytes(8), 64, "to-c", c.public_key],
            ],
        }
    )
    p.b.fib_changed(T0)
    body = SessionKey(shared_secret(c.private_key, p.ib.public_key)).seal(L3_HEADER + echo(c, p.ib, 9))
    p.b.from_peer(struct.pack("!BBxxxHB", 1, 0, len(body), 63) + c.address.packed + p.ib.address.packed + body, T0)
    assert p.delivered(p.b) == [9]


def test_lost_resp_is_recovered_by_a_fresh_init() -> None:
    p = Pair()
    p.drop_session_packets = True  # the first INIT/RESP exchange is lost
    p.send("a", 0, T0)
    p.pump(T0)
    p.drop_session_packets = False
    p.a.tick(T0 + 1.1)  # retry: a new INIT (the responder refuses a timestamp it has already taken)
    p.pump(T0 + 1.1)
    assert p.a.sessions is not None and p.a.sessions.counters["session_established"] == 1
    assert p.ib.address.packed[:8] in p.a.capable


def test_lost_confirm_with_one_way_traffic_from_the_responder_recovers() -> None:
    p = Pair()
    p.send("a", 0, T0)  # A initiates
    p.pump(T0, rounds=1)  # INIT -> B, RESP -> A ... (one round each way)
    for blob in p.a.take_out().values():  # A's CONFIRM (and nothing else) is lost
        assert all(is_negotiation(x) for x in packets(blob))
    # B, the responder, sends one way only: static (unconfirmed), refused by A which then confirms again
    for i in range(1, 4):
        p.send("b", i, T0 + 1 + i)
        p.pump(T0 + 1 + i)
    assert p.a.counters["rx_downgrade"] == 1
    assert p.delivered(p.a)[-2:] == [2, 3]


def test_crossed_handshakes_converge_without_losing_packets() -> None:
    cfg = SessionConfig(rekey_after=60.0, keep_old=2.0)
    p = Pair(cfg)
    p.send("a", 0, T0)
    p.send("b", 0, T0)  # both initiate at once
    p.pump(T0)
    p.delivered(p.a), p.delivered(p.b)
    got_a: list[int] = []
    got_b: list[int] = []
    for step in range(1, 21):  # 10 s: the replaced sessions' keep_old runs out meanwhile
        now = T0 + step * 0.5
        p.a.tick(now)
        p.b.tick(now)
        p.send("a", step, now)
        p.send("b", step, now)
        p.pump(now)
        got_b += p.delivered(p.b)
        got_a += p.delivered(p.a)
    assert got_a == got_b == list(range(1, 21))
