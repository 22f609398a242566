"""Message engines talking to each other over the in-memory network: delivery
exactly once under loss and reordering, status transitions, replies, read
receipts, deadlines, topic ACLs and forward sockets."""

from __future__ import annotations

import ipaddress
import random

import pytest

from common.wire.message import Abort, Chunk, ChunkAck, Done, DoneAck, Init, InitAck, Read
from services.msgbus.engine import FORGET_AFTER, SEND_WINDOW, MessageEngine
from services.msgbus.events import ForwardToSocket, MessageReceived, ReplyReceived
from services.msgbus.topics import TopicConfig

from .test_msgbus_helpers import Net, drain_inbox, ip, payload

SIZES = [0, 1, 249, 250, 1299, 1300, 1301, 1400, 1549, 1550, 2600, 1 << 20]


def pair(net: Net, **kw: object) -> tuple[MessageEngine, MessageEngine]:
    a = MessageEngine(ip(1), net.now, rng=random.Random(11), **kw)  # type: ignore[arg-type]
    b = MessageEngine(ip(2), net.now, rng=random.Random(22), **kw)  # type: ignore[arg-type]
    net.add(a)
    net.add(b)
    return a, b


def check_exactly_once(received: list, expected: dict[bytes, tuple[bytes, bytes]]) -> None:
    got = {}
    for m in received:
        assert m.id not in got, "delivered twice"
        got[m.id] = (m.topic, m.data)
    assert got.keys() == expected.keys()
    for mid, (topic, data) in expected.items():
        assert got[mid][0] == topic
        assert got[mid][1] == data, f"content of {mid.hex()} differs"


@pytest.mark.parametrize(
    ("loss", "delay", "seed"),
    [(0.0, (0.01, 0.01), 1), (0.2, (0.005, 0.15), 2), (0.2, (0.005, 0.15), 3)],
    ids=["clean", "lossy-a", "lossy-b"],
)
def test_all_sizes_arrive_exactly_once(loss: float, delay: tuple[float, float], seed: int) -> None:
    net = Net(seed=seed, loss=loss, dup=0.05 if loss else 0.0, delay=delay, keep_log=False)
    a, b = pair(net)
    expected = {}
    for i, n in enumerate(SIZES):
        topic = f"topic-{i}".encode() if i % 3 else b""
        data = payload(n, seed)
        expected[a.push(ip(2), topic, data, net.now)] = (topic, data)
    received: list = []

    # READ is sent once and never acknowledged, so under loss some stay "received"
    final = ("read",) if not loss else ("received", "read")

    def all_done() -> bool:
        received.extend(drain_inbox(b, net.now))
        return all(a.status(i, net.now)["state"] in final for i in expected)

    assert net.run(120.0, all_done), {i.hex(): a.status(i, net.now) for i in expected}
    net.run(net.now + 30.0)  # retransmissions still in the air must not deliver anything again
    received.extend(drain_inbox(b, net.now))
    check_exactly_once(received, expected)
    assert b.counters["delivered"] == len(SIZES)
    if loss:
        assert a.counters["tx_chunk_retransmit"] > 0


def test_three_engines_all_pairs_under_loss() -> None:
    net = Net(seed=5, loss=0.2, dup=0.05, delay=(0.005, 0.1), keep_log=False)
    engines = [net.add(MessageEngine(ip(n), 0.0, rng=random.Random(n))) for n in (1, 2, 3)]
    expected: dict[bytes, dict[bytes, tuple[bytes, bytes]]] = {e.own_ip: {} for e in engines}
    for k, src in enumerate(engines):
        for dst in engines:
            if dst is src:
                continue
            for n in (0, 700, 1400, 5000 + k):
                data = payload(n, k)
                topic = b"t%d" % n
                expected[dst.own_ip][src.push(dst.own_ip, topic, data, 0.0)] = (topic, data)
    received: dict[bytes, list] = {e.own_ip: [] for e in engines}

    def done() -> bool:
        for e in engines:
            received[e.own_ip].extend(drain_inbox(e, net.now))
        return all(len(received[a]) == len(expected[a]) for a in received)

    assert net.run(60.0, done)
    net.run(net.now + 10.0)
    for e in engines:
        received[e.own_ip].extend(drain_inbox(e, net.now))
        check_exactly_once(received[e.own_ip], expected[e.own_ip])
        assert all(m.src_ip != e.own_ip and m.dst_ip == e.own_ip for m in received[e.own_ip])


