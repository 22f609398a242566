"""tund: the node's end-to-end crypto (and, with TUN, the TUN device).

In no-TUN mode it is the crypto worker: packets addressed to this node
arrive from peerd, are decrypted with the key shared with their source
(found through the FIB copy) and dispatched by inner type; L3 payloads
are counted and dropped since there is no TUN to write them to.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import Counter, OrderedDict

import zmq
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from common import bus
from common.crypto import DecryptError, SessionKey, shared_secret
from common.fib import FibReplica
from common.identity import Identity, load_key_file
from common.lifecycle import StopSignal, die_with_parent
from common.logs import setup as setup_logs
from common.nodeconfig import NodeConfig
from common.pending import PendingQueue
from common.wire.errors import CodecError
from common.wire.inner import INNER_L3, INNER_MESSAGE, split_inner
from common.wire.packet import DataPacket, decode_packet

log = logging.getLogger("tund")
KEY_CACHE_SIZE = 4096
MAX_WAIT = 1.0


class KeyCache:
    """Bounded LRU of AES-GCM states by peer public key (X25519 is the
    expensive part; one exchange per peer, not per packet)."""

    def __init__(self, secret: X25519PrivateKey, size: int = KEY_CACHE_SIZE) -> None:
        self.secret = secret
        self.size = size
        self._keys: OrderedDict[bytes, SessionKey] = OrderedDict()

    def get(self, public_key: bytes) -> SessionKey:
        key = self._keys.get(public_key)
        if key is None:
            key = SessionKey(shared_secret(self.secret, public_key))
            self._keys[public_key] = key
            if len(self._keys) > self.size:
                self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(public_key)
        return key


class TundService:
    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.identity = Identity.from_secret(load_key_file(cfg.key_file))
        self.keys = KeyCache(self.identity.private_key)
        self.counters: Counter[str] = Counter()
        self.fib = FibReplica()
        self.pending: PendingQueue[DataPacket] = PendingQueue(per_subnet=100, total=10_000)
        self.ctx = zmq.Context()
        run = cfg.run_dir
        self.inbox = bus.bind(self.ctx, zmq.PULL, run, "tund.in", hwm=bus.DATA_HWM)
        self.rpc = bus.bind(self.ctx, zmq.ROUTER, run, "tund.rpc")
        self.router = bus.Sender(bus.connect(self.ctx, zmq.PUSH, run, "router.in"), self.counters, "router")
        self.fib_sub = bus.connect(self.ctx, zmq.SUB, run, "router.fib")
        self.fib_sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.stats = bus.StatsPublisher(self.ctx, run, "tund")
        self.fib_synced = False
        self.stop = StopSignal()

    def fib_resync(self) -> None:
        try:
            self.fib.load_snapshot(bus.rpc_call(self.ctx, self.cfg.run_dir, "router", "fib_snapshot", timeout_ms=500))
            self.fib_synced = True
        except bus.BusError:
            self.fib_synced = False

    def deliver(self, pkt: DataPacket, now: float) -> None:
        route = self.fib.lookup(pkt.src)
        if route is None:
            if self.pending.push(pkt.src[:8], pkt, now):
                self.router.control("need_route", {"addr": pkt.src})
            return
        try:
            plaintext = self.keys.get(route.public_key).open(pkt.body)
            kind, _payload = split_inner(plaintext)
        except DecryptError:
            self.counters["rx_decrypt_failed"] += 1
            return
        except CodecError:
            self.counters["rx_inner_malformed"] += 1
            return
        self.counters["rx_decrypted"] += 1
        if kind == INNER_L3:
            self.counters["rx_l3_no_tun"] += 1
        elif kind == INNER_MESSAGE:
            self.counters["rx_message_no_msgbus"] += 1
        else:
            self.counters["rx_oob_icmp"] += 1

    def handle_inbox(self, msg: bus.Message, now: float) -> None:
        if msg.kind != "local":
            self.counters["bus_unknown_kind"] += 1
            return
        for frame in msg.payloads:
            try:
                pkt = decode_packet(frame)
            except CodecError:
                self.counters["rx_malformed"] += 1
                continue
            if isinstance(pkt, DataPacket):
                self.deliver(pkt, now)

    def release_pending(self, now: float) -> None:
        for prefix in self.pending.subnets():
            if self.fib.lookup(prefix + bytes(8)) is not None:
                for pkt in self.pending.pop(prefix):
                    self.deliver(pkt, now)

    def run(self) -> None:
        log.info("crypto worker for %s started (no TUN)", self.identity.address)
        poller = zmq.Poller()
        for sock in (self.inbox, self.rpc, self.fib_sub, self.stop):
            poller.register(sock, zmq.POLLIN)
        self.fib_resync()
        while not self.stop.stopped:
            events = dict(poller.poll(MAX_WAIT * 1000))
            now = time.monotonic()
            if not self.fib_synced:
                self.fib_resync()
            if self.fib_sub in events:
                while True:
                    try:
                        msg = bus.unpack(self.fib_sub.recv_multipart(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                    except bus.BusError:
                        continue
                    if not self.fib.apply_delta(msg.fields):
                        self.fib_resync()
                self.release_pending(now)
            if self.inbox in events:
                for _ in range(1000):
                    try:
                        frames = self.inbox.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        self.handle_inbox(bus.unpack(frames), now)
                    except bus.BusError:
                        self.counters["bus_malformed"] += 1
            if self.rpc in events:
                try:
                    envelope, body = bus.split_envelope(self.rpc.recv_multipart(zmq.NOBLOCK))
                    bus.unpack(body)
                    bus.rpc_reply(self.rpc, envelope, {"counters": dict(self.counters)})
                except (zmq.Again, bus.BusError):
                    pass
            self.pending.expire(now)
            self.stats.maybe_publish(
                now, self.counters + self.pending.drops, {"pending": len(self.pending), "fib_entries": len(self.fib)}
            )
        self.ctx.destroy(linger=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.tund")
    parser.add_argument("--run-dir", required=True)
    args = parser.parse_args(argv)
    die_with_parent()
    cfg = NodeConfig.load_or_exit(args.run_dir)
    setup_logs("tund", cfg.log_level)
    TundService(cfg).run()
    return 0
