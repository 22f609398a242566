"""A burst for one destination bigger than the data path's ring takes:
msgbus hands tund a whole window of retransmits in one bus message (seen
after a receiver's msgbus was killed mid-transfer: megabytes for one
destination), and tund used to hand peerd all of it as one record, which a
ring refuses when it is over half its size, on every retry, so the
transfer never got through. tund now cuts its hand-over at packet
boundaries (common.wire.rules.split_batch)."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable

import zmq

from common import bus
from common.shmring import DEFAULT_SIZE
from common.wire.inner import MESSAGE_HEADER

from .nodes import Node, wait_for
from .test_messages import line


def test_a_burst_larger_than_the_ring_reaches_the_far_tund(make_nodes: Callable[..., list[Node]]) -> None:
    a, b = line(make_nodes, 2)
    wait_for("a route from A to B", lambda: a.lookup(b.address), 20)
    frames = [MESSAGE_HEADER + os.urandom(1000) for _ in range(6000)]
    assert sum(len(f) for f in frames) > DEFAULT_SIZE // 2  # one record of it would never fit
    before = b.counters("tund").get("rx_message_to_msgbus", 0)
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 2000)
        sock.connect(bus.endpoint(str(a.run_dir), "tund.in"))
        dst = ipaddress.IPv6Address(b.address).packed
        sock.send_multipart(bus.pack("send_message", {"dst": dst}, frames))  # as msgbus sends a window
        sock.close()
    finally:
        ctx.term()

    def arrived() -> int | None:
        n = b.counters("tund").get("rx_message_to_msgbus", 0) - before
        return n if n >= len(frames) // 2 else None

    n = wait_for("most of the burst at B's tund", arrived, 30)
    counters = a.counters("tund")
    assert counters.get("to_peerd_dropped_too_big", 0) == 0
    print(f"{n} of {len(frames)} arrived; A's tund: {counters}")