def test_status_transitions_pending_sending_received_read() -> None:
    net = Net(delay=(0.05, 0.05))
    a, b = pair(net, wall_now=1_700_000_000.0)
    mid = a.push(ip(2), b"t", payload(5000), 0.0)
    seen = []

    def record() -> bool:
        st = a.status(mid, net.now)["state"]
        name = st if isinstance(st, str) else "sending"
        if not seen or seen[-1] != name:
            seen.append(name)
        return name == "received"

    assert net.run(10.0, record)
    assert seen == ["pending", "sending", "received"]
    info = a.status(mid, net.now)
    assert info == {
        "dst": str(ipaddress.IPv6Address(ip(2))),
        "state": "received",
        "created": 1_700_000_000,
        "deadline": 1_700_000_300,
        "msgLen": 5000,
    }
    msg = b.pop(None, False, net.now)
    assert msg is not None and msg.data == payload(5000)
    net.run(net.now + 1.0)
    assert a.status(mid, net.now)["state"] == "read"


def test_sending_state_counts_chunks() -> None:
    net = Net(delay=(0.05, 0.05))
    a, _ = pair(net)
    mid = a.push(ip(2), b"", payload(4000), 0.0)  # 4 chunks
    net.run(0.1001)  # INIT ACK arrived at 0.1, chunks sent, no chunk ACK yet
    assert a.status(mid, net.now)["state"] == {"sending": {"pending": 0, "sent": 4, "acked": 0}}
    net.run(0.2001)
    assert a.status(mid, net.now)["state"] == {"sending": {"pending": 0, "sent": 0, "acked": 4}}


def test_window_limits_chunks_in_flight() -> None:
    from services.msgbus.outbound import SendTiming

    net = Net(delay=(0.05, 0.05))
    a, b = pair(net, timing=SendTiming(window=3))
    mid = a.push(ip(2), b"", payload(10 * 1300), 0.0)
    net.run(0.1001)
    assert a.status(mid, net.now)["state"] == {"sending": {"pending": 7, "sent": 3, "acked": 0}}
    assert net.run(5.0, lambda: b.inbox_size() == 1)


def test_read_receipt_on_peek_and_pop() -> None:
    net = Net()
    a, b = pair(net)
    m1 = a.push(ip(2), b"x", b"one", 0.0)
    m2 = a.push(ip(2), b"y", b"two", 0.0)
    assert net.run(5.0, lambda: b.inbox_size() == 2)
    peeked = b.pop(b"y", True, net.now)
    assert peeked is not None and peeked.id == m2 and b.inbox_size() == 2
    net.run(net.now + 1.0)
    assert a.status(m2, net.now)["state"] == "read"
    assert a.status(m1, net.now)["state"] == "received"
    assert b.pop(b"z", False, net.now) is None  # exact topic match only
    assert b.pop(b"", False, net.now) is None
    reads = net.sent(Read)
    assert len(reads) == 1 and reads[0].src == ip(2) and reads[0].dst == ip(1)
    assert [m.data for m in drain_inbox(b, net.now)] == [b"one", b"two"]  # FIFO
    net.run(net.now + 1.0)
    assert a.status(m1, net.now)["state"] == "read"
    assert len(net.sent(Read)) == 3


