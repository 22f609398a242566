"""common/bus.py over real ZeroMQ IPC sockets in a temporary run directory."""

from __future__ import annotations

import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import pytest
import zmq

from common import bus


@pytest.fixture
def run_dir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="bus", dir="/tmp") as d:  # short: IPC paths are limited
        yield d


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def test_pack_unpack_round_trip_keeps_fields_and_payloads() -> None:
    frames = bus.pack("ctl", {"peer": "tcp-1", "n": 3, "raw": b"\x00\xff"}, [b"a", b"", b"\x01" * 70_000])
    msg = bus.unpack(frames)
    assert msg.kind == "ctl" and msg.fields == {"peer": "tcp-1", "n": 3, "raw": b"\x00\xff"}
    assert msg.payloads == [b"a", b"", b"\x01" * 70_000]
    assert bus.unpack([zmq.Frame(frames[0]), zmq.Frame(b"x")]).payloads == [b"x"]


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b"\xc1"],  # never-used msgpack byte
        [b"\x92\x01"],  # truncated array
        [msgpack.packb([1, 2])],  # not a map
        [msgpack.packb({"v": 1})],  # no kind
        [msgpack.packb({"k": 5})],  # kind not a string
        [msgpack.packb({"k": "x"}) + b"trailing"],
    ],
)
def test_malformed_headers_are_bus_errors(frames: list[bytes]) -> None:
    with pytest.raises(bus.BusError):
        bus.unpack(frames)


def test_endpoint_refuses_paths_longer_than_a_unix_socket_takes() -> None:
    assert bus.endpoint("/run/x", "router.rpc") == "ipc:///run/x/router.rpc.ipc"
    with pytest.raises(bus.BusError, match="too long"):
        bus.endpoint("/" + "d" * 120, "router.rpc")


def test_split_envelope_and_parse_request_count_the_malformed() -> None:
    drops: Counter[str] = Counter()
    assert bus.parse_request([b"id", b"", *bus.pack("info")], drops) == ([b"id"], bus.Message("info", {}, []))
    assert bus.parse_request([b"id", *bus.pack("info")], drops) is None  # no delimiter
    assert bus.parse_request([b"id", b"", b"\xc1"], drops) is None
    assert drops["rpc_malformed"] == 2


def test_data_sender_drops_and_counts_when_nobody_listens(ctx: zmq.Context, run_dir: str) -> None:
    drops: Counter[str] = Counter()
    sender = bus.Sender(bus.connect(ctx, zmq.PUSH, run_dir, "nobody.in", hwm=1), drops, "nobody")
    results = [sender.data("local", None, [b"a", b"b"]) for _ in range(10)]  # queued up to the HWM, then dropped
    assert results[0] and not results[-1]
    assert drops["bus_full_nobody"] == 2 * results.count(False)


def test_data_and_control_reach_a_bound_receiver(ctx: zmq.Context, run_dir: str) -> None:
    inbox = bus.bind(ctx, zmq.PULL, run_dir, "svc.in")
    drops: Counter[str] = Counter()
    sender = bus.Sender(bus.connect(ctx, zmq.PUSH, run_dir, "svc.in"), drops, "svc")
    assert sender.control("hello", {"pid": 1})
    inbox.setsockopt(zmq.RCVTIMEO, 2000)
    assert bus.unpack(inbox.recv_multipart()) == bus.Message("hello", {"pid": 1}, [])
    assert sender.data("local", {"x": 1}, [b"pkt"])
    assert bus.unpack(inbox.recv_multipart()).payloads == [b"pkt"]
    assert not drops


def test_bind_replaces_a_stale_socket_file(ctx: zmq.Context, run_dir: str) -> None:
    stale = Path(run_dir) / "svc.in.ipc"
    stale.write_bytes(b"")  # a killed predecessor's leftover
    inbox = bus.bind(ctx, zmq.PULL, run_dir, "svc.in")
    out = bus.connect(ctx, zmq.PUSH, run_dir, "svc.in")
    out.send_multipart(bus.pack("x"))
    inbox.setsockopt(zmq.RCVTIMEO, 2000)
    assert bus.unpack(inbox.recv_multipart()).kind == "x"


