"""msgbus: the message subsystem's process. Feeds the sans-IO
MessageEngine from the bus and carries out what it returns.

- tund -> ``msgbus.in``: ``message {src, dst}`` + decrypted plaintext (with
  its inner header) of every message packet addressed to this node.
- msgbus -> ``tund.in``: ``send_message {dst}`` + plaintext to seal and send.
- ``msgbus.rpc`` (ROUTER): push / pop / reply / status / topic config for
  apid. Long waits (pop with a timeout, push waiting for a reply) are parked
  and answered later, so one waiting client never blocks another: the
  ROUTER socket lets us reply in any order.
- Forwarding a message to a Unix socket is blocking IO, done on a small
  thread pool; results come back through a queue and a wake-up pipe.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import logging
import math
import queue
import socket
import sqlite3
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from common import bus
from common.fib import FibReplica
from common.identity import Identity, load_key_file
from common.lifecycle import StopSignal, start_service
from common.nodeconfig import NodeConfig
from common.wire.errors import CodecError
from common.wire.inner import INNER_MESSAGE, MESSAGE_HEADER, split_inner
from common.wire.message import decode_message, encode_message

from .engine import Limits, MessageEngine, MessageError, OutboxFull
from .events import ForwardToSocket, MessageReceived, ReceivedMessage, ReplyReceived
from .store import MessageStore
from .topics import TopicConfig, TopicConfigError, load_topic_config

log = logging.getLogger("msgbus")
STORE_FILE = "msgbus.sqlite"
MAX_WAIT = 1.0
FORWARD_WRITE_TIMEOUT = 5.0  # the reference's write timeout
FORWARD_READ_TIMEOUT = 60.0  # the reference has none; an unbounded read could pin a worker forever
FORWARD_MAX_REPLY = 16 * 1024 * 1024
MAX_PARKED = 1024  # waiting pops and pushes at once
MAX_LEASE = 120.0  # seconds a push subscriber may hold a message before others can pop it
WAIT_SLICE = 50.0  # a parked request is answered at least this often, so no bus call waits longer


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class Parked:
    envelope: list[bytes]
    deadline: float
    kind: str  # "pop" or "push"
    topic: bytes | None = None
    peek: bool = False
    lease: float = 0.0  # > 0: a push subscriber's pop that holds the message instead of removing it
    msg_id: bytes = b""
    extra: dict[str, Any] = field(default_factory=dict)


def forward_to_socket(path: str, data: bytes) -> bytes | None:
    """PROTOCOL.md 7.8: write the message, read until the peer closes."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(FORWARD_WRITE_TIMEOUT)
            s.connect(path)
            s.sendall(data)
            s.settimeout(FORWARD_READ_TIMEOUT)
            chunks: list[bytes] = []
            size = 0
            while size <= FORWARD_MAX_REPLY:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            return b"".join(chunks) or None
    except OSError as exc:
        log.info("forwarding to %s failed: %s", path, exc)
        return None


