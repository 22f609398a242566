"""The router process: feeds the sans-IO Babel engine from the bus and
carries out what it returns (control packets to peerd, FIB deltas to the
data path, links to close).

Peer ids are "<family>-<epoch>-<n>", so the family (which peerd owns the
link) is the text before the first dash.

Control-plane input is processed in bounded slices (``SLICE_TLVS`` TLVs or
``SLICE_SECONDS``, whichever ends first); between two slices the router
answers every waiting RPC (apid, FIB snapshots) and publishes what the slice
produced, so a flood of TLVs delays an API answer by one slice, not by the
whole backlog.

Control packets wait in one queue per neighbour, served round robin
(``ROUND_FRAMES`` each), so an honest neighbour's Hellos, IHUs and Updates
are not stuck behind a flooding neighbour's backlog (were its IHUs late by
43 s, the link would be declared dead). A queue holds at most
``MAX_PEER_BACKLOG`` frames; what a neighbour sends beyond that is dropped
unread and counted (``ctl_dropped_backlog``, also per neighbour). Hellos
and IHUs bypass the queues (fed at once, never dropped): a neighbour that
forwards a flood to us is still alive, and must look alive.

A full collection of Python's cyclic GC walks every tracked object: about
0.5 s at 65,000 routes, and during a flood it runs again each time the
heap grows by a quarter. The router therefore moves its long-lived objects
out of the collector's reach every ``GC_FREEZE_INTERVAL`` (after a young
collection, so fresh cyclic garbage is collected first); routing state is
acyclic and freed by reference counting as before.
"""

from __future__ import annotations

import gc
import ipaddress
import logging
import math
import os
import random
import time
from collections import Counter, defaultdict, deque
from typing import Any

import zmq

from common import bus
from common.fib import Route as FibRoute
from common.fib import make_delta, make_head
from common.identity import Identity, load_key_file, make_router_id, router_id_text
from common.lifecycle import StopSignal, start_service
from common.nodeconfig import NodeConfig
from common.wire.errors import CodecError
from common.wire.packet import ControlPacket, control_tlv_type, decode_packet
from common.wire.tlv import TYPE_HELLO, TYPE_IHU

from .engine import FibDel, FibSet, PeerInfo, RouterEngine, RouteView

log = logging.getLogger("router")
MAX_WAIT = 1.0  # seconds between loop turns at most (stats, rpc responsiveness)
FIB_HEAD_INTERVAL = 1.0  # the FIB's (epoch, seq) published this often (common/fib.py)
SLICE_TLVS = 2_000  # control TLVs per slice of inbox processing
SLICE_SECONDS = 0.02  # ... or this much time, whichever comes first
SLICE_TIMERS = 2_000  # timer events per slice
MAX_RPC_PER_TURN = 100
MAX_PEER_BACKLOG = 50_000  # control frames queued per neighbour (~0.5-1 s of engine work)
ROUND_FRAMES = 64  # frames per neighbour per round-robin turn
READ_PER_SLICE = 256  # bus messages read per slice at most
LIVENESS_TLVS = (TYPE_HELLO, TYPE_IHU)
GC_FREEZE_INTERVAL = 2.0


def family_of(peer_id: str) -> str:
    return peer_id.split("-", 1)[0]


def epoch_of(peer_id: str) -> str:
    parts = peer_id.split("-")
    return parts[1] if len(parts) > 2 else ""


def metric_json(metric: int) -> int | str:
    return "infinite" if metric == 0xFFFF else metric