def test_reply_round_trip_to_waiter_and_to_inbox() -> None:
    net = Net(loss=0.1, delay=(0.01, 0.05), seed=9)
    a, b = pair(net)
    mid = a.push(ip(2), b"ask", b"question", 0.0)
    a.expect_reply(mid)
    assert net.run(10.0, lambda: b.inbox_size() == 1)
    q = b.pop(b"ask", False, net.now)
    assert q is not None and not q.is_reply
    rid = b.push(q.src_ip, b"ignored topic", b"answer", net.now, reply_to=q.id)
    assert rid == mid
    assert net.run(net.now + 10.0, lambda: any(isinstance(e, ReplyReceived) for e in net.events[ip(1)]))
    (reply,) = [e.message for e in net.events[ip(1)] if isinstance(e, ReplyReceived)]
    assert (reply.id, reply.data, reply.topic, reply.is_reply, reply.src_ip) == (mid, b"answer", b"", True, ip(2))
    assert a.inbox_size() == 0  # handed to the waiter only
    net.run(net.now + 2.0)
    assert b.status(rid, net.now)["state"] == "received"  # no READ for a reply given to a waiter
    # a second exchange without a waiter: the reply lands in the inbox
    mid2 = a.push(ip(2), b"ask", b"q2", net.now)
    assert net.run(net.now + 10.0, lambda: b.inbox_size() == 1)
    b.push(ip(1), b"", b"a2", net.now, reply_to=b.pop(None, False, net.now).id)
    assert net.run(net.now + 10.0, lambda: a.inbox_size() == 1)
    r2 = a.pop(None, False, net.now)
    assert (r2.id, r2.data, r2.is_reply) == (mid2, b"a2", True)


def test_cancelled_waiter_sends_reply_to_inbox() -> None:
    net = Net()
    a, b = pair(net)
    mid = a.push(ip(2), b"", b"q", 0.0)
    a.expect_reply(mid)
    a.cancel_reply(mid)
    b.push(ip(1), b"", b"r", 0.0, reply_to=mid)
    assert net.run(5.0, lambda: a.inbox_size() == 1)
    assert not any(isinstance(e, ReplyReceived) for e in net.events.get(ip(1), []))


def test_unanswered_destination_aborts_at_300s_and_is_forgotten_at_600s() -> None:
    net = Net()
    a = net.add(MessageEngine(ip(1), 0.0, wall_now=1000.0))
    mid = a.push(ip(9), b"", payload(3000), 0.0)  # nobody lives at ip(9)
    net.run(SEND_WINDOW - 0.05)
    assert a.status(mid, net.now)["state"] == "pending"
    assert len(net.sent(Init)) > 100  # retried all along (backed off to at most 1 s)
    net.run(SEND_WINDOW + 0.05)
    assert a.status(mid, net.now)["state"] == "aborted"
    aborts = net.sent(Abort)
    assert len(aborts) == 1 and aborts[0].dst == ip(9) and aborts[0].time == pytest.approx(SEND_WINDOW)
    inits = len(net.sent(Init))
    net.run(FORGET_AFTER - 0.05)
    assert a.status(mid, net.now) is not None
    assert len(net.sent(Init)) == inits and len(net.sent(Abort)) == 1
    net.run(FORGET_AFTER + 0.05)
    assert a.status(mid, net.now) is None
    assert a.get_timer() is None  # nothing left to do


def test_receiver_going_silent_mid_transfer_gets_one_abort() -> None:
    net = Net()
    a, b = pair(net)
    mid = a.push(ip(2), b"", payload(20_000), 0.0)
    net.drop_if = lambda src, dst, pkt: isinstance(pkt, ChunkAck) and pkt.index >= 5
    net.run(SEND_WINDOW + 1.0)
    assert a.status(mid, net.now)["state"] == "aborted"
    assert len(net.sent(Abort)) == 1
    assert a.counters["send_restarted"] > 0  # the stall restart kept trying
    assert b.queue_depths()["pending"] == 0  # the ABORT discarded the partial message
    assert b.inbox_size() == 0