def serve_once(ctx: zmq.Context, run_dir: str, answer: dict[str, object] | None) -> threading.Thread:
    """A ROUTER that answers one request (or none: ``answer`` None)."""
    server = bus.bind(ctx, zmq.ROUTER, run_dir, "svc.rpc")

    def run() -> None:
        server.setsockopt(zmq.RCVTIMEO, 3000)
        try:
            frames = server.recv_multipart()
        except zmq.Again:
            return
        request = bus.parse_request(frames, Counter())
        assert request is not None
        envelope, msg = request
        if answer is None:
            return
        if "error" in answer:
            bus.rpc_reply(server, envelope, error=str(answer["error"]))
        else:
            bus.rpc_reply(server, envelope, {"echo": msg.fields, "method": msg.kind})

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_rpc_call_gets_its_answer(ctx: zmq.Context, run_dir: str) -> None:
    t = serve_once(ctx, run_dir, {})
    assert bus.rpc_call(ctx, run_dir, "svc", "info", {"a": b"\x01"}) == {"echo": {"a": b"\x01"}, "method": "info"}
    t.join(5)


def test_rpc_call_error_reply_is_a_bus_error(ctx: zmq.Context, run_dir: str) -> None:
    t = serve_once(ctx, run_dir, {"error": "unknown method"})
    with pytest.raises(bus.BusError, match="unknown method"):
        bus.rpc_call(ctx, run_dir, "svc", "nope")
    t.join(5)


def test_rpc_call_times_out_instead_of_hanging(ctx: zmq.Context, run_dir: str) -> None:
    t = serve_once(ctx, run_dir, None)
    with pytest.raises(bus.BusError, match="did not answer"):
        bus.rpc_call(ctx, run_dir, "svc", "info", timeout_ms=200)
    t.join(5)


def test_stats_publisher_publishes_when_due(ctx: zmq.Context, run_dir: str) -> None:
    sub = bus.bind(ctx, zmq.SUB, run_dir, "stats")
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    pub = bus.StatsPublisher(ctx, run_dir, "svc")
    poller = zmq.Poller()
    poller.register(sub, zmq.POLLIN)
    got = None
    for i in range(100):  # a PUB drops until its connection is up: publish until one arrives (bounded)
        pub.maybe_publish(float(i), {"rx": i}, {"g": 1})
        if poller.poll(50):
            got = bus.unpack(sub.recv_multipart())
            break
    assert got is not None and got.kind == "stats"
    assert got.fields["service"] == "svc" and got.fields["gauges"] == {"g": 1}
    assert not pub.due(float(i)) and pub.due(float(i) + 1.0)
    pub.close()


@pytest.mark.parametrize("clock", [time.time, time.monotonic])
def test_stats_publisher_is_eager_for_its_first_seconds_on_either_clock(
    ctx: zmq.Context, run_dir: str, clock: Callable[[], float]
) -> None:
    """Services pass wall or monotonic time; the start-up window (publish
    every EAGER_INTERVAL, so a restarted service shows up at once) must not
    depend on which (with the wall clock it never opened)."""
    pub = bus.StatsPublisher(ctx, run_dir, "svc")
    now = clock()
    pub.maybe_publish(now, {}, {})
    assert pub.seconds_until_due(now) == pytest.approx(bus.EAGER_INTERVAL)
    pub._eager_until = time.monotonic() - 1  # the window is over
    pub.maybe_publish(now + 1, {}, {})
    assert pub.seconds_until_due(now + 1) == pytest.approx(pub.interval)
    assert pub.seconds_until_due(now + 5) == 0.0
    pub.close()
