"""peerd: one process per transport family (``peerd-tcp``: TCP, TLS, vsock;
``peerd-quic``: QUIC). It owns the links of its family (links/, one module
per link type behind links/base.py), hands control packets to the router
and packets for this node to tund, and forwards transit packets itself
(forwarder.py) with its copy of the FIB.

A transit packet whose next hop is a link of another family goes to that
family's peerd through the same shared-memory data path tund uses (its
ring "<me>-to-peerd-<family>", the record tagged "~<link id>": a batch from
a sibling whose link is gone is dropped, never forwarded again).

Every task runs in one TaskGroup, and an exception in a loop callback is
fatal too: a bug logs its traceback and peerd exits non-zero, so
supervisord restarts it and the links come back. Only malformed outside
input (bus messages, peer bytes) is caught, counted and dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Coroutine
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from common import bus, native
from common.datapath import DataIn, DataOut
from common.endpoint import Endpoint
from common.fib import FibReplica, is_head
from common.identity import Identity, load_key_file, make_router_id
from common.lifecycle import start_service
from common.nodeconfig import NodeConfig
from common.spinpoll import SpinPolicy, window_from_env
from common.wire.rules import DATA_PREFIX_SIZE

from .discovery import Discovery
from .discovery_socket import DiscoveryService
from .eventloop import add_data_reader, loop_factory, remove_data_reader, serve_rings
from .forwarder import Buffer, Forwarder, Routed
from .links import load_link_module
from .links.base import Link, LinkError, LinkFactory, LinkStats
from .linkwatch import LinkWatch, route_ifindex
from .peer_api import PeerApi, peers_file
from .peer_table import PeerEntry, PeerTable
from .sendqueue import SendQueue

log = logging.getLogger("peerd")

INBOX_BATCH = 64  # bus messages handled before yielding to the link writers
REFRESH_INTERVAL = 5.0  # transit routes in use are re-requested this often (4.4)
SIBLING_TAG = b"~"  # data-path tag prefix of a batch from another peerd family
DEBUG_FAULTS_ENV = "MYCELIUM_DEBUG_FAULTS"  # "1": the bus message debug_fail crashes peerd (tests)
DEBUG_STREAM_QUIC_ENV = "MYCELIUM_DEBUG_STREAM_QUIC"  # "1": quic:// over a TCP stream (tests)


def tune_malloc() -> None:
    """Keep the data path's batch buffers on the heap (glibc would mmap and
    unmap each one: a page fault per 4 KiB of every batch); see tund."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 8 * 1024 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 32 * 1024 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


class InjectedFault(RuntimeError):
    """Raised on purpose by debug_fail (only with MYCELIUM_DEBUG_FAULTS=1)."""


class _Stop(Exception):
    """Ends the task group on SIGTERM/SIGINT."""


def make_factories(cfg: NodeConfig, family: str, host: PeerdService) -> dict[str, LinkFactory]:
    """The link factories of ``family``'s protocols that exist here."""
    factories: dict[str, LinkFactory] = {}
    for proto in cfg.peerd_families.get(family, []):
        if proto == "quic" and os.environ.get(DEBUG_STREAM_QUIC_ENV) == "1":
            from .links.tcp import StreamAsQuicFactory

            factories[proto] = StreamAsQuicFactory(cfg, host)
            continue
        module = load_link_module(proto)
        if module is None:
            continue
        factory = module.make_factory(cfg, host)
        if factory is not None:
            factories[proto] = factory
    protos = cfg.peerd_families.get(family, [])
    if cfg.network_name is not None and "tls" in factories:
        if "tcp" in protos:
            factories["tcp"] = factories["tls"]  # private network: tcp:// peers are dialled as TLS (TRANSPORTS.md 2.3)
        tls = load_link_module("tls")
        vsock = None if tls is None or "vsock" not in protos else tls.make_vsock_factory(cfg, host)
        if vsock is not None:
            factories["vsock"] = vsock  # vsock inside TLS-PSK too (docs/ARCHITECTURE.md)
    return factories


def unique(factories: dict[str, LinkFactory]) -> list[LinkFactory]:
    """Each factory once (one may serve two protocols)."""
    return list({id(f): f for f in factories.values()}.values())