def test_lost_done_ack_is_answered_again() -> None:
    """The reference ignores a DONE for a completed message; we re-acknowledge it so the
    sender reaches "received" instead of aborting after 300 s."""
    net = Net()
    a, b = pair(net)
    dropped = []

    def drop_first_done_ack(src: bytes, dst: bytes, pkt: object) -> bool:
        if isinstance(pkt, DoneAck) and not dropped:
            dropped.append(pkt)
            return True
        return False

    net.drop_if = drop_first_done_ack
    mid = a.push(ip(2), b"", payload(3000), 0.0)
    assert net.run(5.0, lambda: a.status(mid, net.now)["state"] == "received")
    assert dropped and b.counters["done_completed_acked"] == 1
    assert b.inbox_size() == 1 and b.counters["delivered"] == 1


def test_duplicate_init_keeps_received_chunks() -> None:
    net = Net(delay=(0.05, 0.05))
    a, b = pair(net)
    mid = a.push(ip(2), b"", payload(3000), 0.0)
    net.run(0.16)  # chunks arrived at 0.15, their ACKs and DONE are on the way
    assert b.queue_depths()["pending"] == 1
    b.receive(ip(1), ip(2), Init(mid, 3000, b""), net.now)  # a late duplicate INIT
    assert net.run(2.0, lambda: b.inbox_size() == 1)
    assert b.counters["init_duplicate"] == 1
    assert a.counters["tx_chunk_retransmit"] == 0


@pytest.mark.parametrize("default_accept", [True, False])
def test_topic_whitelist_and_default_action(default_accept: bool) -> None:
    net = Net()
    topics = TopicConfig(default_accept=default_accept)
    topics.add_source(b"private", str(ipaddress.IPv6Network((ip(3), 64), strict=False)))
    topics.add_topic(b"closed")
    b = net.add(MessageEngine(ip(2), 0.0, topics=topics))
    a = net.add(MessageEngine(ip(1), 0.0))
    c = net.add(MessageEngine(ip(3), 0.0))
    denied = a.push(ip(2), b"private", b"from a", 0.0)
    closed = c.push(ip(2), b"closed", b"from c", 0.0)
    allowed = c.push(ip(2), b"private", b"from c", 0.0)
    other = a.push(ip(2), b"other", b"other topic", 0.0)
    net.run(5.0)
    assert not [s for s in net.sent(InitAck, src=ip(2)) if s.packet.id in (denied, closed)]
    assert a.status(denied, net.now)["state"] == "pending"
    assert c.status(closed, net.now)["state"] == "pending"
    assert c.status(allowed, net.now)["state"] == "received"
    assert a.status(other, net.now)["state"] == ("received" if default_accept else "pending")
    assert b.counters["drop_init_acl"] > 0
    assert sorted(m.data for m in drain_inbox(b, net.now)) == sorted(
        [b"from c"] + ([b"other topic"] if default_accept else [])
    )


def test_replies_bypass_the_acl() -> None:
    net = Net()
    a = net.add(MessageEngine(ip(1), 0.0, topics=TopicConfig(default_accept=False)))
    b = net.add(MessageEngine(ip(2), 0.0))
    mid = a.push(ip(2), b"", b"q", 0.0)
    assert net.run(5.0, lambda: b.inbox_size() == 1)
    b.push(ip(1), b"", b"r", net.now, reply_to=mid)
    assert net.run(net.now + 5.0, lambda: a.inbox_size() == 1)
    plain = b.push(ip(1), b"", b"not a reply", net.now)
    net.run(net.now + 5.0)
    assert b.status(plain, net.now)["state"] == "pending"