class RouterService:
    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.identity = Identity.from_secret(load_key_file(cfg.key_file))
        self.router_id = make_router_id(self.identity.public_key)
        self.counters: Counter[str] = Counter()
        self.ctx = zmq.Context()
        run = cfg.run_dir
        self.inbox = bus.bind(self.ctx, zmq.PULL, run, "router.in")
        self.rpc = bus.bind(self.ctx, zmq.ROUTER, run, "router.rpc")
        self.fib_pub = bus.bind(self.ctx, zmq.PUB, run, "router.fib")
        self.peerd = {
            fam: bus.Sender(bus.connect(self.ctx, zmq.PUSH, run, f"{bus.peerd_name(fam)}.in"), self.counters, fam)
            for fam in cfg.peerd_families
        }
        self.stats = bus.StatsPublisher(self.ctx, run, "router")
        self.engine = RouterEngine(self.identity.public_key, self.router_id, time.monotonic())
        self.fib_epoch = random.getrandbits(31)
        self.fib_seq = 0
        self.next_fib_head = 0.0
        self.peers: dict[str, PeerInfo] = {}
        self.stop = StopSignal()
        self.last_rpc_check = time.monotonic()
        self.max_rpc_gap = 0.0
        self.next_freeze = 0.0
        self.backlog: dict[str, deque[bytes]] = {}  # per neighbour: control frames not yet fed to the engine
        self.backlog_drops: Counter[str] = Counter()

    # --- inputs -----------------------------------------------------------

    def handle_inbox(self, msg: bus.Message, now: float) -> None:
        """One bus message. Control packets are queued per neighbour for
        ``run_backlog`` (one read of a link can carry tens of thousands). Only the
        fields are checked here (malformed ones are counted); what the engine
        raises is a bug and takes the process down (supervisord restarts it)."""
        kind, f = msg.kind, msg.fields
        try:
            peer_id = _peer_field(f) if kind in ("ctl", "peer_up", "peer_down") else ""
        except BusFieldError:
            self.counters["bus_malformed"] += 1
            return
        if kind == "ctl":
            if peer_id not in self.peers:
                self.counters["ctl_from_unknown_peer"] += len(msg.payloads)
                return
            queue = self.backlog.get(peer_id)
            if queue is None:
                queue = self.backlog[peer_id] = deque()
            for frame in msg.payloads:
                if control_tlv_type(frame) in LIVENESS_TLVS:
                    # at once and never dropped: a Hello or IHU stuck behind
                    # (or dropped from) a backlog would make a live link look dead
                    self.feed_frame(peer_id, frame, now)
                elif len(queue) < MAX_PEER_BACKLOG:
                    queue.append(frame)
                else:
                    self.counters["ctl_dropped_backlog"] += 1
                    self.backlog_drops[peer_id] += 1
            if not queue:
                del self.backlog[peer_id]
        elif kind == "peer_up":
            if peer_id in self.peers:
                return
            try:
                info = PeerInfo(peer_id, int(f["static_cost"]), str(f.get("link_name", "")))
            except (KeyError, TypeError, ValueError):
                self.counters["bus_malformed"] += 1
                return
            self.peers[peer_id] = info
            self.engine.peer_up(info, now)
            log.info("peer up %s (%s)", peer_id, info.link_name)
        elif kind == "peer_down":
            if self.peers.pop(peer_id, None) is not None:
                self.engine.peer_down(peer_id, now)
                self.forget_backlog(peer_id)
                log.info("peer down %s", peer_id)
        elif kind == "peerd_hello":
            # a (re)started peerd: links of any older incarnation are gone
            fam, epoch = f.get("family"), str(f.get("epoch"))
            if not isinstance(fam, str) or "epoch" not in f:
                self.counters["bus_malformed"] += 1
                return
            for peer_id in [p for p in self.peers if family_of(p) == fam and epoch_of(p) != epoch]:
                del self.peers[peer_id]
                self.engine.peer_down(peer_id, now)
                self.forget_backlog(peer_id)
            log.info("peerd-%s started (epoch %s)", fam, epoch)
        elif kind == "need_route":
            try:
                addr = ipaddress.IPv6Address(f["addr"])
            except (KeyError, TypeError, ValueError):
                self.counters["need_route_malformed"] += 1
                return
            self.engine.request_route(addr, now)
        else:
            self.counters["bus_unknown_kind"] += 1

    def handle_rpc(self, frames: list[bytes], now: float) -> None:
        request = bus.parse_request(frames, self.counters)
        if request is None:
            return
        envelope, msg = request
        started = time.monotonic()
        try:
            result = self.rpc_result(msg.kind, msg.fields, now)
        except BadRequest as exc:  # a malformed call from another service; a bug here is loud
            self.counters["rpc_bad_request"] += 1
            bus.rpc_reply(self.rpc, envelope, error=str(exc))
            return
        bus.rpc_reply(self.rpc, envelope, result)
        took = time.monotonic() - started
        if took > 0.25:
            log.info("rpc %s took %.2f s", msg.kind, took)

    def rpc_result(self, method: str, params: dict[str, Any], now: float) -> Any:
        if method == "fib_snapshot":
            return {"epoch": self.fib_epoch, "seq": self.fib_seq, "entries": self.fib_entries()}
        if method == "routes_selected":
            return self.routes_json(self.engine.selected_routes())
        if method == "routes_fallback":
            return self.routes_json(self.engine.fallback_routes())
        if method == "routes_queried":
            return [{"subnet": str(s), "expiration": str(left)} for s, left in self.engine.queried_subnets(now)]
        if method == "pubkey":
            try:
                addr = bytes(params["addr"])
            except (KeyError, TypeError, ValueError) as exc:
                raise BadRequest(f"pubkey needs a 16-byte addr: {exc!r}") from exc
            if len(addr) != 16:
                raise BadRequest("pubkey needs a 16-byte addr")
            key = self.engine.lookup_public_key(ipaddress.IPv6Address(addr))
            if key is None:  # start a lookup so that a later call can answer (the data path does the same)
                self.engine.request_route(ipaddress.IPv6Address(addr), now)
            return key.hex() if key else None
        if method == "peers":
            return [
                {"peer": p, "linkName": info.link_name, "cost": self.engine.link_cost(p)}
                for p, info in self.peers.items()
            ]
        if method == "info":
            return {"routerId": router_id_text(self.router_id), "seqno": self.engine.seqno}
        raise BadRequest(f"unknown method {method!r}")

    def routes_json(self, views: list[RouteView]) -> list[dict[str, Any]]:
        names = {p: info.link_name or p for p, info in self.peers.items()}
        return [
            {
                "subnet": str(r.subnet),
                "nextHop": names.get(r.next_hop, r.next_hop),
                "metric": metric_json(r.metric),
                "seqno": r.seqno,
            }
            for r in views
        ]

    def fib_entries(self) -> list[list[Any]]:
        return [
            [s.network_packed, s.prefix_len, e.next_hop, e.public_key]
            for s, e in self.engine.fib_snapshot().items()
            if s.is_ipv6
        ]

    # --- outputs ----------------------------------------------------------

    def flush(self) -> None:
        by_peer: dict[str, list[bytes]] = defaultdict(list)
        for peer_id, tlv in self.engine.tlvs_to_send():
            by_peer[peer_id].append(ControlPacket(tlv).encode())  # an unencodable TLV is an engine bug: loud
        for peer_id, frames in by_peer.items():
            sender = self.peerd.get(family_of(peer_id))
            if sender is not None:
                sender.control("ctl", {"peer": peer_id}, frames)
                self.counters["ctl_sent"] += len(frames)
        changes = self.engine.fib_changes()
        if changes:
            ordered: list[tuple[bytes, int, FibRoute | None]] = []
            for ch in changes:
                if not ch.subnet.is_ipv6:
                    continue
                net = ch.subnet.network_packed
                if isinstance(ch, FibSet):
                    ordered.append((net, ch.subnet.prefix_len, FibRoute(ch.entry.next_hop, ch.entry.public_key)))
                elif isinstance(ch, FibDel):
                    ordered.append((net, ch.subnet.prefix_len, None))
            self.fib_seq += 1
            self.fib_pub.send_multipart(bus.pack("fib", make_delta(self.fib_epoch, self.fib_seq, ordered)))
        now = time.monotonic()
        if now >= self.next_fib_head:
            self.next_fib_head = now + FIB_HEAD_INTERVAL
            self.fib_pub.send_multipart(bus.pack("fib", make_head(self.fib_epoch, self.fib_seq)))
        for peer_id in self.engine.peers_to_close():
            sender = self.peerd.get(family_of(peer_id))
            if sender is not None:
                sender.control("close_peer", {"peer": peer_id})
            self.peers.pop(peer_id, None)  # the engine already handled it as dead

    # --- loop -------------------------------------------------------------

    def run(self) -> None:
        log.info("router %s for %s started", router_id_text(self.router_id), self.identity.subnet)
        for sender in self.peerd.values():
            sender.control("router_hello", {"pid": os.getpid()})
        poller = zmq.Poller()
        poller.register(self.inbox, zmq.POLLIN)
        poller.register(self.rpc, zmq.POLLIN)
        poller.register(self.stop, zmq.POLLIN)
        while not self.stop.stopped:
            now = time.monotonic()
            timer = self.engine.get_timer()
            wait = MAX_WAIT if timer is None else min(MAX_WAIT, max(0.0, timer - now))
            events = dict(poller.poll(math.ceil(wait * 1000)))
            now = self.last_rpc_check = time.monotonic()  # waiting in poll is not a gap: it wakes for RPCs
            backlog = False
            if self.inbox in events:
                backlog = self.inbox_slice(now)
            self.answer_rpcs(now)
            timer = self.engine.get_timer()
            if timer is not None and timer <= now:
                self.engine.handle_timer(now, SLICE_TIMERS)
            self.flush()
            self.publish_stats(now)
            while backlog and not self.stop.stopped:  # more input waiting: slices with RPCs in between
                now = time.monotonic()
                backlog = self.inbox_slice(now)
                self.answer_rpcs(now)
                self.flush()
                self.publish_stats(now)
        self.ctx.destroy(linger=0)

    def inbox_slice(self, now: float) -> bool:
        """One bounded slice of input; True when input is left over. Bus
        messages are read first (cheap: control frames are only queued), then
        the neighbours' queues are served round robin."""
        budget = SLICE_TLVS
        deadline = time.monotonic() + SLICE_SECONDS
        unread = True
        for _ in range(READ_PER_SLICE):
            try:
                frames = self.inbox.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                unread = False
                break
            try:
                msg = bus.unpack(frames)
            except bus.BusError as exc:
                self.counters["bus_malformed"] += 1
                log.debug("bad bus message: %s", exc)
                continue
            self.handle_inbox(msg, now)
        while budget > 0 and self.backlog and time.monotonic() < deadline:
            for peer_id in list(self.backlog):
                budget -= self.run_backlog(peer_id, ROUND_FRAMES, now)
        if unread or self.backlog:
            self.counters["inbox_slices_cut"] += 1
            return True
        return False

    def run_backlog(self, peer_id: str, limit: int, now: float) -> int:
        """Feed at most ``limit`` of ``peer_id``'s queued control frames to the engine; returns how many."""
        queue = self.backlog[peer_id]
        n = min(limit, len(queue))
        pop = queue.popleft
        feed = self.feed_frame
        for _ in range(n):
            feed(peer_id, pop(), now)
        if not queue:
            del self.backlog[peer_id]
        return max(1, n)

    def feed_frame(self, peer_id: str, frame: bytes, now: float) -> None:
        try:
            pkt = decode_packet(frame)
        except CodecError:
            self.counters["ctl_malformed"] += 1
            return
        if isinstance(pkt, ControlPacket):
            self.engine.receive_tlv(peer_id, pkt.tlv, now)

    def forget_backlog(self, peer_id: str) -> None:
        """A dead link's queued frames are discarded (PROTOCOL.md 5.5)."""
        self.backlog.pop(peer_id, None)
        self.backlog_drops.pop(peer_id, None)

    def answer_rpcs(self, now: float) -> None:
        # the longest stretch without looking at the RPC socket, a figure for the flood test
        t = time.monotonic()
        gap = t - self.last_rpc_check
        self.last_rpc_check = t
        if gap > self.max_rpc_gap:
            self.max_rpc_gap = gap
            if gap > 0.5:
                log.warning("RPCs unanswered for %.2f s", gap)
        for _ in range(MAX_RPC_PER_TURN):
            try:
                frames = self.rpc.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.handle_rpc(frames, now)

    def neighbour_stats(self) -> dict[str, dict[str, int]]:
        rows = self.engine.neighbour_stats()
        for peer_id, row in rows.items():
            row["ctl_dropped_backlog"] = self.backlog_drops.get(peer_id, 0)
            row["ctl_backlog"] = len(self.backlog.get(peer_id, ()))
        return rows

    def publish_stats(self, now: float) -> None:
        if now >= self.next_freeze:  # (see the module docstring)
            gc.collect(1)
            gc.freeze()
            self.next_freeze = now + GC_FREEZE_INTERVAL
        if not self.stats.due(now):
            return
        self.stats.maybe_publish(
            now,
            self.counters + self.engine.counters,
            {
                "peers": len(self.peers),
                "routes": self.engine.selected_count(),
                "subnets": self.engine.subnet_count(),
                "seqno": self.engine.seqno,
                "max_rpc_gap_ms": round(self.max_rpc_gap * 1000),
                # per-neighbour fairness figures; apid's /metrics labels them by peer
                "neighbours": self.neighbour_stats(),
            },
        )


class BadRequest(ValueError):
    """An RPC call this router cannot answer (unknown method, bad parameters)."""


class BusFieldError(ValueError):
    """A bus message whose fields are not what its kind needs."""


def _peer_field(fields: dict[str, Any]) -> str:
    peer = fields.get("peer")
    if not isinstance(peer, str):
        raise BusFieldError(f"peer field {peer!r}")
    return peer


def main(argv: list[str] | None = None) -> int:
    cfg, _ = start_service("router", argv)
    RouterService(cfg).run()
    return 0
