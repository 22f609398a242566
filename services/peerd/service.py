"""peerd (TCP family): owns the listening socket, outbound dials, stream
framing and per-peer send queues; hands control packets to the router,
packets for this node to tund, and forwards transit packets itself using
its copy of the FIB."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from common import bus
from common.endpoint import Endpoint, EndpointError
from common.fib import FibReplica
from common.identity import Identity, load_key_file
from common.lifecycle import die_with_parent
from common.logs import setup as setup_logs
from common.nodeconfig import NodeConfig
from common.pending import PendingQueue
from common.wire.errors import CodecError
from common.wire.packet import ControlPacket, DataPacket, StreamDecoder

from .peer_table import INBOUND, PeerEntry, PeerExists, PeerTable, PeerUnknown

log = logging.getLogger("peerd")

READ_SIZE = 256 * 1024
MAX_CONTROL_QUEUE = 10_000
MAX_DATA_QUEUE = 2_000
WRITE_BATCH_BYTES = 256 * 1024
DIAL_TIMEOUT = 5.0
PEERS_FILE = "peers.json"


def static_cost(remote_ip: str) -> int:
    """PROTOCOL.md 2.3: 15 over IPv4 (or v4-mapped), 10 over native IPv6."""
    host = remote_ip.split("%", 1)[0]
    return 15 if ":" not in host or host.startswith("::ffff:") else 10


def sockaddr_text(addr: tuple[Any, ...]) -> str:
    host, port = addr[0], addr[1]
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:") :]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Link:
    """One live TCP connection with a bounded send queue (control packets
    are kept up to a generous cap; data is dropped first)."""

    def __init__(self, link_id: str, writer: asyncio.StreamWriter, entry: PeerEntry, name: str, cost: int) -> None:
        self.link_id = link_id
        self.writer = writer
        self.entry = entry
        self.name = name
        self.static_cost = cost
        self.queue: deque[bytes] = deque()
        self.control_queued = 0
        self.data_queued = 0
        self.wake = asyncio.Event()
        self.closed = False

    def send_control(self, frames: list[bytes], drops: Counter[str]) -> None:
        for frame in frames:
            if self.control_queued >= MAX_CONTROL_QUEUE:
                drops["control_queue_full"] += 1
                continue
            self.queue.append(frame)
            self.control_queued += 1
        self.wake.set()

    def send_data(self, frame: bytes, drops: Counter[str]) -> None:
        if self.data_queued >= MAX_DATA_QUEUE:
            drops["data_queue_full"] += 1
            return
        self.queue.append(frame)
        self.data_queued += 1
        self.wake.set()

    async def write_loop(self) -> None:
        while not self.closed:
            await self.wake.wait()
            self.wake.clear()
            while self.queue:
                batch: list[bytes] = []
                size = 0
                while self.queue and size < WRITE_BATCH_BYTES:
                    frame = self.queue.popleft()
                    batch.append(frame)
                    size += len(frame)
                self.control_queued = min(self.control_queued, len(self.queue))
                self.data_queued = min(self.data_queued, len(self.queue))
                self.writer.write(b"".join(batch))
                self.entry.tx_bytes += size
                await self.writer.drain()


class PeerdService:
    def __init__(self, cfg: NodeConfig, family: str = "tcp") -> None:
        self.cfg = cfg
        self.family = family
        self.name = bus.peerd_name(family)
        self.identity = Identity.from_secret(load_key_file(cfg.key_file))
        self.own_prefix = self.identity.subnet.network.network_address.packed[:8]
        self.epoch = os.urandom(3).hex()
        self.link_seq = 0
        self.counters: Counter[str] = Counter()
        self.table = PeerTable()
        self.links: dict[str, Link] = {}
        self.fib = FibReplica()
        self.pending: PendingQueue[bytes] = PendingQueue(per_subnet=100, total=10_000)
        self.ctx = zmq.asyncio.Context()
        run = cfg.run_dir
        self.inbox = bus.bind(self.ctx, zmq.PULL, run, f"{self.name}.in")
        self.rpc = bus.bind(self.ctx, zmq.ROUTER, run, f"{self.name}.rpc")
        self.router = bus.connect(self.ctx, zmq.PUSH, run, "router.in")
        self.tund = bus.connect(self.ctx, zmq.PUSH, run, "tund.in", hwm=bus.DATA_HWM)
        self.fib_sub = bus.connect(self.ctx, zmq.SUB, run, "router.fib")
        self.fib_sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.stats = bus.StatsPublisher(zmq.Context.instance(), run, self.name)
        self.stop_event = asyncio.Event()
        self.dials: set[asyncio.Task[None]] = set()
        self.peers_file = Path(run) / PEERS_FILE

    # --- bus helpers ------------------------------------------------------

    async def to_router(self, kind: str, fields: dict[str, Any], payloads: list[bytes] | None = None) -> None:
        try:
            await asyncio.wait_for(self.router.send_multipart(bus.pack(kind, fields, payloads or [])), 1.0)
        except (TimeoutError, zmq.Again):
            self.counters["router_bus_timeout"] += 1

    def to_tund(self, kind: str, frames: list[bytes]) -> None:
        try:
            self.tund.send_multipart(bus.pack(kind, None, frames), flags=zmq.NOBLOCK)
        except zmq.Again:
            self.counters["tund_bus_full"] += len(frames)

    # --- static peers persistence (hard state) -----------------------------

    def load_static_peers(self) -> list[str]:
        try:
            saved = json.loads(self.peers_file.read_text())
            if isinstance(saved, list):
                return [p for p in saved if isinstance(p, str)]
        except (OSError, ValueError):
            pass
        return list(self.cfg.peers)

    def save_static_peers(self) -> None:
        tmp = self.peers_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.table.static_endpoints()))
        os.replace(tmp, self.peers_file)

    # --- links ------------------------------------------------------------

    async def run_link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, entry: PeerEntry) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        local = sockaddr_text(writer.get_extra_info("sockname"))
        remote = sockaddr_text(writer.get_extra_info("peername"))
        self.link_seq += 1
        link_id = f"{self.family}-{self.epoch}-{self.link_seq}"
        if entry.kind == INBOUND:
            entry.link_id = link_id
        else:
            self.table.connected(entry, link_id)
        link = Link(
            link_id, writer, entry, f"TCP {local} <-> {remote}", static_cost(remote.strip("[]").rsplit(":", 1)[0])
        )
        self.links[link_id] = link
        self.counters["links_opened"] += 1
        log.info("link %s up: %s (%s)", link_id, link.name, entry.kind)
        await self.announce(link)
        writer_task = asyncio.create_task(link.write_loop())
        decoder = StreamDecoder()
        reason = "eof"
        try:
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                entry.rx_bytes += len(data)
                try:
                    packets = decoder.feed(data)
                except CodecError as exc:
                    self.counters["stream_malformed"] += 1
                    reason = f"malformed stream: {exc}"
                    break
                if decoder.drops:
                    for key, n in decoder.drops.items():
                        self.counters[f"control_dropped_{key}"] += n
                    decoder.drops.clear()
                await self.handle_packets(link, packets)
            if reason == "eof" and decoder.buffered:
                self.counters["stream_truncated"] += 1
                reason = f"eof inside a packet ({decoder.buffered} bytes buffered)"
        except (ConnectionError, OSError) as exc:
            reason = f"read error: {exc}"
        finally:
            link.closed = True
            link.wake.set()
            writer_task.cancel()
            with contextlib.suppress(Exception):
                writer.close()
            self.links.pop(link_id, None)
            self.table.disconnected(link_id, time.monotonic())
            await self.to_router("peer_down", {"peer": link_id})
            log.info("link %s down (%s)", link_id, reason)

    async def announce(self, link: Link) -> None:
        await self.to_router("peer_up", {"peer": link.link_id, "static_cost": link.static_cost, "link_name": link.name})

    async def handle_packets(self, link: Link, packets: list[ControlPacket | DataPacket]) -> None:
        control: list[bytes] = []
        local: list[bytes] = []
        for pkt in packets:
            if isinstance(pkt, ControlPacket):
                control.append(pkt.encode())
            else:
                self.counters["data_rx"] += 1
                self.route_data(pkt, local)
        if control:
            self.counters["control_rx"] += len(control)
            await self.to_router("ctl", {"peer": link.link_id}, control)
        if local:
            self.to_tund("local", local)

    def route_data(self, pkt: DataPacket, local: list[bytes]) -> None:
        """PROTOCOL.md 4.4 for a packet received from a peer."""
        if pkt.hop_limit < 2:
            self.counters["data_drop_hop_limit"] += 1
            return
        frame = DataPacket(pkt.src, pkt.dst, pkt.hop_limit - 1, pkt.body).encode()
        if pkt.dst[:8] == self.own_prefix:
            local.append(frame)
            return
        self.forward(pkt.dst, frame)

    def forward(self, dst: bytes, frame: bytes) -> None:
        route = self.fib.lookup(dst)
        if route is None:
            if self.pending.push(dst[:8], frame, time.monotonic()):
                asyncio.get_running_loop().create_task(self.to_router("need_route", {"addr": dst}))
            return
        if route.next_hop is None:
            self.counters["data_drop_no_route"] += 1
            return
        link = self.links.get(route.next_hop)
        if link is None:
            self.counters["data_drop_next_hop_gone"] += 1
            return
        link.send_data(frame, self.counters)
        self.counters["data_forwarded"] += 1

    async def dial(self, entry: PeerEntry) -> None:
        ep = entry.endpoint
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(ep.host, ep.port), DIAL_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            log.debug("dial %s failed: %s", ep, exc)
            self.table.dial_failed(entry, time.monotonic())
            return
        if str(ep) not in self.table.entries:  # removed while dialling
            writer.close()
            return
        await self.run_link(reader, writer, entry)

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        host = peer[0][7:] if peer[0].startswith("::ffff:") and "." in peer[0] else peer[0]
        ep = Endpoint("tcp", host, peer[1])
        old = self.table.entries.get(str(ep))
        if old is not None and old.link_id in self.links:
            self.close_link(old.link_id)
        entry = self.table.add_inbound(ep, "")
        await self.run_link(reader, writer, entry)

    def close_link(self, link_id: str) -> None:
        link = self.links.get(link_id)
        if link is not None:
            with contextlib.suppress(Exception):
                link.writer.transport.abort()

    # --- loops ------------------------------------------------------------

    async def dial_loop(self) -> None:
        while not self.stop_event.is_set():
            now = time.monotonic()
            for entry in self.table.due_dials(now):
                task = asyncio.create_task(self.dial(entry))
                self.dials.add(task)
                task.add_done_callback(self.dials.discard)
            nxt = self.table.next_dial_time()
            delay = 1.0 if nxt is None else min(1.0, max(0.05, nxt - now))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), delay)

    async def inbox_loop(self) -> None:
        while True:
            frames = await self.inbox.recv_multipart()
            try:
                msg = bus.unpack(frames)
                await self.handle_inbox(msg)
            except (bus.BusError, KeyError, TypeError) as exc:
                self.counters["bus_malformed"] += 1
                log.debug("bad bus message: %s", exc)

    async def handle_inbox(self, msg: bus.Message) -> None:
        if msg.kind == "ctl":
            link = self.links.get(msg.fields["peer"])
            if link is None:
                self.counters["control_to_gone_peer"] += len(msg.payloads)
                return
            link.send_control(msg.payloads, self.counters)
        elif msg.kind == "data_out":
            for frame in msg.payloads:
                if len(frame) < 40:
                    self.counters["data_out_malformed"] += 1
                    continue
                self.forward(frame[24:40], frame)
        elif msg.kind == "close_peer":
            self.close_link(msg.fields["peer"])
        elif msg.kind == "router_hello":
            await self.to_router("peerd_hello", {"family": self.family, "epoch": self.epoch})
            for link in list(self.links.values()):
                await self.announce(link)
        else:
            self.counters["bus_unknown_kind"] += 1

    async def fib_loop(self) -> None:
        await self.fib_resync()
        while True:
            frames = await self.fib_sub.recv_multipart()
            try:
                msg = bus.unpack(frames)
            except bus.BusError:
                continue
            if not self.fib.apply_delta(msg.fields):
                await self.fib_resync()
            self.release_pending()

    async def fib_resync(self) -> None:
        while True:
            try:
                snapshot = await asyncio.to_thread(
                    bus.rpc_call, zmq.Context.instance(), self.cfg.run_dir, "router", "fib_snapshot"
                )
                self.fib.load_snapshot(snapshot)
                self.counters["fib_snapshots"] += 1
                return
            except bus.BusError as exc:
                log.debug("FIB snapshot failed: %s", exc)
                await asyncio.sleep(0.5)

    def release_pending(self) -> None:
        for prefix in self.pending.subnets():
            route = self.fib.lookup(prefix + bytes(8))
            if route is not None and route.next_hop is not None:
                for frame in self.pending.pop(prefix):
                    self.forward(frame[24:40], frame)

    async def rpc_loop(self) -> None:
        while True:
            frames = await self.rpc.recv_multipart()
            try:
                envelope, body = bus.split_envelope(frames)
                msg = bus.unpack(body)
            except bus.BusError:
                self.counters["rpc_malformed"] += 1
                continue
            result = self.rpc_result(msg.kind, msg.fields)
            frames_out = bus.pack("ok", {"result": result})
            await self.rpc.send_multipart([*envelope, b"", *frames_out])

    def rpc_result(self, method: str, params: dict[str, Any]) -> Any:
        now = time.time()
        if method == "list_peers":
            return [e.to_json(now) for e in self.table.entries.values()]
        if method in ("add_peer", "remove_peer"):
            try:
                ep = Endpoint.parse(str(params.get("endpoint", "")))
            except EndpointError as exc:
                return {"error": "parse", "message": str(exc)}
            if ep.proto != self.family:
                return {"error": "parse", "message": f"this node has no {ep.proto} transport"}
            if method == "add_peer":
                try:
                    self.table.add_static(ep, time.monotonic())
                except PeerExists:
                    return {"error": "exists", "message": "A peer identified by that endpoint already exists"}
            else:
                try:
                    entry = self.table.remove(ep)
                except PeerUnknown:
                    return {"error": "unknown", "message": "A peer identified by that endpoint does not exist"}
                if entry.link_id:
                    self.close_link(entry.link_id)
            self.save_static_peers()
            return {"ok": True}
        return {"error": "method", "message": f"unknown method {method!r}"}

    async def stats_loop(self) -> None:
        while True:
            counters = self.counters + self.pending.drops
            self.stats.maybe_publish(
                time.monotonic(),
                counters,
                {
                    "links": len(self.links),
                    "pending": len(self.pending),
                    "fib_entries": len(self.fib),
                    "send_queue": sum(len(link.queue) for link in self.links.values()),
                },
            )
            self.pending.expire(time.monotonic())
            await asyncio.sleep(1.0)

    async def run(self) -> None:
        for text in self.load_static_peers():
            with contextlib.suppress(EndpointError, PeerExists):
                ep = Endpoint.parse(text)
                if ep.proto == self.family:
                    self.table.add_static(ep, time.monotonic())
        self.save_static_peers()
        server = await asyncio.start_server(self.accept, host=None, port=self.cfg.tcp_listen_port, reuse_address=True)
        log.info("listening on TCP port %d; %d static peers", self.cfg.tcp_listen_port, len(self.table.entries))
        await self.to_router("peerd_hello", {"family": self.family, "epoch": self.epoch})
        tasks = [
            asyncio.create_task(coro)
            for coro in (self.dial_loop(), self.inbox_loop(), self.fib_loop(), self.rpc_loop(), self.stats_loop())
        ]
        await self.stop_event.wait()
        server.close()
        for link_id in list(self.links):
            self.close_link(link_id)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.ctx.destroy(linger=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.peerd")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--family", default="tcp", choices=("tcp",))
    args = parser.parse_args(argv)
    die_with_parent()
    cfg = NodeConfig.load_or_exit(args.run_dir)
    setup_logs(f"peerd-{args.family}", cfg.log_level)
    service = PeerdService(cfg, args.family)

    async def runner() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, service.stop_event.set)
        await service.run()

    asyncio.run(runner())
    return 0
