"""The router of a real node publishes its FIB's (epoch, seq) between
deltas (common/fib.py): a data-path process whose subscription came up
just after the last delta would otherwise never learn a route (seen when
every service started at once: messages held at a middle node's peerd
until they expired)."""

from __future__ import annotations

import time
from collections.abc import Callable

import zmq

from common import bus
from common.fib import FibReplica, is_head

from .nodes import Node
from .test_messages import line


def test_the_router_publishes_heads_that_match_its_snapshot(make_nodes: Callable[[int], list[Node]]) -> None:
    _a, b = line(make_nodes, 2)
    ctx = zmq.Context()
    try:
        sub = bus.connect(ctx, zmq.SUB, str(b.run_dir), "router.fib")
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        late = FibReplica()  # a replica that never saw a delta nor took a snapshot
        heads = []
        deadline = time.monotonic() + 10
        while len(heads) < 2 and time.monotonic() < deadline:
            if sub.poll(500):
                msg = bus.unpack(sub.recv_multipart())
                if is_head(msg.fields):
                    heads.append(msg.fields)
        assert len(heads) == 2, "no FIB head from the router within 10 s"
        assert not late.apply_delta(heads[-1])  # behind: it takes a snapshot
        late.load_snapshot(bus.rpc_call(ctx, str(b.run_dir), "router", "fib_snapshot"))
        assert late.epoch == heads[-1]["epoch"] and late.seq >= heads[-1]["seq"]
        sub.close(linger=0)
    finally:
        ctx.destroy(linger=0)