class PeerdService:
    """The shell: bus, shared-memory data path, links, tasks. Implements
    the LinkHost callbacks of links/base.py."""

    def __init__(self, cfg: NodeConfig, family: str = "tcp", tund_workers: int = 1) -> None:
        self.cfg = cfg
        self.family = family
        self.name = bus.peerd_name(family)
        self.identity = Identity.from_secret(load_key_file(cfg.key_file))
        self.epoch = os.urandom(3).hex()
        self.link_seq = 0
        self.counters: Counter[str] = Counter()
        self.table = PeerTable()
        self.links: dict[str, Link] = {}
        # link id -> send queue, for links whose queue lets tund's batches be written straight from the ring
        self.direct: dict[bytes, SendQueue] = {}
        self.rings_in_c = False  # its ring wake-ups run in the kernel's wait (run, eventloop.serve_rings)
        self.link_entry: dict[str, PeerEntry] = {}
        self.fib = FibReplica()
        self.tund_workers = max(1, tund_workers)
        own = self.identity.subnet.network.network_address.packed[:8]
        self.forwarder = Forwarder(own, self.fib, self.tund_workers, self.counters)
        # tls:// only in a private network (the reference refuses it otherwise)
        self.protocols = [p for p in cfg.peerd_families.get(family, []) if p != "tls" or cfg.network_name]
        self.peer_api = PeerApi(self.table, peers_file(cfg.run_dir, family), self.protocols)
        self.factories: dict[str, LinkFactory] = {}
        self.unserved: set[str] = set()  # protocols of ours without a link module (warned once)
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
        self.tunds = [
            bus.connect(self.sync_ctx, zmq.PUSH, run, "tund.in" if i == 0 else f"tund-{i}.in", hwm=bus.DATA_HWM)
            for i in range(self.tund_workers)
        ]
        # batches both ways go through shared memory (common/datapath.py);
        # without it (no /dev/shm, run directory path too long) as ZeroMQ frames
        self.data_outs: list[DataOut | None] = []
        for i in range(self.tund_workers):
            tund = "tund" if i == 0 else f"tund-{i}"
            self.data_outs.append(self._data_out(f"{self.name}-to-{tund}", tund))
        # a stream link's reads hand the packets for this node at their start
        # straight to tund (local_batch.link_rx) when there is one worker and a ring
        out0 = self.data_outs[0]
        self.local_rx = (own, out0, out0.ring.max_record) if self.tund_workers == 1 and out0 is not None else None
        # the other families' peerds, for transit packets whose next hop is theirs
        self.siblings: dict[str, tuple[zmq.Socket, DataOut | None]] = {}
        for fam in cfg.peerd_families:
            if fam != family:
                other = bus.peerd_name(fam)
                sock = bus.connect(self.sync_ctx, zmq.PUSH, run, f"{other}.in", hwm=bus.DATA_HWM)
                self.siblings[fam] = (sock, self._data_out(f"{self.name}-to-{other}", other))
        self.data_in: DataIn | None = None  # made in run(), with the event loop
        self.next_refresh = 0.0
        self.linkwatch: LinkWatch | None = None
        self.fib_sub = bus.connect(self.ctx, zmq.SUB, run, "router.fib")
        self.fib_sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.stats = bus.StatsPublisher(zmq.Context.instance(), run, self.name)
        self.stop_event = asyncio.Event()
        self.tg: asyncio.TaskGroup | None = None
        self.failure: BaseException | None = None  # raised in a loop callback: fatal
        self.failed = asyncio.Event()
        self.spin = SpinPolicy(window_from_env())  # the loop's short poll after traffic (eventloop.py)

    def _data_out(self, name: str, consumer: str) -> DataOut | None:
        try:
            return DataOut(self.cfg.run_dir, name, consumer)
        except OSError as exc:
            log.warning("no shared-memory data path to %s (%s); batches go as ZeroMQ frames", consumer, exc)
            return None

    # --- LinkHost -----------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """A task in the process's task group (its failure is fatal)."""
        assert self.tg is not None, "spawn before run()"
        return self.tg.create_task(coro, name=name)

    def on_control(self, link: Link, packets: list[bytes]) -> None:
        """Control packets from a link go to the router, in order."""
        self.send_router("ctl", {"peer": link.link_id}, packets)

    def on_data(self, link: Link, buf: bytearray, offsets: list[int]) -> None:
        """Data packets from a link: the forwarder decides, we carry it out."""
        self.carry_out(self.forwarder.route_batch(buf, offsets))

    def on_local(self, link: Link, runs: list[tuple[bytes, int, int]]) -> None:
        """Packets a link's read handed to tund itself (local_rx): counted."""
        self.forwarder.count_local(runs)

    def on_closed(self, link: Link, reason: str) -> None:
        """A link ended: forget it, tell the router, redial if static."""
        link_id = link.link_id
        self.direct.pop(link_id.encode(), None)
        if self.links.pop(link_id, None) is None:
            return
        entry = self.link_entry.pop(link_id, None)
        if entry is not None:
            stats = link.stats()
            entry.tx_bytes += stats.tx_bytes
            entry.rx_bytes += stats.rx_bytes
        self.forwarder.links_changed()
        self.table.disconnected(link_id, time.monotonic())
        self.send_router("peer_down", {"peer": link_id})
        log.info("link %s down (%s)", link_id, reason)

    def accepted(self, link: Link) -> None:
        """An inbound link: it replaces a link from the same address."""
        key = str(link.endpoint)
        old = self.table.entries.get(key)
        if old is not None and old.link_id in self.links:
            self.links[old.link_id].close("replaced by a new inbound connection")
        entry = self.table.add_inbound(link.endpoint, "")
        self.register(link, entry)

    # --- links --------------------------------------------------------------

    def register(self, link: Link, entry: PeerEntry) -> None:
        """Give ``link`` its id, announce it to the router and start it."""
        self.link_seq += 1
        link_id = link.link_id = f"{self.family}-{self.epoch}-{self.link_seq}"
        if link.inbound:
            entry.link_id = link_id
        else:
            self.table.connected(entry, link_id)
        self.links[link_id] = link
        self.link_entry[link_id] = entry
        ip = link.remote_ip()
        if self.linkwatch is not None and ip is not None:
            link.ifindex = route_ifindex(ip)
        self.counters["links_opened"] += 1
        log.info("link %s up: %s (%s)", link_id, link.name, entry.kind)
        queue = getattr(link, "queue", None)
        if isinstance(queue, SendQueue) and queue.direct_fd >= 0:  # tund's batches written straight from its ring
            self.direct[link_id.encode()] = queue
        self.announce(link)
        link.start()

    def announce(self, link: Link) -> None:
        self.send_router("peer_up", {"peer": link.link_id, "static_cost": link.static_cost, "link_name": link.name})

    async def dial(self, entry: PeerEntry) -> None:
        """Dial a static peer; a failure schedules the next attempt."""
        ep = entry.endpoint
        factory = self.factories.get(ep.proto)
        if factory is None:
            if ep.proto not in self.unserved:
                self.unserved.add(ep.proto)
                log.warning("no %s link type in this build: %s is not dialled", ep.proto, ep)
            self.table.dial_failed(entry, time.monotonic())
            return
        try:
            link = await factory.dial(ep)
        except (OSError, TimeoutError, LinkError) as exc:
            # a failure is logged once, the retries failing the same way only at debug level (as the
            # reference); a new reason (say, the peer is up now but refuses our TLS) is logged again
            why = str(exc)
            log.log(logging.DEBUG if why == entry.last_error else logging.WARNING, "dial %s failed: %s", ep, why)
            entry.last_error = why
            if self.table.dial_failed(entry, time.monotonic()):
                log.info("forgetting the locally discovered peer %s after %d failed dials", ep, entry.failures)
            return
        if self.table.entries.get(str(ep)) is not entry:  # removed while dialling
            link.close("peer removed")
            return
        self.register(link, entry)

    def close_link(self, link_id: str | None, reason: str) -> None:
        link = self.links.get(link_id or "")
        if link is not None:
            link.close(reason)

    def on_link_change(self) -> None:
        """rtnetlink says interfaces went down: close the links that used them."""
        assert self.linkwatch is not None
        down = self.linkwatch.down_interfaces()
        if not down:
            return
        for link in list(self.links.values()):
            if link.ifindex and link.ifindex in down:
                self.counters["links_closed_interface_down"] += 1
                link.close(f"interface {link.ifindex} went down")

    # --- carrying out forwarding decisions --------------------------------

    def carry_out(self, routed: Routed) -> None:
        """Hand what the forwarder decided to tund, links and siblings."""
        for worker, blob in routed.local:
            self.local_to_tund(blob, worker)
        if routed.transit:
            links = self.links
            counters = self.counters
            for next_hop, parts in routed.transit.items():
                blob = b"".join(parts)  # always a copy: the parts may be views of a link's read buffer
                link = links.get(next_hop)
                if link is not None:
                    if link.send_data(blob, len(parts)):
                        counters["data_forwarded"] += len(parts)
                elif not self.to_sibling(next_hop, blob, len(parts)):
                    counters["data_drop_next_hop_gone"] += len(parts)
        for frame, icmp_type, code in routed.icmp:
            self.oob_icmp(frame, icmp_type, code)
        for addr in routed.need_route:
            self.send_router("need_route", {"addr": addr})

    def to_sibling(self, next_hop: str, blob: Buffer, packets: int) -> bool:
        """Transit packets for a link of another family's peerd; False if
        no family of this node owns ``next_hop``."""
        sibling = self.siblings.get(next_hop.split("-", 1)[0])
        if sibling is None:
            return False
        sock, data_out = sibling
        if data_out is not None:
            why = data_out.send(blob, SIBLING_TAG + next_hop.encode())
            if why is None:
                self.counters["data_to_sibling"] += packets
                return True
            if why != "unreachable":
                self.counters[f"to_sibling_dropped_{why}"] += packets
                return True
        try:
            sock.send_multipart(
                bus.pack("data_out", {"peer": next_hop, "sibling": True}, [bytes(blob)]), flags=zmq.NOBLOCK
            )
            self.counters["data_to_sibling_via_bus"] += packets
        except zmq.Again:
            self.counters["sibling_bus_full"] += packets
        return True

    def data_batch(self, next_hop: str, frame: Buffer, sibling: bool, borrowed: bool) -> None:
        """A batch from tund (or a sibling peerd) for the next hop it names."""
        if len(frame) < 40:
            self.counters["data_out_malformed"] += 1
            return
        link = self.links.get(next_hop)
        if link is not None and not link.closed:
            link.send_data(frame, borrowed=borrowed)
            self.counters["data_out_batches"] += 1
        elif sibling:  # never bounced back: the FIBs may disagree for a moment
            self.counters["data_from_sibling_link_gone"] += 1
        else:
            self.carry_out(self.forwarder.forward_blob(bytes(frame)))

    # --- bus helpers --------------------------------------------------------

    def send_router(self, kind: str, fields: dict[str, Any], payloads: list[bytes] | None = None) -> None:
        """Everything to the router goes through one socket, in order; a full
        queue (CONTROL_HWM messages: the router is gone) drops and counts."""
        try:
            self.router.send_multipart(bus.pack(kind, fields, payloads or []), flags=zmq.NOBLOCK)
        except zmq.Again:
            self.counters["router_bus_full"] += 1

    def to_tund(self, kind: str, frames: list[bytes], fields: dict[str, Any] | None = None, worker: int = 0) -> None:
        try:
            self.tunds[worker].send_multipart(bus.pack(kind, fields, frames), flags=zmq.NOBLOCK)
        except zmq.Again:
            self.counters["tund_bus_full"] += len(frames)

    def local_to_tund(self, blob: Buffer, worker: int) -> None:
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

    def oob_icmp(self, frame: Buffer, icmp_type: int, code: int) -> None:
        """4.6: tund (which holds the keys) tells the packet's source."""
        self.to_tund("oob_icmp", [bytes(frame)], {"type": icmp_type, "code": code})

    # --- loops --------------------------------------------------------------

    async def dial_loop(self) -> None:
        while True:
            now = time.monotonic()
            for entry in self.table.due_dials(now):
                self.spawn(self.dial(entry), f"dial {entry.endpoint}")
            nxt = self.table.next_dial_time()
            delay = 1.0 if nxt is None else min(1.0, max(0.05, nxt - now))
            await asyncio.sleep(delay)

    async def inbox_loop(self) -> None:
        """Drain the inbox whenever its ZeroMQ FD signals (edge-triggered:
        read until EAGAIN and check EVENTS before waiting again), yielding
        to the link writers every few messages. Payload frames are not
        copied out of ZeroMQ: the link writes their buffers directly."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        fd = int(self.inbox.getsockopt(zmq.FD))
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
                if not int(self.inbox.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                    await wake.wait()
        finally:
            loop.remove_reader(fd)

    def handle_data_out(self, fields: dict[str, Any], payloads: list[memoryview]) -> None:
        """From tund (or a sibling): packets back to back, all for the next
        hop it names, as ZeroMQ frames."""
        next_hop = str(fields.get("peer", ""))
        sibling = bool(fields.get("sibling", False))
        for frame in payloads:
            self.data_batch(next_hop, frame, sibling, borrowed=False)

    def _watch_data(self, fd: int, add: bool) -> None:
        if add:  # called straight from the wait (eventloop.py): the hand-over starts every wake-up
            add_data_reader(fd, self.read_data, fd)
        else:
            remove_data_reader(fd)

    def read_data(self, fd: int) -> None:
        """Batches tund (or a sibling) left in its ring, each for the next
        hop its record names; written to the link straight from shared
        memory (the link copies what it cannot write at once)."""
        assert self.data_in is not None
        taken = self.data_in.drain(fd, self._data_batch_in, self.direct, DATA_PREFIX_SIZE)
        if taken:
            self.counters["data_out_batches"] += taken

    def _data_batch_in(self, tag: bytes, frame: memoryview) -> None:
        link = self.links.get(tag.decode(errors="replace"))
        if link is not None and not link.closed and len(frame) >= DATA_PREFIX_SIZE:  # the common case, inline
            link.send_data(frame, borrowed=True)
            self.counters["data_out_batches"] += 1
        elif tag.startswith(SIBLING_TAG):
            self.data_batch(tag[1:].decode(errors="replace"), frame, True, borrowed=True)
        else:
            self.data_batch(tag.decode(errors="replace"), frame, False, borrowed=True)

    def handle_inbox(self, msg: bus.Message) -> None:
        if msg.kind == "ctl":
            link = self.links.get(msg.fields["peer"])
            if link is None:
                self.counters["control_to_gone_peer"] += len(msg.payloads)
                return
            link.send_control(msg.payloads)
        elif msg.kind == "data_out":
            self.handle_data_out(msg.fields, [memoryview(p) for p in msg.payloads])
        elif msg.kind == "close_peer":
            self.close_link(str(msg.fields["peer"]), "closed by the router")
        elif msg.kind == "router_hello":
            self.send_router("peerd_hello", {"family": self.family, "epoch": self.epoch})
            for link in list(self.links.values()):
                self.announce(link)
        elif msg.kind == "debug_fail" and os.environ.get(DEBUG_FAULTS_ENV) == "1":
            if msg.fields.get("where") == "callback":
                asyncio.get_running_loop().call_soon(_raise_injected)
            else:
                raise InjectedFault("debug_fail received (MYCELIUM_DEBUG_FAULTS=1)")
        else:
            self.counters["bus_unknown_kind"] += 1

    async def fib_loop(self) -> None:
        await self.fib_resync()
        while True:
            frames = await self.fib_sub.recv_multipart()  # type: ignore[misc]  # zmq.asyncio: a future
            try:
                msg = bus.unpack(frames)
            except bus.BusError:
                continue
            try:
                ok = self.fib.apply_delta(msg.fields)
            except (KeyError, TypeError, ValueError):
                self.counters["fib_delta_malformed"] += 1
                ok = False
            if not ok:
                await self.fib_resync()  # tells the forwarder itself
            elif not is_head(msg.fields):
                self.carry_out(self.forwarder.fib_changed())

    async def fib_resync(self) -> None:
        while True:
            try:
                snapshot = await asyncio.to_thread(
                    bus.rpc_call, zmq.Context.instance(), self.cfg.run_dir, "router", "fib_snapshot"
                )
                self.fib.load_snapshot(snapshot)
                self.counters["fib_snapshots"] += 1
                self.carry_out(self.forwarder.fib_changed())
                return
            except (bus.BusError, KeyError, TypeError, ValueError) as exc:
                log.debug("FIB snapshot failed: %s", exc)
                await asyncio.sleep(0.5)

    async def rpc_loop(self) -> None:
        while True:
            frames = await self.rpc.recv_multipart()  # type: ignore[misc]  # zmq.asyncio: a future
            request = bus.parse_request(frames, self.counters)
            if request is None:
                continue
            envelope, msg = request
            result = self.rpc_result(msg.kind, msg.fields)
            frames_out = bus.pack("ok", {"result": result})
            await self.rpc.send_multipart([*envelope, b"", *frames_out])  # type: ignore[misc]

    def live_stats(self, link_id: str) -> LinkStats | None:
        link = self.links.get(link_id)
        return None if link is None else link.stats()

    def rpc_result(self, method: str, params: dict[str, Any]) -> Any:
        if method == "packet_stats":
            return self.forwarder.stats.to_json()
        if method == "stats":
            kernel = native.kernel
            in_c = kernel.data_handled() if self.rings_in_c and kernel is not None else 0
            return {"counters": dict(self.counters + self.forwarder.pending.drops), "wakeups_in_c": in_c}
        if method == "list_peers":
            return self.peer_api.list_peers(self.live_stats)
        if method in ("add_peer", "remove_peer"):
            result, close = self.peer_api.add_or_remove(method, params)
            self.close_link(close, "peer removed")
            return result
        return {"error": "method", "message": f"unknown method {method!r}"}

    async def stats_loop(self) -> None:
        while True:
            all_stats = [link.stats() for link in self.links.values()]
            self.stats.maybe_publish(
                time.monotonic(),
                self.counters + self.forwarder.pending.drops,
                {
                    "links": len(self.links),
                    "pending": len(self.forwarder.pending),
                    "fib_entries": len(self.fib),
                    "send_queue": sum(s.queued_control for s in all_stats),
                    "send_queue_data_bytes": sum(s.queued_data_bytes for s in all_stats),
                    # ring wake-ups the kernel's wait ran without a Python step (eventloop.serve_rings)
                    "wakeups_in_c": native.kernel.data_handled() if self.rings_in_c and native.kernel else 0,
                },
            )
            now = time.monotonic()
            self.forwarder.expire(now)
            if now >= self.next_refresh:
                # transit routes in use: ask again, the router refreshes those about to expire (4.4)
                self.next_refresh = now + REFRESH_INTERVAL
                for prefix in self.forwarder.take_cached():
                    self.send_router("need_route", {"addr": prefix + bytes(8)})
            await asyncio.sleep(1.0)

    async def discovery_loop(self) -> None:
        """Link-local discovery (discovery.py); beacons name our TCP port."""
        engine = Discovery(
            make_router_id(self.identity.public_key),
            self.cfg.tcp_listen_port,
            self.cfg.network_name is not None,
            time.monotonic(),
            self.counters,
        )
        service = DiscoveryService(
            engine, self.cfg.peer_discovery_port, self.cfg.peer_discovery_interfaces, self.discovered
        )
        await service.run(self.stop_event)

    def discovered(self, ep: Endpoint) -> None:
        """A beacon named ``ep``: a new peer of type linkLocalDiscovery, dialled by the dial loop."""
        outcome = self.table.add_discovered(ep, time.monotonic())
        self.counters[f"discovery_peer_{outcome}"] += 1
        if outcome == "added":
            log.info("discovered peer %s", ep)
            for entry in self.table.due_dials(time.monotonic()):  # now, not at the dial loop's next turn
                self.spawn(self.dial(entry), f"dial {entry.endpoint}")

    async def watch_stop(self) -> None:
        """Ends the task group: on a signal (_Stop) or a failed callback."""
        stop = asyncio.ensure_future(self.stop_event.wait())
        failed = asyncio.ensure_future(self.failed.wait())
        try:
            await asyncio.wait((stop, failed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            failed.cancel()
        if self.failure is not None:
            raise RuntimeError("a loop callback failed") from self.failure
        raise _Stop

    def exception_handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """An exception in a loop callback (a link's reader, the data path)
        is a bug: log it with its traceback and end the process."""
        exc = context.get("exception")
        loop.default_exception_handler(context)
        if isinstance(exc, Exception) and self.failure is None:
            self.failure = exc
            self.failed.set()

    # --- run ----------------------------------------------------------------

    async def run(self) -> None:
        """Start everything; returns on SIGTERM, raises on any failure."""
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self.exception_handler)
        try:
            self.data_in = DataIn(self.cfg.run_dir, self.name, f"-to-{self.name}", self._watch_data, self.counters)
        except OSError as exc:
            log.warning("no shared-memory data path from tund (%s); it sends ZeroMQ frames", exc)
        else:  # read_data's work, in the kernel's wait (services/peerd/eventloop.py)
            din = self.data_in
            self.rings_in_c = serve_rings(
                (din.conns, din.readers, self._data_batch_in, self.direct, DATA_PREFIX_SIZE, din, self.counters)
            )
        for text in self.peer_api.add_saved(self.peer_api.load(self.cfg.peers), time.monotonic()):
            log.debug("static peer %s is not for %s", text, self.name)
        self.peer_api.save()
        try:
            async with asyncio.TaskGroup() as tg:
                self.tg = tg
                self.factories = make_factories(self.cfg, self.family, self)
                for factory in unique(self.factories):
                    await factory.listen()
                shown = ", ".join(f.describe() for f in unique(self.factories)) or "no link types"
                log.info("%s: %s; %d static peers", self.name, shown, len(self.table.entries))
                self.send_router("peerd_hello", {"family": self.family, "epoch": self.epoch})
                try:
                    self.linkwatch = LinkWatch()
                    loop.add_reader(self.linkwatch.fileno(), self.on_link_change)
                except OSError as exc:
                    log.warning("no rtnetlink link notifications (%s): a dead link is noticed late", exc)
                loops = {
                    "dial": self.dial_loop,
                    "inbox": self.inbox_loop,
                    "fib": self.fib_loop,
                    "rpc": self.rpc_loop,
                    "stats": self.stats_loop,
                }
                if "tcp" in self.protocols and not self.cfg.disable_peer_discovery:
                    loops["discovery"] = self.discovery_loop
                for name, loop_fn in loops.items():
                    tg.create_task(loop_fn(), name=name)
                tg.create_task(self.watch_stop(), name="watch_stop")
        except* _Stop:
            pass
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        for link in list(self.links.values()):
            link.close("peerd stopping")
        for factory in unique(self.factories):
            with contextlib.suppress(OSError):
                await factory.close()
        if self.linkwatch is not None:
            self.linkwatch.close()
        for data_out in self.data_outs:
            if data_out is not None:
                data_out.close()
        for _sock, data_out in self.siblings.values():
            if data_out is not None:
                data_out.close()
        if self.data_in is not None:
            self.data_in.close()
        self.ctx.destroy(linger=0)
        self.sync_ctx.destroy(linger=0)


def _raise_injected() -> None:
    raise InjectedFault("debug_fail in a loop callback (MYCELIUM_DEBUG_FAULTS=1)")


def main(argv: list[str] | None = None) -> int:
    def add_args(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--family", default="tcp", help="transport family (node.json peerd_families)")
        parser.add_argument("--tund-workers", type=int, default=1, help="tund crypto workers to spread packets over")

    cfg, args = start_service(f"peerd-{_family_arg(argv)}", argv, add_args)
    if args.family not in cfg.peerd_families:
        log.error("family %r is not in this node's peerd_families %s", args.family, list(cfg.peerd_families))
        return 2
    tune_malloc()
    service = PeerdService(cfg, args.family, args.tund_workers)

    async def runner() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, service.stop_event.set)
        await service.run()

    try:
        asyncio.run(runner(), loop_factory=loop_factory(service.spin))
    except Exception:  # every failure ends here: logged whole, exit 1 for supervisord
        log.exception("%s failed; exiting so that supervisord restarts it", service.name)
        return 1
    return 0


def _family_arg(argv: list[str] | None) -> str:
    """The --family value, for the log name before the arguments are parsed."""
    args = sys.argv[1:] if argv is None else argv
    for i, arg in enumerate(args):
        if arg == "--family" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--family="):
            return arg.split("=", 1)[1]
    return "tcp"
