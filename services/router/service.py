"""The router process: feeds the sans-IO Babel engine from the bus and
carries out what it returns (control packets to peerd, FIB deltas to the
data path, links to close).

Peer ids are "<family>-<epoch>-<n>", so the family (which peerd owns the
link) is the text before the first dash.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import time
from collections import Counter, defaultdict
from typing import Any

import zmq

from common import bus
from common.identity import Identity, load_key_file, make_router_id, router_id_text
from common.lifecycle import StopSignal, start_service
from common.nodeconfig import NodeConfig
from common.wire.errors import CodecError
from common.wire.packet import ControlPacket, decode_packet

from .engine import FibDel, FibSet, PeerInfo, RouterEngine, RouteView

log = logging.getLogger("router")
MAX_WAIT = 1.0  # seconds between loop turns at most (stats, rpc responsiveness)


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
        self.peers: dict[str, PeerInfo] = {}
        self.stop = StopSignal()

    # --- inputs -----------------------------------------------------------

    def handle_inbox(self, msg: bus.Message, now: float) -> None:
        kind, f = msg.kind, msg.fields
        if kind == "ctl":
            peer_id = f.get("peer")
            if peer_id not in self.peers:
                self.counters["ctl_from_unknown_peer"] += len(msg.payloads)
                return
            for frame in msg.payloads:
                try:
                    pkt = decode_packet(frame)
                except CodecError:
                    self.counters["ctl_malformed"] += 1
                    continue
                if isinstance(pkt, ControlPacket):
                    self.engine.receive_tlv(peer_id, pkt.tlv, now)
        elif kind == "peer_up":
            peer_id = f["peer"]
            if peer_id in self.peers:
                return
            info = PeerInfo(peer_id, int(f["static_cost"]), str(f.get("link_name", "")))
            self.peers[peer_id] = info
            self.engine.peer_up(info, now)
            log.info("peer up %s (%s)", peer_id, info.link_name)
        elif kind == "peer_down":
            peer_id = f["peer"]
            if self.peers.pop(peer_id, None) is not None:
                self.engine.peer_down(peer_id, now)
                log.info("peer down %s", peer_id)
        elif kind == "peerd_hello":
            # a (re)started peerd: links of any older incarnation are gone
            fam, epoch = f["family"], str(f["epoch"])
            for peer_id in [p for p in self.peers if family_of(p) == fam and epoch_of(p) != epoch]:
                del self.peers[peer_id]
                self.engine.peer_down(peer_id, now)
            log.info("peerd-%s started (epoch %s)", fam, epoch)
        elif kind == "need_route":
            try:
                addr = ipaddress.IPv6Address(f["addr"])
            except (KeyError, ValueError):
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
        try:
            result = self.rpc_result(msg.kind, msg.fields, now)
        except Exception as exc:  # an rpc bug must not take the router down
            log.exception("rpc %s failed", msg.kind)
            bus.rpc_reply(self.rpc, envelope, error=str(exc))
            return
        bus.rpc_reply(self.rpc, envelope, result)

    def rpc_result(self, method: str, params: dict[str, Any], now: float) -> Any:
        if method == "fib_snapshot":
            return {"epoch": self.fib_epoch, "seq": self.fib_seq, "entries": self.fib_entries()}
        if method == "routes_selected":
            return [self.route_json(r) for r in self.engine.selected_routes()]
        if method == "routes_fallback":
            return [self.route_json(r) for r in self.engine.fallback_routes()]
        if method == "routes_queried":
            return [{"subnet": str(s), "expiration": str(left)} for s, left in self.engine.queried_subnets(now)]
        if method == "pubkey":
            addr = bytes(params["addr"])
            key = self.lookup_key(addr)
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
        raise ValueError(f"unknown method {method!r}")

    def lookup_key(self, addr: bytes) -> bytes | None:
        best: tuple[int, bytes] | None = None
        ip = ipaddress.IPv6Address(addr)
        for subnet, entry in self.engine.fib_snapshot().items():
            if subnet.contains_address(ip) and (best is None or subnet.prefix_len > best[0]):
                best = (subnet.prefix_len, entry.public_key)
        return best[1] if best else None

    def route_json(self, r: RouteView) -> dict[str, Any]:
        info = self.peers.get(r.next_hop)
        return {
            "subnet": str(r.subnet),
            "nextHop": info.link_name if info and info.link_name else r.next_hop,
            "metric": metric_json(r.metric),
            "seqno": r.seqno,
        }

    def fib_entries(self) -> list[list[Any]]:
        return [
            [s.network.network_address.packed, s.prefix_len, e.next_hop, e.public_key]
            for s, e in self.engine.fib_snapshot().items()
            if s.is_ipv6
        ]

    # --- outputs ----------------------------------------------------------

    def flush(self) -> None:
        by_peer: dict[str, list[bytes]] = defaultdict(list)
        for peer_id, tlv in self.engine.tlvs_to_send():
            try:
                by_peer[peer_id].append(ControlPacket(tlv).encode())
            except CodecError:
                log.exception("engine produced an unencodable TLV %r", tlv)
                continue
        for peer_id, frames in by_peer.items():
            sender = self.peerd.get(family_of(peer_id))
            if sender is not None:
                sender.control("ctl", {"peer": peer_id}, frames)
                self.counters["ctl_sent"] += len(frames)
        changes = self.engine.fib_changes()
        if changes:
            sets, dels = [], []
            for ch in changes:
                if not ch.subnet.is_ipv6:
                    continue
                net = ch.subnet.network.network_address.packed
                if isinstance(ch, FibSet):
                    sets.append([net, ch.subnet.prefix_len, ch.entry.next_hop, ch.entry.public_key])
                elif isinstance(ch, FibDel):
                    dels.append([net, ch.subnet.prefix_len])
            self.fib_seq += 1
            self.fib_pub.send_multipart(
                bus.pack("fib", {"epoch": self.fib_epoch, "seq": self.fib_seq, "set": sets, "del": dels})
            )
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
            events = dict(poller.poll(wait * 1000))
            now = time.monotonic()
            if self.inbox in events:
                for _ in range(1000):  # bounded batch per turn
                    try:
                        frames = self.inbox.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        self.handle_inbox(bus.unpack(frames), now)
                    except (bus.BusError, KeyError, TypeError, ValueError) as exc:
                        self.counters["bus_malformed"] += 1
                        log.debug("bad bus message: %s", exc)
            if self.rpc in events:
                for _ in range(100):
                    try:
                        frames = self.rpc.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.handle_rpc(frames, now)
            timer = self.engine.get_timer()
            if timer is not None and timer <= now:
                self.engine.handle_timer(now)
            self.flush()
            if self.stats.due(now):
                self.stats.maybe_publish(
                    now,
                    self.counters + self.engine.counters,
                    {
                        "peers": len(self.peers),
                        "routes": len(self.engine.selected_routes()),
                        "seqno": self.engine.seqno,
                    },
                )
        self.ctx.destroy(linger=0)


def main(argv: list[str] | None = None) -> int:
    cfg, _ = start_service("router", argv)
    RouterService(cfg).run()
    return 0
