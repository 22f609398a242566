"""The message bus between a node's processes: ZeroMQ IPC sockets under the
node's run directory, msgpack header frames, payloads as separate frames.

Endpoints (one per service and purpose, bound by the owner):

| endpoint        | owner  | type   | carries                                         |
|-----------------|--------|--------|-------------------------------------------------|
| router.in       | router | PULL   | peer up/down, control packets, route needs      |
| router.rpc      | router | ROUTER | FIB snapshot, route listings                    |
| router.fib      | router | PUB    | FIB deltas (a snapshot is fetched over rpc)     |
| peerd-<f>.in    | peerd  | PULL   | control packets to send, data batches, closes   |
| peerd-<f>.rpc   | peerd  | ROUTER | peer list / add / remove, packet statistics     |
| tund.in         | tund   | PULL   | packets for this node, messages to seal         |
|  (tund-<i>.in)  |        |        |  (one per crypto worker with several)           |
| tund.rpc        | tund   | ROUTER | crypto counters                                 |
| msgbus.in       | msgbus | PULL   | decrypted message packets from tund             |
| msgbus.rpc      | msgbus | ROUTER | push / pop / reply / status / topics for apid   |
| proxyd.rpc      | proxyd | ROUTER | proxy list / connect / disconnect / probe       |
| dnsd.rpc        | dnsd   | ROUTER | resolver counters (upstream chosen, cache)      |
| stats           | apid   | SUB    | every service PUBlishes its counters ~1/s       |

Overflow policy: data-path sends never block (drop the newest batch and
count it); control sends block for at most ``CONTROL_SEND_TIMEOUT_MS`` and
then drop and count. Every socket has a bounded high-water mark.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq

BUS_VERSION = 1
DATA_HWM = 1000  # batches
CONTROL_HWM = 10_000  # messages
CONTROL_SEND_TIMEOUT_MS = 1000
RPC_TIMEOUT_MS = 2000
MAX_IPC_PATH = 107  # sun_path limit on Linux, less the terminating NUL


class BusError(Exception):
    """A bus call that could not be completed (timeout, bad reply, bad path)."""


def endpoint(run_dir: str | os.PathLike[str], name: str) -> str:
    path = os.path.join(os.fspath(run_dir), f"{name}.ipc")
    if len(path.encode()) > MAX_IPC_PATH:
        raise BusError(f"run directory path too long for an IPC socket ({path}); choose a shorter --run-dir")
    return f"ipc://{path}"


def peerd_name(family: str) -> str:
    return f"peerd-{family}"


@dataclass
class Message:
    kind: str
    fields: dict[str, Any]
    payloads: list[bytes] = field(default_factory=list)


def pack(
    kind: str, fields: dict[str, Any] | None = None, payloads: list[bytes] | tuple[bytes, ...] = ()
) -> list[bytes]:
    header = {"k": kind, "v": BUS_VERSION}
    if fields:
        header.update(fields)
    return [msgpack.packb(header, use_bin_type=True), *payloads]


def unpack(frames: list[Any]) -> Message:
    """Decode a multipart message; raises BusError on a malformed header."""
    if not frames:
        raise BusError("empty bus message")
    try:
        header = msgpack.unpackb(frames[0], raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise BusError(f"malformed bus header: {exc}") from exc
    if not isinstance(header, dict) or not isinstance(header.get("k"), str):
        raise BusError("bus header without a kind")
    kind = header.pop("k")
    header.pop("v", None)
    payloads = [f.bytes if isinstance(f, zmq.Frame) else bytes(f) for f in frames[1:]]
    return Message(kind, header, payloads)


def _tune(sock: zmq.Socket, hwm: int) -> zmq.Socket:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    return sock


def bind(ctx: zmq.Context, kind: int, run_dir: str, name: str, hwm: int = CONTROL_HWM) -> zmq.Socket:
    sock = _tune(ctx.socket(kind), hwm)
    ep = endpoint(run_dir, name)
    path = ep[len("ipc://") :]
    if os.path.exists(path):  # left behind by a killed predecessor
        os.unlink(path)
    sock.bind(ep)
    return sock


def connect(ctx: zmq.Context, kind: int, run_dir: str, name: str, hwm: int = CONTROL_HWM) -> zmq.Socket:
    sock = _tune(ctx.socket(kind), hwm)
    if kind == zmq.PUSH:
        sock.setsockopt(zmq.SNDTIMEO, CONTROL_SEND_TIMEOUT_MS)
    sock.connect(endpoint(run_dir, name))
    return sock


class Sender:
    """A PUSH/PUB socket with the overflow policy applied and counted."""

    def __init__(self, sock: zmq.Socket, drops: Counter[str], name: str) -> None:
        self.sock = sock
        self.drops = drops
        self.name = name

    def data(self, kind: str, fields: dict[str, Any] | None, payloads: list[bytes]) -> bool:
        try:
            self.sock.send_multipart(pack(kind, fields, payloads), flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            self.drops[f"bus_full_{self.name}"] += len(payloads) or 1
            return False

    def control(self, kind: str, fields: dict[str, Any] | None = None, payloads: list[bytes] | tuple = ()) -> bool:
        try:
            self.sock.send_multipart(pack(kind, fields, list(payloads)))
            return True
        except zmq.Again:
            self.drops[f"bus_timeout_{self.name}"] += 1
            return False


def rpc_call(
    ctx: zmq.Context,
    run_dir: str,
    name: str,
    method: str,
    params: dict[str, Any] | None = None,
    timeout_ms: int = RPC_TIMEOUT_MS,
) -> Any:
    """One request/reply to a service's rpc endpoint; a fresh socket per call
    so a lost reply can never wedge the caller."""
    sock = _tune(ctx.socket(zmq.REQ), 10)
    sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
    sock.setsockopt(zmq.SNDTIMEO, timeout_ms)
    try:
        sock.connect(endpoint(run_dir, f"{name}.rpc"))
        sock.send_multipart(pack(method, params))
        reply = unpack(sock.recv_multipart())
    except zmq.Again as exc:
        raise BusError(f"{name} did not answer {method} within {timeout_ms} ms") from exc
    finally:
        sock.close(linger=0)
    if reply.kind == "error":
        raise BusError(f"{name}: {reply.fields.get('message', 'error')}")
    return reply.fields.get("result")


def rpc_reply(sock: zmq.Socket, envelope: list[bytes], result: Any = None, error: str | None = None) -> None:
    """Answer a request received on a ROUTER socket (envelope = routing frames)."""
    frames = pack("error", {"message": error}) if error is not None else pack("ok", {"result": result})
    sock.send_multipart([*envelope, b"", *frames])


def parse_request(frames: list[bytes], drops: Counter[str]) -> tuple[list[bytes], Message] | None:
    """ROUTER frames -> (routing envelope, request); None for a malformed one,
    counted as ``rpc_malformed`` (a caller can't answer what it can't route)."""
    try:
        envelope, body = split_envelope(frames)
        return envelope, unpack(body)
    except BusError:
        drops["rpc_malformed"] += 1
        return None


def split_envelope(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """ROUTER frames -> (routing envelope, message frames)."""
    try:
        i = frames.index(b"")
    except ValueError as exc:
        raise BusError("ROUTER message without an envelope delimiter") from exc
    return frames[:i], frames[i + 1 :]


EAGER_SECONDS = 3.0
EAGER_INTERVAL = 0.2


class StatsPublisher:
    """Publishes a service's counters and gauges about once a second."""

    def __init__(self, ctx: zmq.Context, run_dir: str, service: str, interval: float = 1.0) -> None:
        self.sock = _tune(ctx.socket(zmq.PUB), 100)
        self.sock.connect(endpoint(run_dir, "stats"))
        self.service = service
        self.interval = interval
        self.started = time.time()
        self._next = 0.0
        self._eager_until = time.monotonic() + EAGER_SECONDS

    def due(self, now: float) -> bool:
        """Whether a publish is due; lets callers skip computing costly gauges."""
        return now >= self._next

    def seconds_until_due(self, now: float) -> float:
        """How long a service that only wakes to publish may sleep."""
        return max(0.0, self._next - now)

    def maybe_publish(self, now: float, counters: dict[str, int], gauges: dict[str, Any]) -> None:
        if not self.due(now):
            return
        # a PUB drops what it sends before its connection is up: publish often
        # at first, so a service (re)started shows up within a fraction of a second
        # (``now`` is the caller's clock, wall or monotonic: the start-up window is measured on its own)
        self._next = now + (EAGER_INTERVAL if time.monotonic() < self._eager_until else self.interval)
        frames = pack(
            "stats",
            {
                "service": self.service,
                "pid": os.getpid(),
                "started": self.started,
                "counters": dict(counters),
                "gauges": gauges,
            },
        )
        try:
            self.sock.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            pass

    def close(self) -> None:
        self.sock.close(linger=0)