def test_forward_socket_reply_and_failure() -> None:
    net = Net()
    topics = TopicConfig()
    topics.add_source(b"svc", "400::/7")
    topics.set_forward_socket(b"svc", "/run/app.sock")
    a = net.add(MessageEngine(ip(1), 0.0))
    b = net.add(MessageEngine(ip(2), 0.0, topics=topics))
    m1 = a.push(ip(2), b"svc", b"request 1", 0.0)
    a.expect_reply(m1)
    m2 = a.push(ip(2), b"svc", b"request 2", 0.0)
    assert net.run(5.0, lambda: len([e for e in net.events.get(ip(2), []) if isinstance(e, ForwardToSocket)]) == 2)
    fwd = {e.message.id: e for e in net.events[ip(2)] if isinstance(e, ForwardToSocket)}
    assert fwd[m1].socket_path == "/run/app.sock" and fwd[m1].message.data == b"request 1"
    assert b.pop(None, True, net.now) is None  # being forwarded: not in the poppable inbox
    b.forward_done(fwd[m1].message, b"response 1", net.now)
    b.forward_done(fwd[m2].message, None, net.now)
    b.forward_done(fwd[m2].message, b"too late", net.now)  # ignored: already in the inbox
    assert b.counters["forward_done_unknown"] == 1
    assert any(isinstance(e, MessageReceived) and e.message.id == m2 for e in b.events())
    assert net.run(net.now + 5.0, lambda: any(isinstance(e, ReplyReceived) for e in net.events[ip(1)]))
    (reply,) = [e.message for e in net.events[ip(1)] if isinstance(e, ReplyReceived)]
    assert reply.data == b"response 1" and reply.id == m1
    left = drain_inbox(b, net.now)
    assert [m.data for m in left] == [b"request 2"]
    net.run(net.now + 1.0)
    assert a.status(m2, net.now)["state"] == "read"


def test_forward_empty_reply_goes_to_inbox() -> None:
    topics = TopicConfig()
    topics.add_source(b"svc", "400::/7")
    topics.set_forward_socket(b"svc", "/s")
    net = Net()
    a = net.add(MessageEngine(ip(1), 0.0))
    b = net.add(MessageEngine(ip(2), 0.0, topics=topics))
    a.push(ip(2), b"svc", b"req", 0.0)
    assert net.run(5.0, lambda: bool(net.events.get(ip(2))))
    (ev,) = net.events[ip(2)]
    assert isinstance(ev, ForwardToSocket)
    b.forward_done(ev.message, b"", net.now)
    assert b.pop(b"svc", False, net.now).data == b"req"


def test_ack_from_wrong_source_is_ignored() -> None:
    a = MessageEngine(ip(1), 0.0)
    mid = a.push(ip(2), b"", b"hello", 0.0)
    a.receive(ip(3), ip(1), InitAck(mid, 5, 0), 0.01)
    a.receive(ip(3), ip(1), Read(mid), 0.01)
    assert a.status(mid, 0.01)["state"] == "pending"
    assert a.counters["drop_initack_source"] == 1 and a.counters["drop_read_source"] == 1
    a.receive(ip(2), ip(1), InitAck(mid, 5, 0), 0.02)
    out = [p for _, _, p in a.packets_to_send()]
    assert any(isinstance(p, Chunk) for p in out)
    a.receive(ip(2), ip(1), ChunkAck(mid, 0, 0, 5), 0.03)
    out = [p for _, _, p in a.packets_to_send()]
    assert [type(p) for p in out] == [Done]
    a.receive(ip(2), ip(1), DoneAck(mid, 1, b"\0" * 32), 0.04)  # wrong echoed checksum
    assert a.status(mid, 0.04)["state"] == {"sending": {"pending": 0, "sent": 0, "acked": 1}}
    a.receive(ip(2), ip(1), DoneAck(mid, 1, out[0].checksum), 0.05)
    assert a.status(mid, 0.05)["state"] == "received"


def test_timer_is_100ms_tick_while_sending_and_idle_otherwise() -> None:
    a = MessageEngine(ip(1), 0.0)
    assert a.get_timer() is None
    a.push(ip(2), b"", b"x", 5.0)
    assert a.get_timer() == pytest.approx(5.1)
    assert len(a.packets_to_send()) == 1  # INIT goes out at once
    a.handle_timer(5.1)
    assert len(a.packets_to_send()) == 1  # resent after 100 ms
    a.handle_timer(5.2)
    assert a.packets_to_send() == []  # then backed off (200 ms)
    a.handle_timer(5.3)
    assert len(a.packets_to_send()) == 1
