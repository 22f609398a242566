"""Test harness for the message engine: an in-memory network with a virtual
clock and an adjustable lossy, reordering, duplicating link (deterministic
RNG), plus literal models of the reference's receiver and sender
(PROTOCOL.md 7.4-7.5) for interoperability tests.

The other ``test_msgbus_*`` modules import from here; the tests at the end
check the harness itself.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import blake3

from common.wire.message import (
    Chunk,
    ChunkAck,
    Done,
    DoneAck,
    Init,
    InitAck,
    MessagePacket,
    decode_message,
    encode_message,
)
from services.msgbus.engine import MessageEngine
from services.msgbus.events import MessageEvent


def ip(n: int, prefix: str = "400:abcd:0:") -> bytes:
    """Overlay address number n; each n gets its own /64."""
    return ipaddress.IPv6Address(f"{prefix}{n:x}::1").packed


def payload(n: int, seed: int = 0) -> bytes:
    return random.Random(n * 7919 + seed).randbytes(n)


class Node(Protocol):
    def receive(self, src_ip: bytes, dst_ip: bytes, packet: Any, now: float) -> None: ...
    def packets_to_send(self) -> list[tuple[bytes, bytes, MessagePacket]]: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> None: ...


@dataclass
class Sent:
    time: float
    src: bytes
    dst: bytes
    packet: MessagePacket
    dropped: bool


@dataclass
class Net:
    """Nodes keyed by address; packets travel as encoded bytes through a lossy link."""

    seed: int = 1
    loss: float = 0.0
    dup: float = 0.0
    delay: tuple[float, float] = (0.01, 0.01)  # uniform; a wide range reorders
    now: float = 0.0
    nodes: dict[bytes, Node] = field(default_factory=dict)
    log: list[Sent] = field(default_factory=list)
    events: dict[bytes, list[MessageEvent]] = field(default_factory=dict)
    drop_if: Callable[[bytes, bytes, MessagePacket], bool] | None = None
    keep_log: bool = True

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._queue: list[tuple[float, int, bytes, bytes, bytes]] = []
        self._seq = itertools.count()

    def add(self, node: Node, *addresses: bytes) -> Node:
        for addr in addresses or (node.own_ip,):  # type: ignore[attr-defined]
            self.nodes[addr] = node
        return node

    def engine(self, addr: bytes) -> MessageEngine:
        node = self.nodes[addr]
        assert isinstance(node, MessageEngine)
        return node

    def flush(self) -> None:
        for node in set(self.nodes.values()):
            for src, dst, pkt in node.packets_to_send():
                wire = encode_message(pkt)
                dropped = self.rng.random() < self.loss or (self.drop_if is not None and self.drop_if(src, dst, pkt))
                if self.keep_log:
                    self.log.append(Sent(self.now, src, dst, pkt, dropped))
                if dropped:
                    continue
                copies = 2 if self.rng.random() < self.dup else 1
                for _ in range(copies):
                    at = self.now + self.rng.uniform(*self.delay)
                    heapq.heappush(self._queue, (at, next(self._seq), src, dst, wire))
            if isinstance(node, MessageEngine):
                self.events.setdefault(node.own_ip, []).extend(node.events())

    def next_time(self) -> float | None:
        times = [t for t in (n.get_timer() for n in set(self.nodes.values())) if t is not None]
        if self._queue:
            times.append(self._queue[0][0])
        return min(times) if times else None

    def run(self, until: float, stop: Callable[[], bool] | None = None) -> bool:
        """Advance the clock to ``until`` or until ``stop()``; True if stopped early."""
        while True:
            self.flush()
            if stop is not None and stop():
                return True
            t = self.next_time()
            if t is None or t > until:
                self.now = max(self.now, until)
                return False
            self.now = max(self.now, t)
            while self._queue and self._queue[0][0] <= self.now:
                _, _, src, dst, wire = heapq.heappop(self._queue)
                node = self.nodes.get(dst)
                if node is not None:
                    node.receive(src, dst, decode_message(wire), self.now)
            for node in set(self.nodes.values()):
                timer = node.get_timer()
                if timer is not None and timer <= self.now:
                    node.handle_timer(self.now)

    def sent(self, kind: type, src: bytes | None = None, dst: bytes | None = None) -> list[Sent]:
        return [
            s
            for s in self.log
            if isinstance(s.packet, kind) and (src is None or s.src == src) and (dst is None or s.dst == dst)
        ]


def drain_inbox(engine: MessageEngine, now: float) -> list:
    out = []
    while (m := engine.pop(None, False, now)) is not None:
        out.append(m)
    return out


# --- literal reference models ---------------------------------------------------------


class RefReceiver:
    """The reference receiver's acceptance rules of PROTOCOL.md 7.5, literally, including the
    250-byte granularity quirk (no relaxation for short chunks ending at ``length``)."""

    def __init__(self, own_ip: bytes) -> None:
        self.own_ip = own_ip
        self.pending: dict[bytes, dict[str, Any]] = {}
        self.completed: list[tuple[bytes, bytes, bytes]] = []  # (src, id, data)
        self.drops: Counter[str] = Counter()
        self._out: list[tuple[bytes, bytes, MessagePacket]] = []

    def receive(self, src: bytes, dst: bytes, pkt: MessagePacket, now: float) -> None:
        if isinstance(pkt, Init):
            if any(mid == pkt.id for _, mid, _ in self.completed):
                return
            self.pending[pkt.id] = {"len": pkt.length, "slots": [None] * -(-pkt.length // 1300), "src": src}
            self._out.append((dst, src, InitAck(pkt.id, pkt.length, len(pkt.topic), pkt.reply, pkt.reserved)))
        elif isinstance(pkt, Chunk):
            msg = self.pending.get(pkt.id)
            if msg is None:
                return
            data = pkt.data[: pkt.size]
            size = len(data)
            length = msg["len"]
            if pkt.offset + size > length:
                self.drops["bounds"] += 1
                return
            max_idx = -(-length // 250) - 1 if length else 0
            if pkt.index > max_idx:
                self.drops["index"] += 1
                return
            if size < 250 and pkt.index != max_idx:
                self.drops["small"] += 1
                return
            slots = msg["slots"]
            if pkt.index >= len(slots):
                slots.extend([None] * (pkt.index + 1 - len(slots)))
            slots[pkt.index] = data
            self._out.append((dst, src, ChunkAck(pkt.id, pkt.index, pkt.offset, pkt.size, pkt.reserved)))
        elif isinstance(pkt, Done):
            msg = self.pending.get(pkt.id)
            if msg is None:
                return
            slots = msg["slots"]
            if pkt.chunk_count != len(slots) or any(s is None for s in slots):
                self.drops["done"] += 1
                return
            data = b"".join(slots)
            if len(data) != msg["len"] or blake3.blake3(data).digest() != pkt.checksum:
                self.drops["done"] += 1
                return
            self.completed.append((src, pkt.id, data))
            del self.pending[pkt.id]
            self._out.append((dst, src, DoneAck(pkt.id, pkt.chunk_count, pkt.checksum, pkt.reserved)))

    def packets_to_send(self) -> list[tuple[bytes, bytes, MessagePacket]]:
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        pass


class RefSender:
    """The reference sender of PROTOCOL.md 7.4: plain 1300-byte chunks, everything resent every
    100 ms until acknowledged, no window."""

    def __init__(self, own_ip: bytes) -> None:
        self.own_ip = own_ip
        self.msgs: dict[bytes, dict[str, Any]] = {}
        self._out: list[tuple[bytes, bytes, MessagePacket]] = []
        self._ids = itertools.count(1)
        self._tick: float | None = None

    def push(self, dst: bytes, topic: bytes, data: bytes, now: float) -> bytes:
        mid = next(self._ids).to_bytes(8, "big")
        self.msgs[mid] = {"dst": dst, "topic": topic, "data": data, "state": "init", "acked": set(), "chunks": []}
        self._out.append((self.own_ip, dst, Init(mid, len(data), topic)))
        self._tick = now + 0.1
        return mid

    def _wake(self, mid: bytes) -> None:
        m = self.msgs[mid]
        if m["state"] == "init":
            self._out.append((self.own_ip, m["dst"], Init(mid, len(m["data"]), m["topic"])))
        elif m["state"] == "sending":
            data = m["data"]
            for i in range(len(m["chunks"])):
                if i not in m["acked"]:
                    part = data[i * 1300 : (i + 1) * 1300]
                    self._out.append((self.own_ip, m["dst"], Chunk(mid, i, i * 1300, len(part), part)))
            if len(m["acked"]) == len(m["chunks"]):
                checksum = blake3.blake3(data).digest()
                self._out.append((self.own_ip, m["dst"], Done(mid, len(m["chunks"]), checksum)))

    def receive(self, src: bytes, dst: bytes, pkt: MessagePacket, now: float) -> None:
        m = self.msgs.get(pkt.id)
        if m is None:
            return
        if isinstance(pkt, InitAck) and m["state"] == "init":
            m["state"] = "sending"
            m["chunks"] = list(range(-(-len(m["data"]) // 1300)))
            self._wake(pkt.id)
        elif isinstance(pkt, ChunkAck) and m["state"] == "sending" and pkt.index < len(m["chunks"]):
            m["acked"].add(pkt.index)
            if len(m["acked"]) == len(m["chunks"]):
                self._wake(pkt.id)
        elif isinstance(pkt, DoneAck) and m["state"] == "sending":
            m["state"] = "received"

    def packets_to_send(self) -> list[tuple[bytes, bytes, MessagePacket]]:
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        return self._tick if any(m["state"] in ("init", "sending") for m in self.msgs.values()) else None

    def handle_timer(self, now: float) -> None:
        for mid in self.msgs:
            self._wake(mid)
        self._tick = now + 0.1


# --- the harness itself ---------------------------------------------------------------


def test_net_is_deterministic_and_lossy() -> None:
    def run(seed: int) -> list[tuple[float, bytes]]:
        net = Net(seed=seed, loss=0.5, delay=(0.0, 0.1))
        a = net.add(MessageEngine(ip(1), 0.0, rng=random.Random(1)))
        net.add(MessageEngine(ip(2), 0.0, rng=random.Random(2)))
        a.push(ip(2), b"t", b"x" * 3000, 0.0)
        net.run(30.0)
        return [(s.time, encode_message(s.packet)) for s in net.log if not s.dropped]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_ref_receiver_model_has_the_quirk() -> None:
    """The literal model must reject the 100-byte tail of a plain 1300-byte split of 1400 bytes,
    otherwise the interoperability tests built on it prove nothing."""
    net = Net()
    sender = net.add(RefSender(ip(1)))
    receiver = net.add(RefReceiver(ip(2)))
    for n in (1300, 1400, 1549, 1550):
        sender.push(ip(2), b"", payload(n), 0.0)
    net.run(5.0)
    got = sorted(len(d) for _, _, d in receiver.completed)
    assert got == [1300, 1550]
    assert receiver.drops["small"] > 0