class MsgbusService:
    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.identity = Identity.from_secret(load_key_file(cfg.key_file))
        self.own_ip = self.identity.address.packed
        self.counters: Counter[str] = Counter()
        self.ctx = zmq.Context()
        run = cfg.run_dir
        self.inbox = bus.bind(self.ctx, zmq.PULL, run, "msgbus.in", hwm=bus.DATA_HWM)
        self.rpc = bus.bind(self.ctx, zmq.ROUTER, run, "msgbus.rpc")
        self.tund = bus.Sender(bus.connect(self.ctx, zmq.PUSH, run, "tund.in", hwm=bus.DATA_HWM), self.counters, "tund")
        self.fib_sub = bus.connect(self.ctx, zmq.SUB, run, "router.fib")
        self.fib_sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.fib = FibReplica()
        self.fib_synced = False
        self.stats = bus.StatsPublisher(self.ctx, run, "msgbus")
        self.stop = StopSignal()
        self.store = MessageStore(Path(run) / STORE_FILE)
        now = time.monotonic()
        self.engine = MessageEngine(
            self.own_ip,
            now,
            wall_now=time.time(),
            store=self.store,
            topics=self.initial_topics(),
            limits=Limits(send_window=cfg.message_timeout),
        )
        self.parked: list[Parked] = []
        self.reply_deadlines: dict[bytes, float] = {}  # pushes waiting for a reply, until when
        self.replies: dict[bytes, ReceivedMessage] = {}  # replies that arrived between two waits
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="forward")
        self.forward_results: queue.Queue[tuple[ReceivedMessage, bytes | None]] = queue.Queue()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)

    # --- topic configuration (hard state) ----------------------------------

    def initial_topics(self) -> TopicConfig:
        """The --topic-config file wins when it changed since the API last
        saved a configuration; otherwise the saved one (API edits) does."""
        path = self.cfg.topic_config
        saved = self.store.load_topic_config()
        file_hash = hashlib.sha256(Path(path).read_bytes()).hexdigest() if path and Path(path).exists() else None
        if saved is not None and saved.get("file_hash") == file_hash:
            try:
                return TopicConfig.from_dict(saved["config"])  # type: ignore[arg-type]  # JSON; from_dict validates
            except (TopicConfigError, KeyError, TypeError, ValueError):
                log.warning("saved topic configuration is unreadable; using defaults")
        if path:
            config, warning = load_topic_config(path)
            if warning:
                log.warning("%s", warning)
        else:
            config = TopicConfig()
        self.file_hash = file_hash
        self.store.save_topic_config({"file_hash": file_hash, "config": config.to_dict()})
        return config

    def save_topics(self) -> None:
        path = self.cfg.topic_config
        file_hash = hashlib.sha256(Path(path).read_bytes()).hexdigest() if path and Path(path).exists() else None
        self.store.save_topic_config({"file_hash": file_hash, "config": self.engine.topics.to_dict()})

    # --- JSON for the API ----------------------------------------------------

    def public_key_of(self, ip: bytes) -> str | None:
        route = self.fib.lookup(ip)
        return route.public_key.hex() if route else None

    def receive_info(self, m: ReceivedMessage) -> dict[str, Any]:
        info: dict[str, Any] = {
            "id": m.id.hex(),
            "srcIp": str(ipaddress.IPv6Address(m.src_ip)),
            "srcPk": self.public_key_of(m.src_ip) or "",
            "dstIp": str(ipaddress.IPv6Address(m.dst_ip)),
            "dstPk": self.identity.public_key.hex(),
            "payload": b64(m.data),
        }
        if m.topic:
            info["topic"] = b64(m.topic)
        return info

    # --- rpc -------------------------------------------------------------------

    def reply(self, envelope: list[bytes], result: Any = None, error: str | None = None) -> None:
        bus.rpc_reply(self.rpc, envelope, result, error)

    def handle_rpc(self, frames: list[bytes], now: float) -> None:
        request = bus.parse_request(frames, self.counters)
        if request is None:
            return
        envelope, msg = request
        try:
            self.dispatch(envelope, msg.kind, msg.fields, now)
        except (KeyError, TypeError, ValueError, TopicConfigError) as exc:
            self.reply(envelope, {"error": "invalid", "message": str(exc)})
        except MessageError as exc:
            code = "full" if isinstance(exc, OutboxFull) else "invalid"
            self.reply(envelope, {"error": code, "message": str(exc)})
        except sqlite3.Error as exc:
            # disk full, locked, corrupt: the engine writes the store before its
            # memory, so the failed call changed nothing; answer and keep serving
            self.store_failed(envelope, msg.kind, exc)

    def store_failed(self, envelope: list[bytes], method: str, exc: sqlite3.Error) -> None:
        self.counters["store_error"] += 1
        log.error("message store failed during %s: %s", method, exc)
        self.reply(envelope, {"error": "storage", "message": f"message store failed: {exc}"})

    def dispatch(self, envelope: list[bytes], method: str, p: dict[str, Any], now: float) -> None:
        topics = self.engine.topics
        if method == "push":
            msg_id = self.engine.push(bytes(p["dst"]), bytes(p.get("topic") or b""), bytes(p["payload"]), now)
            self.counters["api_push"] += 1
            timeout = p.get("reply_timeout")
            if timeout is None:
                self.reply(envelope, {"id": msg_id.hex()})
                return
            self.engine.expect_reply(msg_id)
            self.reply_deadlines[msg_id] = now + float(timeout)
            self.park_reply_wait(envelope, msg_id, now)
        elif method == "wait_reply":
            msg_id = bytes(p["id"])
            if msg_id in self.replies:
                self.reply_deadlines.pop(msg_id, None)
                self.reply(envelope, {"id": msg_id.hex(), "reply": self.receive_info(self.replies.pop(msg_id))})
            elif msg_id in self.reply_deadlines:
                self.park_reply_wait(envelope, msg_id, now)
            else:
                self.reply(envelope, {"id": msg_id.hex(), "timeout": True})
        elif method == "reply":
            self.engine.push(bytes(p["dst"]), b"", bytes(p["payload"]), now, reply_to=bytes(p["id"]))
            self.reply(envelope, {"ok": True})
        elif method == "pop":
            topic = None if p.get("topic") is None else bytes(p["topic"])
            peek = bool(p.get("peek", False))
            lease = min(float(p.get("lease") or 0), MAX_LEASE)
            waiter = Parked(envelope, now + min(float(p.get("timeout") or 0), WAIT_SLICE), "pop", topic, peek, lease)
            if not self.answer_pop(waiter, now):
                self.park(waiter)
        elif method in ("ack", "release"):
            fn = self.engine.ack if method == "ack" else self.engine.release
            self.reply(envelope, {"ok": fn(int(p["seq"]), int(p["lease"]))})
        elif method == "release_all":
            self.reply(envelope, {"released": self.engine.release_all()})
        elif method == "status":
            self.reply(envelope, {"status": self.engine.status(bytes(p["id"]), now)})
        elif method == "topics_default":
            if "accept" in p:
                topics.default_accept = bool(p["accept"])
                self.save_topics()
            self.reply(envelope, {"accept": topics.default_accept})
        elif method == "topics_list":
            self.reply(envelope, {"topics": [b64(t) for t in topics.topics()]})
        elif method in ("topic_add", "topic_remove"):
            (topics.add_topic if method == "topic_add" else topics.remove_topic)(bytes(p["topic"]))
            self.save_topics()
            self.reply(envelope, {"ok": True})
        elif method == "sources_list":
            sources = topics.sources(bytes(p["topic"]))
            self.reply(envelope, {"sources": None if sources is None else [str(s) for s in sources]})
        elif method in ("source_add", "source_remove"):
            edit_source = topics.add_source if method == "source_add" else topics.remove_source
            edit_source(bytes(p["topic"]), str(p["subnet"]))
            self.save_topics()
            self.reply(envelope, {"ok": True})
        elif method == "forward_get":
            self.reply(envelope, {"path": topics.forward_socket(bytes(p["topic"]))})
        elif method == "forward_set":
            topics.set_forward_socket(bytes(p["topic"]), p.get("path"))
            self.save_topics()
            self.reply(envelope, {"ok": True})
        elif method == "forward_remove":
            topics.remove_forward_socket(bytes(p["topic"]))
            self.save_topics()
            self.reply(envelope, {"ok": True})
        else:
            self.reply(envelope, error=f"unknown method {method!r}")

    def answer_pop(self, w: Parked, now: float) -> bool:
        """Answer a pop (plain or leased) if a message is there or its wait is over."""
        if w.lease > 0:
            leased = self.engine.lease(w.topic, w.lease, now)
            if leased is not None:
                m, lease = leased
                self.reply(w.envelope, {"message": self.receive_info(m), "seq": m.seq, "lease": lease})
                return True
        else:
            popped = self.engine.pop(w.topic, w.peek, now)
            if popped is not None:
                self.reply(w.envelope, {"message": self.receive_info(popped)})
                return True
        if now >= w.deadline:
            self.reply(w.envelope, {"message": None})
            return True
        return False

    def park_reply_wait(self, envelope: list[bytes], msg_id: bytes, now: float) -> None:
        self.park(Parked(envelope, min(self.reply_deadlines[msg_id], now + WAIT_SLICE), "push", msg_id=msg_id))

    def park(self, waiter: Parked) -> None:
        if len(self.parked) >= MAX_PARKED:
            self.reply(waiter.envelope, {"error": "busy", "message": "too many waiting requests"})
            return
        self.parked.append(waiter)

    def serve_parked(self, now: float) -> None:
        """Answer waiting pops that can now be served, and expired waits."""
        for msg_id in [i for i, t in self.reply_deadlines.items() if now >= t]:
            if not any(w.msg_id == msg_id for w in self.parked):
                del self.reply_deadlines[msg_id]
                self.engine.cancel_reply(msg_id)
        for msg_id in [i for i in self.replies if i not in self.reply_deadlines]:
            del self.replies[msg_id]
        keep: list[Parked] = []
        for w in self.parked:
            if w.kind == "pop":
                try:
                    answered = self.answer_pop(w, now)
                except sqlite3.Error as exc:  # the message stays in the inbox
                    self.store_failed(w.envelope, "pop", exc)
                    continue
                if answered:
                    continue
            elif now >= w.deadline:  # push waiting for a reply: its slice or its whole wait is over
                if now >= self.reply_deadlines.get(w.msg_id, 0.0):
                    self.reply_deadlines.pop(w.msg_id, None)
                    self.engine.cancel_reply(w.msg_id)
                    self.reply(w.envelope, {"id": w.msg_id.hex(), "timeout": True})
                else:
                    self.reply(w.envelope, {"id": w.msg_id.hex(), "pending": True})
                continue
            keep.append(w)
        self.parked = keep

    # --- engine IO -------------------------------------------------------------

    def handle_inbox(self, msg: bus.Message, now: float) -> None:
        if msg.kind != "message":
            self.counters["bus_unknown_kind"] += 1
            return
        try:
            src, dst = bytes(msg.fields["src"]), bytes(msg.fields["dst"])
        except (KeyError, TypeError, ValueError):
            self.counters["bus_malformed"] += 1
            return
        for plaintext in msg.payloads:
            try:
                kind, payload = split_inner(plaintext)
                if kind != INNER_MESSAGE:
                    raise CodecError("not a message packet")
                packet = decode_message(payload)
            except CodecError:
                self.counters["rx_malformed"] += 1
                continue
            self.engine.receive(src, dst, packet, now)

    def flush(self, now: float) -> None:
        """Events first (they may answer waiters), then waiting pops (a pop
        queues a READ), then every packet the engine has for the wire."""
        for event in self.engine.events():
            if isinstance(event, ReplyReceived):
                msg_id = event.message.id
                waiters = [w for w in self.parked if w.kind == "push" and w.msg_id == msg_id]
                if waiters:
                    self.reply_deadlines.pop(msg_id, None)
                for w in waiters:
                    self.parked.remove(w)
                    self.reply(w.envelope, {"id": msg_id.hex(), "reply": self.receive_info(event.message)})
                if not waiters:  # the client is between two waits: keep it for the next one
                    self.replies[msg_id] = event.message
            elif isinstance(event, ForwardToSocket):
                self.pool.submit(self._forward, event)
            elif isinstance(event, MessageReceived):
                self.counters["rx_messages"] += 1
        if self.parked:
            self.serve_parked(now)
        by_dst: dict[bytes, list[bytes]] = defaultdict(list)
        for _src, dst, packet in self.engine.packets_to_send():
            by_dst[dst].append(MESSAGE_HEADER + encode_message(packet))
        for dst, frames in by_dst.items():
            self.tund.data("send_message", {"dst": dst}, frames)
            self.counters["tx_packets"] += len(frames)

    def _forward(self, event: ForwardToSocket) -> None:
        self.forward_results.put((event.message, forward_to_socket(event.socket_path, event.message.data)))
        try:
            self.wake_w.send(b"\0")
        except OSError:
            pass

    def drain_forward_results(self, now: float) -> None:
        try:
            while self.wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                message, reply = self.forward_results.get_nowait()
            except queue.Empty:
                return
            self.engine.forward_done(message, reply, now)

    def fib_resync(self) -> None:
        try:
            self.fib.load_snapshot(bus.rpc_call(self.ctx, self.cfg.run_dir, "router", "fib_snapshot", timeout_ms=500))
            self.fib_synced = True
        except bus.BusError:
            self.fib_synced = False

    def run(self) -> None:
        log.info(
            "message subsystem for %s started (%d queued inbound)", self.identity.address, self.engine.inbox_size()
        )
        poller = zmq.Poller()
        for sock in (self.inbox, self.rpc, self.fib_sub, self.stop, self.wake_r):
            poller.register(sock, zmq.POLLIN)
        self.fib_resync()
        while not self.stop.stopped:
            now = time.monotonic()
            timers = [t for t in (self.engine.get_timer(), *(w.deadline for w in self.parked)) if t is not None]
            wait = min([MAX_WAIT, *(max(0.0, t - now) for t in timers)])
            events = dict(poller.poll(math.ceil(wait * 1000)))
            now = time.monotonic()
            if not self.fib_synced:
                self.fib_resync()
            if self.fib_sub in events:
                while True:
                    try:
                        delta = bus.unpack(self.fib_sub.recv_multipart(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                    except bus.BusError:
                        continue
                    if not self.fib.apply_delta(delta.fields):
                        self.fib_resync()
            if self.inbox in events:
                for _ in range(1000):
                    try:
                        frames = self.inbox.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        msg = bus.unpack(frames)
                    except bus.BusError:
                        self.counters["bus_malformed"] += 1
                        continue
                    self.handle_inbox(msg, now)
            if self.rpc in events:
                for _ in range(100):
                    try:
                        frames = self.rpc.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.handle_rpc(frames, now)
            if self.wake_r.fileno() in events:
                self.drain_forward_results(now)
            timer = self.engine.get_timer()
            if timer is not None and timer <= now:
                self.engine.handle_timer(now)
            self.flush(now)
            if self.stats.due(now):
                self.stats.maybe_publish(
                    now,
                    self.counters + self.engine.counters,
                    {**self.engine.queue_depths(), "parked": len(self.parked)},
                )
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.store.close()
        self.ctx.destroy(linger=0)


def main(argv: list[str] | None = None) -> int:
    cfg, _ = start_service("msgbus", argv)
    MsgbusService(cfg).run()
    return 0
