"""peerd (TCP family): owns the listening socket, outbound dials, stream
framing and per-peer send queues; hands control packets to the router,
packets for this node to tund, and forwards transit packets itself using
its copy of the FIB."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from common import bus
from common.datapath import DataIn, DataOut
from common.endpoint import Endpoint, EndpointError
from common.fib import FibReplica
from common.identity import Identity, load_key_file
from common.lifecycle import start_service
from common.nodeconfig import NodeConfig
from common.pending import PendingQueue
from common.wire.errors import CodecError
from common.wire.icmp import CODE_HOP_LIMIT, CODE_NO_ROUTE, DEST_UNREACHABLE, TIME_EXCEEDED
from common.wire.packet import MAX_PACKET_SIZE, StreamDecoder
from common.wire.rules import DATA_PREFIX_SIZE, HOP_OFFSET, MIN_FORWARD_HOP_LIMIT, body_len

from .linkwatch import LinkWatch, route_ifindex
from .local_batch import MIN_PACKETS, all_local
from .packet_stats import PacketStats
from .peer_table import INBOUND, PeerEntry, PeerExists, PeerTable, PeerUnknown

log = logging.getLogger("peerd")

MAX_CONTROL_QUEUE = 10_000
MAX_DATA_QUEUE = 2_000  # packets of the largest size the reference originates ...
MAX_DATA_QUEUE_BYTES = MAX_DATA_QUEUE * 1472  # ... counted in bytes, since data moves in batches
WRITE_BATCH_BYTES = 256 * 1024
WRITE_BATCH_BUFFERS = 64  # iovecs per writev
INBOX_BATCH = 64  # bus messages handled before yielding to the link writers
READ_BUFFER = 512 * 1024  # a link's own read buffer (always room for one largest packet more)
REFRESH_INTERVAL = 5.0  # transit routes in use are re-requested this often (4.4)
ROUTE_CACHE_MAX = 65_536
DIAL_TIMEOUT = 5.0
PEERS_FILE = "peers.json"


def tune_malloc() -> None:
    """Keep the data path's batch buffers on the heap (glibc would mmap and
    unmap each one: a page fault per 4 KiB of every batch); see tund."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 8 * 1024 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 32 * 1024 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


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
    """One live TCP connection with bounded send queues: control packets
    (up to a generous count, sent first) and data (bounded in bytes; whole
    batches of packets from tund or from transit forwarding).

    The data path bypasses asyncio's stream buffers: the read loop
    (``PeerdService.run_link``) reads into its own buffer, and the write
    loop hands the queued batches to one ``writev`` per turn (no joining,
    no copy into a transport buffer), waiting for writability itself. The
    asyncio transport still owns the socket and closes it."""

    def __init__(self, link_id: str, writer: asyncio.StreamWriter, entry: PeerEntry, name: str, cost: int) -> None:
        self.link_id = link_id
        self.writer = writer
        self.entry = entry
        self.name = name
        self.static_cost = cost
        # our own descriptor of the socket: asyncio refuses readers/writers on the
        # transport's, and the connection ends only when both are closed
        self.fd = os.dup(writer.get_extra_info("socket").fileno())
        self.control: deque[bytes | memoryview] = deque()
        self.data: deque[bytes | bytearray | memoryview] = deque()
        self.data_bytes = 0
        self.wake = asyncio.Event()
        self.closed = False
        self.ifindex = 0  # interface the route to the peer leaves by (linkwatch), 0 unknown
        self.waiters: set[asyncio.Future[None]] = set()
        self.pending: deque[memoryview] = deque()  # what a partial write left, in order
        self.blocked = False  # the socket buffer is full: the write loop waits for room

    @property
    def queue(self) -> list[bytes | bytearray | memoryview]:
        """Everything waiting to be written, control first (for stats)."""
        return [*self.control, *self.data]

    def send_control(self, frames: list[bytes], drops: Counter[str]) -> None:
        for frame in frames:
            if len(self.control) >= MAX_CONTROL_QUEUE:
                drops["control_queue_full"] += 1
                continue
            self.control.append(frame)
        self.wake.set()

    def send_data(
        self, frame: bytes | bytearray | memoryview, drops: Counter[str], packets: int = 1, borrowed: bool = False
    ) -> bool:
        """Queue one encoded data packet, or several back to back; drop the
        newest when the queue is full. With nothing queued the batch is
        written at once (no trip through the event loop). A ``borrowed``
        frame (in a shared-memory ring) is copied if any of it has to wait."""
        if not (self.blocked or self.closed or self.pending or self.control or self.data):
            try:
                sent = os.write(self.fd, frame)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                sent = 0  # the read loop sees the error and takes the link down
            self.entry.tx_bytes += sent
            if sent == len(frame):
                return True
            rest = memoryview(frame)[sent:]
            self.pending.append(memoryview(bytes(rest)) if borrowed else rest)
            self.wake.set()
            return True
        if self.data_bytes + len(frame) > MAX_DATA_QUEUE_BYTES:
            drops["data_queue_full"] += packets
            return False
        self.data.append(bytes(frame) if borrowed else frame)
        self.data_bytes += len(frame)
        self.wake.set()
        return True

    async def ready(self, writing: bool) -> None:
        """Wait until the socket is readable (or writable), or the link closes."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self.waiters.add(fut)
        add, remove = (loop.add_writer, loop.remove_writer) if writing else (loop.add_reader, loop.remove_reader)

        def done() -> None:
            if not fut.done():
                fut.set_result(None)

        add(self.fd, done)
        try:
            await fut
        finally:
            self.waiters.discard(fut)
            if not self.closed:
                remove(self.fd)

    def close(self) -> None:
        if not self.closed:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self.fd)
            loop.remove_writer(self.fd)
            with contextlib.suppress(OSError):
                os.close(self.fd)
        self.closed = True
        self.wake.set()
        for fut in list(self.waiters):
            if not fut.done():
                fut.set_result(None)

    async def write_loop(self) -> None:
        control, data, pending = self.control, self.data, self.pending
        writev = os.writev
        while not self.closed:
            await self.wake.wait()
            self.wake.clear()
            while (pending or control or data) and not self.closed:
                bufs: list[bytes | bytearray | memoryview] = list(pending)
                pending.clear()
                size = sum(len(b) for b in bufs)
                while control and size < WRITE_BATCH_BYTES and len(bufs) < WRITE_BATCH_BUFFERS:
                    frame = control.popleft()
                    bufs.append(frame)
                    size += len(frame)
                data_size = 0
                while data and size < WRITE_BATCH_BYTES and len(bufs) < WRITE_BATCH_BUFFERS:
                    frame = data.popleft()
                    bufs.append(frame)
                    size += len(frame)
                    data_size += len(frame)
                self.data_bytes -= data_size
                try:
                    sent = writev(self.fd, bufs)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    self.close()  # the read loop sees the error too and takes the link down
                    return
                self.entry.tx_bytes += sent
                if sent < size:
                    for b in bufs:
                        n = len(b)
                        if sent >= n:
                            sent -= n
                            continue
                        pending.append(memoryview(b)[sent:])
                        sent = 0
                    self.blocked = True
                    await self.ready(writing=True)
                    self.blocked = False


class LinkStream:
    """A link's read side: its own buffer (always room for one largest
    packet more) and the framing decoder."""

    def __init__(self) -> None:
        self.buf = bytearray(READ_BUFFER + MAX_PACKET_SIZE)
        self.view = memoryview(self.buf)
        self.have = 0
        self.decoder = StreamDecoder()
        self.reason = ""


class PeerdService:
    def __init__(self, cfg: NodeConfig, family: str = "tcp", tund_workers: int = 1) -> None:
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
        self.packet_stats = PacketStats()
        self.ctx = zmq.asyncio.Context()
        run = cfg.run_dir
        # the inbox and the router socket are plain ZeroMQ sockets driven from the
        # event loop (inbox_loop; send_router never waits): zmq.asyncio's future
        # per message costs more than the work per batch
        self.sync_ctx = zmq.Context()
        self.inbox = bus.bind(self.sync_ctx, zmq.PULL, run, f"{self.name}.in")
        self.rpc = bus.bind(self.ctx, zmq.ROUTER, run, f"{self.name}.rpc")
        self.router = bus.connect(self.sync_ctx, zmq.PUSH, run, "router.in")
        # one inbox per tund crypto worker; packets from one source /64 always go to the same one
        self.tund_workers = max(1, tund_workers)
        self.tunds = [
            bus.connect(self.sync_ctx, zmq.PUSH, run, "tund.in" if i == 0 else f"tund-{i}.in", hwm=bus.DATA_HWM)
            for i in range(self.tund_workers)
        ]
        self.tund = self.tunds[0]
        # batches both ways go through shared memory (common/datapath.py);
        # without it (no /dev/shm, run directory path too long) as ZeroMQ frames
        self.data_outs: list[DataOut | None] = []
        for i in range(self.tund_workers):
            tund = "tund" if i == 0 else f"tund-{i}"
            try:
                self.data_outs.append(DataOut(run, f"{self.name}-to-{tund}", tund))
            except OSError as exc:
                log.warning("no shared-memory data path to %s (%s); batches go as ZeroMQ frames", tund, exc)
                self.data_outs.append(None)
        self.data_in: DataIn | None = None  # made in run(), with the event loop
        self.transit: dict[bytes, Link | None] = {}  # dst /64 -> link of the selected next hop (None: no route)
        self.fib_cacheable = True
        self.next_refresh = 0.0
        self.linkwatch: LinkWatch | None = None
        self.fib_sub = bus.connect(self.ctx, zmq.SUB, run, "router.fib")
        self.fib_sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.stats = bus.StatsPublisher(zmq.Context.instance(), run, self.name)
        self.stop_event = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()  # dials in flight (strong references)
        self.peers_file = Path(run) / PEERS_FILE

    # --- bus helpers ------------------------------------------------------

    def send_router(self, kind: str, fields: dict[str, Any], payloads: list[bytes] | None = None) -> None:
        """Everything to the router goes through one socket, in order; a full
        queue (CONTROL_HWM messages: the router is gone) drops and counts."""
        try:
            self.router.send_multipart(bus.pack(kind, fields, payloads or []), flags=zmq.NOBLOCK)
        except zmq.Again:
            self.counters["router_bus_full"] += 1

    def to_tund(
        self, kind: str, frames: list[bytes | bytearray], fields: dict[str, Any] | None = None, worker: int = 0
    ) -> None:
        try:
            self.tunds[worker].send_multipart(bus.pack(kind, fields, frames), flags=zmq.NOBLOCK)
        except zmq.Again:
            self.counters["tund_bus_full"] += len(frames)

    def local_to_tund(self, blob: bytes | memoryview, worker: int) -> None:
        """Packets for this node, back to back, to a tund worker."""
        data_out = self.data_outs[worker]
        if data_out is None:
            self.to_tund("local", [bytes(blob)], worker=worker)
            return
        why = data_out.send(blob)
        if why == "unreachable":  # tund restarting (or without the data path): the bus queues it
            self.to_tund("local", [bytes(blob)], worker=worker)
            self.counters["to_tund_via_bus"] += 1
        elif why is not None:
            self.counters[f"to_tund_dropped_{why}"] += 1

    def oob_icmp(self, frame: bytes | bytearray | memoryview, icmp_type: int, code: int) -> None:
        """4.6: tund (which holds the keys) tells the packet's source."""
        self.to_tund("oob_icmp", [bytes(frame)], {"type": icmp_type, "code": code})

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
        if self.linkwatch is not None:
            link.ifindex = route_ifindex(writer.get_extra_info("peername")[0])
        self.counters["links_opened"] += 1
        log.info("link %s up: %s (%s)", link_id, link.name, entry.kind)
        self.announce(link)
        writer_task = asyncio.create_task(link.write_loop())
        # read into our own buffer (see Link): the transport stops reading, and
        # whatever it read before that is taken over
        writer.transport.pause_reading()
        stream = LinkStream()
        early = getattr(reader, "_buffer", b"")
        stream.have = len(early)
        stream.buf[: stream.have] = early
        if stream.have:
            early.clear()  # type: ignore[union-attr]
            entry.rx_bytes += stream.have
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[None] = loop.create_future()
        link.waiters.add(ended)  # link.close() ends it too

        def on_readable() -> None:
            """Called by the loop while the socket is readable: the data path
            runs right here, with no task switch per read."""
            if link.closed or ended.done():
                return
            why = self.read_link(link, stream)
            if why is not None:
                stream.reason = why
                ended.set_result(None)

        try:
            why = self.process_stream(link, stream) if stream.have else None
            if why is None:
                loop.add_reader(link.fd, on_readable)
                await ended
            else:
                stream.reason = why
        finally:
            reason = stream.reason or "closed"
            link.close()
            writer_task.cancel()
            with contextlib.suppress(Exception):
                writer.close()
            self.links.pop(link_id, None)
            self.transit.clear()
            self.table.disconnected(link_id, time.monotonic())
            self.send_router("peer_down", {"peer": link_id})
            log.info("link %s down (%s)", link_id, reason)

    def read_link(self, link: Link, stream: LinkStream) -> str | None:
        """One read from a readable link and everything in it; why the link
        must end, or None."""
        try:
            n = os.readv(link.fd, [stream.view[stream.have :]])
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            return f"read error: {exc}"
        if n == 0:
            if stream.have:
                self.counters["stream_truncated"] += 1
                return f"eof inside a packet ({stream.have} bytes buffered)"
            return "eof"
        link.entry.rx_bytes += n
        stream.have += n
        return self.process_stream(link, stream)

    def process_stream(self, link: Link, stream: LinkStream) -> str | None:
        decoder = stream.decoder
        buf = stream.buf
        try:
            control, offsets, used = decoder.cut(buf, stream.have)
        except CodecError as exc:
            self.counters["stream_malformed"] += 1
            return f"malformed stream: {exc}"
        if decoder.drops:
            for key, count in decoder.drops.items():
                self.counters[f"control_dropped_{key}"] += count
            decoder.drops.clear()
        if offsets:
            self.route_batch(buf, offsets)
        if used:
            have = stream.have
            buf[: have - used] = stream.view[used:have]
            stream.have = have - used
        if control:
            self.counters["control_rx"] += len(control)
            self.send_router("ctl", {"peer": link.link_id}, [pkt.encode() for pkt in control])
        return None

    def announce(self, link: Link) -> None:
        self.send_router("peer_up", {"peer": link.link_id, "static_cost": link.static_cost, "link_name": link.name})

    def route_batch(self, buf: bytes | bytearray, offsets: list[int]) -> None:
        """PROTOCOL.md 4.4 for the data packets of one read: ``buf`` holds
        them at ``offsets``. Packets for this node go to tund and transit
        packets to their next hop's link, each destination as one batch. Per
        packet only header bytes are read and the hop limit is decremented in
        place (no object is made for a packet that continues a run of the
        same addresses); local packets are kept as contiguous ranges of
        ``buf`` and each batch is joined once at the end."""
        if not isinstance(buf, bytearray):
            buf = bytearray(buf)
        view = memoryview(buf)
        own = self.own_prefix
        workers = self.tund_workers
        stats = self.packet_stats
        if workers == 1 and len(offsets) >= MIN_PACKETS:
            fast = all_local(buf, offsets, own)
            if fast is not None:  # every packet for this node (local_batch.py)
                ranges, runs = fast
                for addrs, packets, nbytes in runs:
                    stats.add(addrs[:16], addrs[16:], packets, nbytes)
                self.counters["data_rx"] += len(offsets)
                self.counters["data_local"] += len(offsets)
                if len(ranges) == 1:  # the usual case: straight into the ring, no join
                    self.local_to_tund(view[ranges[0][0] : ranges[0][1]], 0)
                else:
                    self.local_to_tund(b"".join([view[a:b] for a, b in ranges]), 0)
                return
        local: list[list[int]] = [[] for _ in range(workers)]  # per worker: start, end, start, end ...
        ranges = local[0]
        out: dict[Link, list[memoryview]] = {}
        transit = self.transit
        slow: list[tuple[bytes, bytes]] = []
        n_local = 0
        min_hop = MIN_FORWARD_HOP_LIMIT
        if not offsets:
            return
        # addresses of the current run of packets, for the statistics
        run_key = bytes(view[offsets[0] + 8 : offsets[0] + 40])
        run_n = run_b = 0
        if workers > 1:
            ranges = local[int.from_bytes(run_key[:8]) % workers]
        for off in offsets:
            end = off + 40 + (buf[off + 5] << 8 | buf[off + 6])
            if not buf.startswith(run_key, off + 8):
                if run_n:
                    stats.add(run_key[:16], run_key[16:], run_n, run_b)
                run_key, run_n, run_b = bytes(view[off + 8 : off + 40]), 0, 0
                if workers > 1:
                    ranges = local[int.from_bytes(run_key[:8]) % workers]
            run_n += 1
            run_b += end - off - 40
            hop = buf[off + HOP_OFFSET]
            if hop < min_hop:  # common.wire.rules.can_forward, as a local compare
                self.counters["data_drop_hop_limit"] += 1
                self.oob_icmp(view[off:end], TIME_EXCEEDED, CODE_HOP_LIMIT)
                continue
            buf[off + HOP_OFFSET] = hop - 1
            if buf.startswith(own, off + 24):  # for this node
                if ranges and ranges[-1] == off:
                    ranges[-1] = end
                else:
                    ranges += (off, end)
                n_local += 1
                continue
            dpre = bytes(view[off + 24 : off + 32])
            link = transit.get(dpre)
            if link is None or link.closed:
                slow.append((bytes(view[off + 24 : off + 40]), bytes(view[off:end])))
                continue
            parts = out.get(link)
            if parts is None:
                parts = out[link] = []
            parts.append(view[off:end])
        if run_n:
            stats.add(run_key[:16], run_key[16:], run_n, run_b)
        self.counters["data_rx"] += len(offsets)
        if n_local:
            self.counters["data_local"] += n_local
            for i, pairs in enumerate(local):
                if pairs:
                    self.local_to_tund(b"".join([view[a:b] for a, b in zip(pairs[::2], pairs[1::2], strict=True)]), i)
        for link, parts in out.items():
            if link.send_data(b"".join(parts), self.counters, len(parts)):
                self.counters["data_forwarded"] += len(parts)
        for dst, frame in slow:
            self.forward(dst, frame)

    def forward(self, dst: bytes, frame: bytes | bytearray) -> None:
        """One transit packet (hop limit already decremented) to its next hop,
        or queued while the router looks for a route."""
        route = self.fib.lookup(dst)
        if route is None:
            full_before = self.pending.drops["pending_full"]
            if self.pending.push(dst[:8], bytes(frame), time.monotonic()):
                self.send_router("need_route", {"addr": dst})
            elif self.pending.drops["pending_full"] != full_before:
                self.oob_icmp(frame, DEST_UNREACHABLE, CODE_NO_ROUTE)
            return
        if route.next_hop is None:
            self.counters["data_drop_no_route"] += 1
            self.oob_icmp(frame, DEST_UNREACHABLE, CODE_NO_ROUTE)
            return
        link = self.links.get(route.next_hop)
        if link is None:
            self.counters["data_drop_next_hop_gone"] += 1
            return
        if self.fib_cacheable and len(self.transit) < ROUTE_CACHE_MAX:
            self.transit[dst[:8]] = link
        if link.send_data(frame, self.counters):
            self.counters["data_forwarded"] += 1

    def forward_blob(self, blob: bytes) -> None:
        """Packets back to back whose next hop is gone: one by one through the FIB."""
        pos, end = 0, len(blob)
        while pos + 40 <= end:
            nxt = pos + DATA_PREFIX_SIZE + body_len(blob, pos)
            if nxt > end:
                self.counters["data_out_malformed"] += 1
                return
            self.forward(blob[pos + 24 : pos + 40], blob[pos:nxt])
            pos = nxt

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

    def on_link_change(self) -> None:
        """rtnetlink says interfaces went down: close the links that used them."""
        assert self.linkwatch is not None
        down = self.linkwatch.down_interfaces()
        if not down:
            return
        for link in list(self.links.values()):
            if link.ifindex and link.ifindex in down:
                log.info("link %s: interface %d went down, closing", link.link_id, link.ifindex)
                self.counters["links_closed_interface_down"] += 1
                self.close_link(link.link_id)

    def close_link(self, link_id: str) -> None:
        link = self.links.get(link_id)
        if link is not None:
            link.close()  # wakes the read and write loops, which see ``closed``
            with contextlib.suppress(Exception):
                link.writer.transport.abort()

    # --- loops ------------------------------------------------------------

    async def dial_loop(self) -> None:
        while not self.stop_event.is_set():
            now = time.monotonic()
            for entry in self.table.due_dials(now):
                task = asyncio.create_task(self.dial(entry))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            nxt = self.table.next_dial_time()
            delay = 1.0 if nxt is None else min(1.0, max(0.05, nxt - now))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), delay)

    async def inbox_loop(self) -> None:
        """Drain the inbox whenever its ZeroMQ FD signals (edge-triggered:
        read until EAGAIN and check EVENTS before waiting again), yielding
        to the link writers every few messages. Payload frames are not
        copied out of ZeroMQ: the link writes their buffers directly."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        fd = self.inbox.getsockopt(zmq.FD)
        loop.add_reader(fd, wake.set)
        recv = self.inbox.recv_multipart
        try:
            while True:
                wake.clear()
                for _ in range(INBOX_BATCH):
                    try:
                        frames = recv(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    try:
                        header = msgpack.unpackb(frames[0].buffer, raw=False)
                        kind = header.pop("k")
                        if kind == "data_out":
                            self.handle_data_out(header, [f.buffer for f in frames[1:]])
                        else:
                            header.pop("v", None)
                            self.handle_inbox(bus.Message(kind, header, [f.bytes for f in frames[1:]]))
                    except (ValueError, KeyError, TypeError, AttributeError, msgpack.UnpackException) as exc:
                        self.counters["bus_malformed"] += 1
                        log.debug("bad bus message: %s", exc)
                else:
                    await asyncio.sleep(0)  # more may be waiting: let the writers run first
                    continue
                if not self.inbox.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    await wake.wait()
        finally:
            loop.remove_reader(fd)

    def handle_data_out(self, fields: dict[str, Any], payloads: list[memoryview]) -> None:
        """From tund: packets back to back, all for the next hop it names,
        in tund's shared-memory ring or as frames."""
        link = self.links.get(fields.get("peer", ""))
        for frame in payloads:
            if len(frame) < 40:
                self.counters["data_out_malformed"] += 1
            elif link is not None and not link.closed:
                link.send_data(frame, self.counters)
                self.counters["data_out_batches"] += 1
            else:
                self.forward_blob(bytes(frame))

    def _watch_data(self, fd: int, add: bool) -> None:
        loop = asyncio.get_running_loop()
        if add:
            loop.add_reader(fd, self.read_data, fd)
        else:
            loop.remove_reader(fd)

    def read_data(self, fd: int) -> None:
        """Batches tund left in its ring, each for the next hop its record
        names; written to the link straight from shared memory."""
        assert self.data_in is not None
        links = self.links
        for tag, frame in self.data_in.receive(fd):
            link = links.get(tag.decode(errors="replace"))
            if len(frame) < 40:
                self.counters["data_out_malformed"] += 1
            elif link is not None and not link.closed:
                link.send_data(frame, self.counters, borrowed=True)
                self.counters["data_out_batches"] += 1
            else:
                self.forward_blob(bytes(frame))

    def handle_inbox(self, msg: bus.Message) -> None:
        if msg.kind == "ctl":
            link = self.links.get(msg.fields["peer"])
            if link is None:
                self.counters["control_to_gone_peer"] += len(msg.payloads)
                return
            link.send_control(msg.payloads, self.counters)
        elif msg.kind == "data_out":
            self.handle_data_out(msg.fields, [memoryview(p) for p in msg.payloads])
        elif msg.kind == "close_peer":
            self.close_link(msg.fields["peer"])
        elif msg.kind == "router_hello":
            self.send_router("peerd_hello", {"family": self.family, "epoch": self.epoch})
            for link in list(self.links.values()):
                self.announce(link)
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
            self.fib_changed()

    async def fib_resync(self) -> None:
        while True:
            try:
                snapshot = await asyncio.to_thread(
                    bus.rpc_call, zmq.Context.instance(), self.cfg.run_dir, "router", "fib_snapshot"
                )
                self.fib.load_snapshot(snapshot)
                self.counters["fib_snapshots"] += 1
                self.fib_changed()
                return
            except bus.BusError as exc:
                log.debug("FIB snapshot failed: %s", exc)
                await asyncio.sleep(0.5)

    def fib_changed(self) -> None:
        self.transit.clear()
        self.fib_cacheable = all(plen <= 64 for _, plen, _ in self.fib.entries())
        self.release_pending()

    def release_pending(self) -> None:
        for prefix in self.pending.subnets():
            route = self.fib.lookup(prefix + bytes(8))
            if route is not None and route.next_hop is not None:
                for frame in self.pending.pop(prefix):
                    self.forward(frame[24:40], frame)

    async def rpc_loop(self) -> None:
        while True:
            frames = await self.rpc.recv_multipart()
            request = bus.parse_request(frames, self.counters)
            if request is None:
                continue
            envelope, msg = request
            result = self.rpc_result(msg.kind, msg.fields)
            frames_out = bus.pack("ok", {"result": result})
            await self.rpc.send_multipart([*envelope, b"", *frames_out])

    def rpc_result(self, method: str, params: dict[str, Any]) -> Any:
        now = time.time()
        if method == "packet_stats":
            return self.packet_stats.to_json()
        if method == "stats":
            return {"counters": dict(self.counters + self.pending.drops)}
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
                    "send_queue": sum(len(link.control) + len(link.data) for link in self.links.values()),
                    "send_queue_data_bytes": sum(link.data_bytes for link in self.links.values()),
                },
            )
            now = time.monotonic()
            self.pending.expire(now)
            if now >= self.next_refresh:
                # transit routes in use: ask again, the router refreshes those about to expire (4.4)
                self.next_refresh = now + REFRESH_INTERVAL
                used = list(self.transit)
                self.transit.clear()
                for prefix in used:
                    self.send_router("need_route", {"addr": prefix + bytes(8)})
            await asyncio.sleep(1.0)

    async def run(self) -> None:
        try:
            self.data_in = DataIn(self.cfg.run_dir, self.name, f"-to-{self.name}", self._watch_data, self.counters)
        except OSError as exc:
            log.warning("no shared-memory data path from tund (%s); it sends ZeroMQ frames", exc)
        for text in self.load_static_peers():
            with contextlib.suppress(EndpointError, PeerExists):
                ep = Endpoint.parse(text)
                if ep.proto == self.family:
                    self.table.add_static(ep, time.monotonic())
        self.save_static_peers()
        server = await asyncio.start_server(self.accept, host=None, port=self.cfg.tcp_listen_port, reuse_address=True)
        log.info("listening on TCP port %d; %d static peers", self.cfg.tcp_listen_port, len(self.table.entries))
        self.send_router("peerd_hello", {"family": self.family, "epoch": self.epoch})
        try:
            self.linkwatch = LinkWatch()
            asyncio.get_running_loop().add_reader(self.linkwatch.fileno(), self.on_link_change)
        except OSError as exc:
            log.warning("no rtnetlink link notifications (%s): a link is noticed dead only by TCP or Babel", exc)
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
        for data_out in self.data_outs:
            if data_out is not None:
                data_out.close()
        if self.data_in is not None:
            self.data_in.close()
        self.ctx.destroy(linger=0)
        self.sync_ctx.destroy(linger=0)


def main(argv: list[str] | None = None) -> int:
    def add_args(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--family", default="tcp", choices=("tcp",))
        parser.add_argument("--tund-workers", type=int, default=1, help="tund crypto workers to spread packets over")

    cfg, args = start_service("peerd-tcp", argv, add_args)
    tune_malloc()
    service = PeerdService(cfg, args.family, args.tund_workers)

    async def runner() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, service.stop_event.set)
        await service.run()

    asyncio.run(runner())
    return 0
