"""tund's packet logic without IO (PROTOCOL.md 4.4-4.7): what to do with
packets read from the TUN, with data packets peerd hands over for local
delivery, with ICMP requests and with messages to send.

The service feeds batches in and drains the results:

- ``take_out()``: next-hop peer id -> encoded data packets back to back
  (one ZeroMQ frame to the peerd that owns the link);
- ``gro.flush()``: buffers to ``os.writev`` to the TUN, one list per write;
- ``messages``: (src, dst, plaintext) of message packets for msgbus;
- ``need``: addresses the router should find a route for.

Per packet the loops do the AES-GCM call and the header bytes, nothing
else: a dict probe by /64 finds the next hop and the bound
``encrypt``/``decrypt`` method; everything else (route changes, queues,
ICMP, refresh requests) happens on the slow paths or per batch.
"""

from __future__ import annotations

import os
import struct
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from common.crypto import MIN_SEALED_SIZE, DecryptError, SessionKey, shared_secret
from common.fib import FibReplica, Route
from common.firewall import Firewall
from common.identity import Identity
from common.native import fields
from common.native import kernel as NATIVE
from common.pending import PendingQueue
from common.replay import NonceFilter
from common.wire.checksum import finish, ones_sum
from common.wire.errors import CodecError
from common.wire.icmp import (
    CODE_ADDRESS_UNREACHABLE,
    CODE_HOP_LIMIT,
    CODE_NO_ROUTE,
    CODE_SOURCE_POLICY,
    DEST_UNREACHABLE,
    ICMP_PAYLOAD_CAP,
    TIME_EXCEEDED,
    build_icmpv6,
    oob_icmp_plaintext,
    parse_oob_icmp,
)
from common.wire.inner import INNER_L3, INNER_MESSAGE, INNER_OOB_ICMP, INNER_VERSION, L3_HEADER
from common.wire.rules import (
    DATA8,
    MESSAGE_HOP_LIMIT,
    OOB_HOP_LIMIT,
    OUTBOUND_HOP_LIMIT,
    OUTBOUND_SOURCE_NOT_OVERLAY,
    body_len,
    can_forward,
    is_overlay_packed,
    outbound_check,
    outbound_ok,
)
from common.wire.session import INNER_SESSION

from .gro import Gro
from .gso import SegmentError, split_tcp
from .sessions import BLOCKED, RecvState, SendState, SessionEngine
from .tun import MTU, VNET_HDR_SIZE, VNET_PLAIN

KEY_CACHE_SIZE = 4096
PACKET_TOO_BIG = 2
# Packets from the TUN waiting for a route: the reference allows 10,000 per
# /64 and 1,000,000 in all (1.4 GB); a TCP handshake or a ping needs a few.
PENDING_OUT_PER_SUBNET = 1000
PENDING_OUT_TOTAL = 10_000
PENDING_IN_PER_SUBNET = 100  # PROTOCOL.md 10
PENDING_IN_TOTAL = 10_000
REFRESH_INTERVAL = 5.0  # routes in use are re-requested this often (the router refreshes those expiring)
ROUTE_CACHE_MAX = 65_536
HOST_ICMP_RATE = 200.0  # per second, burst as much
OOB_ICMP_RATE = 100.0


class KeyCache:
    """Bounded LRU of AES-GCM states by peer public key (X25519 is the
    expensive part; one exchange per peer, not per packet)."""

    def __init__(self, secret: X25519PrivateKey, size: int = KEY_CACHE_SIZE, native: bool = True) -> None:
        self.secret = secret
        self.native = native  # False: the reference's AESGCM even where the kernel is built
        self.size = size
        self._keys: OrderedDict[bytes, SessionKey] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, public_key: bytes) -> SessionKey:
        key = self._keys.get(public_key)
        if key is None:
            key = SessionKey(shared_secret(self.secret, public_key), self.native)
            self._keys[public_key] = key
            if len(self._keys) > self.size:
                self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(public_key)
        return key


class RateLimit:
    """Token bucket: ``rate`` events per second, bursts of as many."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.last = 0.0

    def allow(self, now: float) -> bool:
        self.tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def finish_checksum(pkt: bytes, off: int) -> bytes | None:
    """Complete a NEEDS_CSUM packet read with a virtio-net header (with
    checksum offload negotiated: most non-GSO TCP and UDP packets); the
    field holds the pseudo-header sum already. None if the offsets are
    out of the packet."""
    csum_start, csum_offset = struct.unpack_from("=HH", pkt, 6)
    start = off + csum_start
    field = start + csum_offset
    if start >= len(pkt) or field + 2 > len(pkt):
        return None
    out = bytearray(pkt)
    out[0] = 0
    with memoryview(pkt) as view:
        out[field : field + 2] = finish(ones_sum(view[start:])).to_bytes(2, "big")
    return bytes(out)


Sealer = tuple[str, Callable[..., bytes], SendState | None]  # next hop, bound encrypt, session (None: random nonces)


if TYPE_CHECKING:
    _PlaneFields = object
else:
    _PlaneFields = fields("PlaneFields")  # the fields the kernel reads, in slots


class DataPlane(_PlaneFields):
    def __init__(
        self,
        identity: Identity,
        fib: FibReplica,
        keys: KeyCache,
        tun: bool,
        vnet: bool,
        kernel: Any = NATIVE,
        sessions: SessionEngine | None = None,
        firewall: Firewall | None = None,
    ) -> None:
        self.own_addr = identity.address.packed
        self.own_prefix = self.own_addr[:8]
        self.own_net = self.own_prefix + bytes(8)
        self.fib = fib
        self.keys = keys
        self.tun = tun
        self.vnet = vnet and tun
        self.off = VNET_HDR_SIZE if self.vnet else 0  # where the IPv6 packet starts in a TUN read
        self.counters: Counter[str] = Counter()
        # native kernel (common/_kernel.c): the same steps as from_tun/from_peer/Gro below, in C,
        # session keys and the firewall included; None (MYCELIUM_NATIVE=0, not built, or a test's
        # choice) runs the reference here
        self.kernel = kernel
        self.gro: Any = Gro(self.vnet) if kernel is None else kernel.Gro(self.vnet)
        self.nonce_bytes: Callable[[int], bytes] = os.urandom  # the nonce scheme: n bytes per call, 12 per packet
        self.mtu = MTU
        self.out: dict[str, list[bytes]] = {}  # next hop -> pieces of encoded packets (see take_out)
        self.messages: list[tuple[bytes, bytes, bytes]] = []
        self.need: set[bytes] = set()
        # dst /64 -> (next hop, bound encrypt); src /64 -> bound decrypt. Valid
        # while the FIB holds no prefix longer than /64; cleared on every change.
        self.routes: dict[bytes, Sealer] = {}
        self.keys_in: dict[bytes, Callable[..., bytes]] = {}
        self.cacheable = True
        self.pending_out: PendingQueue[tuple[bytes, bytes, int, bytes]] = PendingQueue(
            PENDING_OUT_PER_SUBNET, PENDING_OUT_TOTAL
        )
        self.pending_in: PendingQueue[bytes] = PendingQueue(PENDING_IN_PER_SUBNET, PENDING_IN_TOTAL)
        self.host_icmp_rate = RateLimit(HOST_ICMP_RATE)
        self.oob_icmp_rate = RateLimit(OOB_ICMP_RATE)
        self.next_refresh = 0.0
        self.now = 0.0
        # --- security extensions (docs/EXTENSIONS.md): session keys, replay filter, firewall
        self.sessions = sessions
        self.by_index: dict[bytes, RecvState] = sessions.by_index if sessions is not None else {}
        self.capable: set[bytes] = sessions.capable if sessions is not None else set()
        self.nonce_filter = NonceFilter()
        # with the extensions off (--no-session-keys) the data path is exactly the reference's (and the C kernel's)
        self.filter_nonces = sessions is not None
        self.firewall = firewall
        self.blocked_hit = False  # _lookup_out found the peer's sessions blocked: drop, do not queue

    # --- outbound: TUN -> peers ------------------------------------------------

    def from_tun(self, pkts: list[bytes], now: float, off: int | None = None) -> None:
        """Packets read from the TUN (each with its virtio-net header when
        ``vnet``; ``off`` bytes before the IPv6 header): checks of 4.7, FIB
        lookup, encryption, grouping by next hop."""
        if off is None:
            off = self.off
        self.now = now
        if self.sessions is not None and self.sessions.changed:
            self.sync_sessions()
        if self.kernel is not None:
            self.kernel.from_tun(self, pkts, now, off)
            return
        vnet = self.vnet and off == self.off
        routes = self.routes
        out = self.out
        pack = DATA8.pack
        l3 = L3_HEADER
        nonces = self.nonce_bytes(12 * len(pkts))
        ni = 0
        last_hop: str | None = None
        parts: list[bytes] = []
        sent = 0
        for p in pkts:
            if len(p) < off + 40 or p[off] >> 4 != 6:
                self.counters["tun_rx_not_ipv6"] += 1
                continue
            if vnet and (p[0] or p[1]):
                if p[1]:  # a TCP super packet: cut it, then as if read segment by segment
                    self._from_tun_gso(p, now)
                    continue
                if p[0] & 1:
                    p = finish_checksum(p, off)  # type: ignore[assignment]
                    if p is None:
                        self.counters["tun_rx_bad_offload"] += 1
                        continue
            r = routes.get(p[off + 24 : off + 32])
            if r is None:
                r = self._route_for_tun(p, off, now)
                if r is None:
                    continue
            hop = p[off + 7]
            # inline form of common.wire.rules.outbound_ok (the call costs ~15 ns a packet)
            if hop < 2 or p[off + 8] & 0xFE != 4 or len(p) - off > MTU:
                self._tun_exception(p, off, hop, now)
                continue
            next_hop, encrypt, sess = r
            if sess is None:
                nonce = nonces[ni : ni + 12]
                ni += 12
            else:
                nonce = sess.nonce()
            ct = encrypt(nonce, l3 + p[off:], None)
            if next_hop is not last_hop:
                parts = out.get(next_hop)  # type: ignore[assignment]
                if parts is None:
                    parts = out[next_hop] = []
                last_hop = next_hop
            parts += (pack(1, 0, len(ct) + 12, hop - 1), p[off + 8 : off + 40], ct, nonce)
            sent += 1
        self.counters["tun_rx"] += len(pkts)
        self.counters["tx_sealed"] += sent

    def _from_tun_gso(self, p: bytes, now: float) -> None:
        """A GSO_TCPV6 super packet (gso.py): the checks and the route
        lookup once, then per segment only the AES-GCM call and the header
        bytes. Segments come out as plaintexts (inner header + IPv6), which
        the slow paths take like packets read with a 4-byte header."""
        off = self.off
        try:
            pts = split_tcp(p, off, L3_HEADER)
        except SegmentError:
            self.counters["tun_rx_bad_offload"] += 1
            return
        n = len(pts)
        self.counters["tun_rx_gso_segments"] += n
        self.counters["tun_rx"] -= 1  # counted per segment below
        r = self.routes.get(p[off + 24 : off + 32])
        hop = p[off + 7]
        if r is None or not can_forward(hop) or not is_overlay_packed(p, off + 8) or len(pts[0]) - 4 > MTU:
            for pt in pts:
                self.from_tun([pt], now, off=4)
            return
        next_hop, encrypt, sess = r
        parts = self.out.get(next_hop)
        if parts is None:
            parts = self.out[next_hop] = []
        pack = DATA8.pack
        addrs = p[off + 8 : off + 40]
        nonces = self.nonce_bytes(12 * n) if sess is None else b""
        ni = 0
        for pt in pts:
            if sess is None:
                nonce = nonces[ni : ni + 12]
                ni += 12
            else:
                nonce = sess.nonce()
            ct = encrypt(nonce, pt, None)
            parts += (pack(1, 0, len(ct) + 12, hop - 1), addrs, ct, nonce)
        self.counters["tun_rx"] += n
        self.counters["tx_sealed"] += n

    def _tun_exception(self, p: bytes, off: int, hop: int, now: float) -> None:
        failed = outbound_check(p, off, MTU)
        if failed == OUTBOUND_SOURCE_NOT_OVERLAY:
            self._host_icmp(p, off, DEST_UNREACHABLE, CODE_SOURCE_POLICY, now, from_node=True)
        elif failed == OUTBOUND_HOP_LIMIT:
            self._host_icmp(p, off, TIME_EXCEEDED, CODE_HOP_LIMIT, now)
        else:
            self._host_icmp(p, off, PACKET_TOO_BIG, 0, now, from_node=True, rest=MTU.to_bytes(4, "big"))

    def _route_for_tun(self, p: bytes, off: int, now: float) -> Sealer | None:
        """Slow path of ``from_tun`` on a route-cache miss; None when the
        packet was consumed (dropped, answered with ICMP or queued)."""
        dst = p[off + 24 : off + 40]
        if not is_overlay_packed(dst):
            self.counters["tun_rx_not_overlay"] += 1  # e.g. multicast the kernel sends on any interface
            return None
        if dst[:8] == self.own_prefix:
            self._host_icmp(p, off, DEST_UNREACHABLE, CODE_ADDRESS_UNREACHABLE, now, from_node=True)
            return None
        r = self._lookup_out(dst)
        if r is not None:
            return r
        if self.blocked_hit:
            self.counters["tx_session_blocked"] += 1
            return None
        hop = p[off + 7]
        if not outbound_ok(p, off, MTU):
            self._tun_exception(p, off, hop, now)
            return None
        self._queue_out(p[off + 8 : off + 24], dst, hop, l3_plaintext(p, off), now)
        return None

    def _lookup_out(self, dst: bytes) -> Sealer | None:
        self.blocked_hit = False
        route = self.fib.lookup(dst)
        if route is None or route.next_hop is None:
            return None
        sess = None if self.sessions is None else self.sessions.send_state(route.public_key, self.now)
        if sess is BLOCKED:
            self.blocked_hit = True
            return None
        try:
            encrypt = self.keys.get(route.public_key).aead.encrypt if sess is None else sess.aead.encrypt  # type: ignore[union-attr]
        except (DecryptError, ValueError):
            self.counters["tx_unusable_key"] += 1
            return None
        r: Sealer = (route.next_hop, encrypt, sess)  # type: ignore[assignment]
        if self.cacheable and len(self.routes) < ROUTE_CACHE_MAX:
            self.routes[dst[:8]] = r
        return r

    def _queue_out(self, src: bytes, dst: bytes, hop: int, plaintext: bytes, now: float) -> None:
        """Wait for a route (4.4 step 5 / 4.7); a full queue answers no-route."""
        queue = self.pending_out
        full_before = queue.drops["pending_full"]
        first = queue.push(dst[:8], (src, dst, hop, plaintext), now)
        if queue.drops["pending_full"] != full_before:
            self.counters["tx_pending_full"] += 1
            if plaintext[1] == INNER_L3:
                self._host_icmp(plaintext, 4, DEST_UNREACHABLE, CODE_NO_ROUTE, now)
            return
        self.counters["tx_queued_for_route"] += 1
        if first:
            self.need.add(dst)

    def seal_and_send(self, src: bytes, dst: bytes, hop: int, plaintext: bytes, now: float, queue: bool) -> bool:
        """A locally originated body (message, OOB ICMP, released packet)
        through the forwarding routine: decrement, look up, encrypt."""
        if not can_forward(hop):
            self.counters["tx_hop_limit"] += 1
            return False
        r = self._lookup_out(dst)
        if r is None and self.blocked_hit:
            self.counters["tx_session_blocked"] += 1
            return False
        if r is None:
            if queue:
                self._queue_out(src, dst, hop, plaintext, now)
            else:
                self.need.add(dst)
                self.counters["tx_no_route_dropped"] += 1
            return False
        next_hop, encrypt, sess = r
        nonce = self.nonce_bytes(12) if sess is None else sess.nonce()
        ct = encrypt(nonce, plaintext, None)
        parts = self.out.get(next_hop)
        if parts is None:
            parts = self.out[next_hop] = []
        parts += (DATA8.pack(1, 0, len(ct) + 12, hop - 1), src, dst, ct, nonce)
        self.counters["tx_sealed"] += 1
        return True

    def send_message(self, dst: bytes, plaintext: bytes, now: float) -> None:
        """A message packet from msgbus (plaintext with its inner header)."""
        if len(dst) != 16 or len(plaintext) < 4:
            self.counters["message_out_malformed"] += 1
            return
        if dst[:8] == self.own_prefix:  # to ourselves: straight back to msgbus
            self.messages.append((self.own_addr, dst, plaintext))
            return
        self.counters["message_out"] += 1
        self.seal_and_send(self.own_addr, dst, MESSAGE_HOP_LIMIT, plaintext, now, queue=True)

    def take_out(self) -> dict[str, bytes]:
        """Next hop -> its encoded packets back to back (joined once per batch:
        growing one buffer would copy each packet several times)."""
        engine = self.sessions
        if engine is not None and (engine.changed or engine.outbox):
            self.sync_sessions()
        out, self.out = self.out, {}
        return {hop: b"".join(parts) for hop, parts in out.items()}

    # --- ICMP --------------------------------------------------------------------

    def _host_icmp(
        self,
        p: bytes,
        off: int,
        icmp_type: int,
        code: int,
        now: float,
        from_node: bool = False,
        rest: bytes = bytes(4),
    ) -> None:
        """4.7: an ICMPv6 error about a packet read from the TUN, written back
        to the TUN (never on the wire)."""
        self.counters[f"icmp_local_{icmp_type}_{code}"] += 1
        if not self.tun or not self.host_icmp_rate.allow(now):
            return
        orig_src = bytes(p[off + 8 : off + 24])
        payload = bytes(p[off : off + ICMP_PAYLOAD_CAP])
        if from_node:
            pkt = build_icmpv6(self.own_addr, orig_src, 64, icmp_type, code, payload, rest)
        else:
            pkt = build_icmpv6(orig_src, orig_src, p[off + 7], icmp_type, code, payload, rest)
        self.gro.writes.append([VNET_PLAIN, pkt] if self.vnet else [pkt])

    def oob_icmp(self, frame: bytes, icmp_type: int, code: int, now: float) -> None:
        """4.6: peerd could not forward ``frame`` (an encoded data packet);
        tell its source, encrypted for it, with the original body inside."""
        if len(frame) < 40:
            self.counters["oob_request_malformed"] += 1
            return
        src, dst = bytes(frame[8:24]), bytes(frame[24:40])
        body = bytes(frame[40 : 40 + body_len(frame, 0)])
        if src[:8] == self.own_prefix or not is_overlay_packed(src):
            return
        if not self.oob_icmp_rate.allow(now):
            self.counters["oob_icmp_rate_limited"] += 1
            return
        self.counters[f"oob_icmp_sent_{icmp_type}_{code}"] += 1
        plaintext = oob_icmp_plaintext(self.own_net, src, dst, icmp_type, code, body)
        self.seal_and_send(self.own_net, src, OOB_HOP_LIMIT, plaintext, now, queue=False)

    def _oob_in(self, pt: bytes, src: bytes, dst: bytes, hop: int) -> None:
        """4.6 at the source: turn an OOB ICMP into a normal ICMPv6 error."""
        try:
            oob = parse_oob_icmp(pt[4:])
        except (CodecError, IndexError):
            self.counters["rx_oob_malformed"] += 1
            return
        route = self.fib.lookup(oob.original_dst)
        if route is None:
            self.counters["rx_oob_no_key"] += 1
            return
        try:
            original = self.keys.get(route.public_key).open(oob.payload)
        except (DecryptError, ValueError):
            sent = None if self.sessions is None else self.sessions.open_sent(route.public_key, oob.payload)
            if sent is None:
                self.counters["rx_oob_undecryptable"] += 1
                return
            original = sent  # our packet went out under a session key
        if len(original) < 44 or original[0] != INNER_VERSION or original[1] != INNER_L3:
            self.counters["rx_oob_not_l3"] += 1
            return
        self.counters[f"rx_oob_icmp_{oob.icmp_type}_{oob.code}"] += 1
        if not self.tun:
            return
        pkt = build_icmpv6(src, dst, hop, oob.icmp_type, oob.code, original[4:], oob.rest)
        self.gro.writes.append([VNET_PLAIN, pkt] if self.vnet else [pkt])

    # --- inbound: peers -> TUN -------------------------------------------------

    def from_peer(self, blob: bytes | memoryview, now: float) -> None:
        """Encoded data packets for this node, back to back, hop limit
        already decremented by peerd (4.5)."""
        if self.kernel is not None and (self.firewall is None or self.firewall.native is not None):
            self.kernel.from_peer(self, blob, now)
            if self.sessions is not None and self.sessions.changed:
                self.sync_sessions()
            return
        if not isinstance(blob, bytes):  # the reference keys dicts by slices of it
            blob = bytes(blob)
        self.now = now
        view = memoryview(blob)
        end = len(blob)
        pos = 0
        keys_in = self.keys_in
        gro_add = self.gro.add
        tun = self.tun
        counters = self.counters
        opened = 0
        by_index = self.by_index
        capable = self.capable
        seen, seen_order, seen_max = self.nonce_filter.seen, self.nonce_filter.order, self.nonce_filter.size
        filter_nonces = self.filter_nonces
        firewall = self.firewall
        while pos + 40 <= end:
            if blob[pos] != 1 or blob[pos + 1] != 0:
                counters["rx_malformed"] += 1
                break
            e = pos + 40 + (blob[pos + 5] << 8 | blob[pos + 6])
            if e > end:
                counters["rx_malformed"] += 1
                break
            spre = blob[pos + 8 : pos + 16]
            # -- sessions (docs/EXTENSIONS.md): a known index in the nonce -> its key and replay window
            rs = by_index.get(blob[e - 12 : e - 8]) if by_index and e - pos >= 40 + MIN_SEALED_SIZE else None
            if rs is not None and rs.prefix == spre:
                ctr = int.from_bytes(blob[e - 8 : e], "big")
                window = rs.window
                if ctr <= window.top and not window.fresh(ctr):
                    counters["replay"] += 1
                    pos = e
                    continue
                try:
                    pt = rs.aead.decrypt(blob[e - 12 : e], view[pos + 40 : e - 12], None)
                    window.mark(ctr)
                    rs.used = now
                    if not rs.confirmed:
                        self.sessions.confirm(rs, now)  # type: ignore[union-attr]
                except InvalidTag:
                    rs = None  # a random nonce that happens to start with an index: try the static key
            else:
                rs = None
            if rs is None:
                decrypt = keys_in.get(spre)
                if decrypt is None:
                    decrypt = self._key_for_src(blob[pos + 8 : pos + 24])
                    if decrypt is None:
                        self._queue_in(blob[pos:e], now)
                        pos = e
                        continue
                if e - pos < 40 + MIN_SEALED_SIZE:
                    counters["rx_decrypt_failed"] += 1
                    pos = e
                    continue
                nonce = blob[e - 12 : e]  # a bytes nonce is cheaper
                if filter_nonces and nonce in seen:
                    counters["replay"] += 1  # an exact replay of a recent static-key packet
                    pos = e
                    continue
                try:
                    pt = decrypt(nonce, view[pos + 40 : e - 12], None)
                except InvalidTag:
                    counters["rx_decrypt_failed"] += 1
                    if self.sessions is not None:
                        self._undecryptable(blob[pos + 8 : pos + 24], now)
                    pos = e
                    continue
                if filter_nonces:
                    seen.add(nonce)  # NonceFilter.add, inline (a random nonce is never already there)
                    seen_order.append(nonce)
                    if len(seen_order) > seen_max:
                        seen.discard(seen_order.popleft())
                if spre in capable and pt[1] != INNER_SESSION:
                    counters["rx_downgrade"] += 1  # static key from a peer that negotiated sessions
                    self._static_refused(blob[pos + 8 : pos + 24], now)
                    pos = e
                    continue
            opened += 1
            kind = pt[1]
            if pt[0] != INNER_VERSION:
                counters["rx_inner_malformed"] += 1
            elif kind == INNER_L3:
                if len(pt) < 44 or pt[4] >> 4 != 6:
                    counters["rx_inner_malformed"] += 1
                elif not pt.startswith(spre, 12) and not self._same_owner(pt[12:28], spre):
                    counters["rx_spoofed_source"] += 1
                elif firewall is not None and not firewall.allow(pt):
                    counters["rx_firewall_dropped"] += 1
                elif tun:
                    gro_add(pt, blob[pos + 7])
                else:
                    counters["rx_l3_no_tun"] += 1
            elif kind == INNER_MESSAGE:
                self.messages.append((blob[pos + 8 : pos + 24], blob[pos + 24 : pos + 40], pt))
            elif kind == INNER_OOB_ICMP:
                self._oob_in(pt, blob[pos + 8 : pos + 24], blob[pos + 24 : pos + 40], blob[pos + 7])
            elif kind == INNER_SESSION and self.sessions is not None:
                self._session_in(pt, blob[pos + 8 : pos + 24], rs, now)
            else:
                counters["rx_inner_malformed"] += 1  # what the reference does with an unknown type
            pos = e
        counters["rx_opened"] += opened
        if self.sessions is not None and self.sessions.changed:
            self.sync_sessions()

    # --- security extensions (docs/EXTENSIONS.md) -------------------------------------

    def _public_key_of(self, src_prefix: bytes) -> bytes | None:
        route = self.fib.lookup(src_prefix + bytes(8))
        return None if route is None else route.public_key

    def _session_in(self, pt: bytes, src: bytes, rs: RecvState | None, now: float) -> None:
        assert self.sessions is not None
        pk = rs.public_key if rs is not None else self._public_key_of(src[:8])
        if pk is None:
            return
        self.sessions.on_packet(bytes(src), pk, bytes(pt[4:]), rs, now)

    def _static_refused(self, src: bytes, now: float) -> None:
        pk = self._public_key_of(src[:8])
        if pk is not None and self.sessions is not None:
            self.sessions.static_refused(pk, now)

    def _undecryptable(self, src: bytes, now: float) -> None:
        pk = self._public_key_of(src[:8])
        if pk is not None and self.sessions is not None:
            self.sessions.undecryptable(pk, now)

    def sync_sessions(self) -> None:
        """Session changes: cached sealers go (a rotated key is used from the
        next packet on); negotiation packets are framed and routed."""
        engine = self.sessions
        if engine is None:
            return
        if engine.changed:
            engine.changed = False
            self.routes.clear()
            self.keys_in.clear()
        outbox, engine.outbox = engine.outbox, []
        for dst, body in outbox:
            route = self.fib.lookup(dst)
            if route is None or route.next_hop is None:
                self.counters["session_tx_no_route"] += 1
                self.need.add(dst)
                continue
            parts = self.out.get(route.next_hop)
            if parts is None:
                parts = self.out[route.next_hop] = []
            parts += (DATA8.pack(1, 0, len(body), MESSAGE_HOP_LIMIT - 1), self.own_addr, dst, body)
            self.counters["session_tx"] += 1

    def _key_for_src(self, src: bytes) -> Callable[..., bytes] | None:
        route = self.fib.lookup(src)  # any entry, selected or not, carries the key (4.5)
        if route is None:
            return None
        decrypt: Callable[..., bytes]
        try:
            decrypt = self.keys.get(route.public_key).aead.decrypt
        except (DecryptError, ValueError):
            self.counters["rx_unusable_key"] += 1
            decrypt = _never
        if self.cacheable and len(self.keys_in) < ROUTE_CACHE_MAX:
            self.keys_in[src[:8]] = decrypt
        return decrypt

    def _same_owner(self, inner_src: bytes, outer_src_prefix: bytes) -> bool:
        """Does the inner IPv6 source belong to the key that sealed the packet?"""
        a = self.fib.lookup(inner_src)
        b = self.fib.lookup(outer_src_prefix + bytes(8))
        return a is not None and b is not None and a.public_key == b.public_key

    def _queue_in(self, frame: bytes, now: float) -> None:
        src = frame[8:24]
        full_before = self.pending_in.drops["pending_full"]
        first = self.pending_in.push(src[:8], bytes(frame), now)
        if self.pending_in.drops["pending_full"] != full_before:
            self.counters["rx_pending_full"] += 1
            return
        self.counters["rx_queued_for_key"] += 1
        if first:
            self.need.add(bytes(src))

    # --- routes changing, time passing ---------------------------------------------

    def fib_changed(self, now: float) -> None:
        self.routes.clear()
        self.keys_in.clear()
        self.cacheable = all(plen <= 64 for _, plen, _ in self.fib.entries())
        for prefix in self.pending_out.subnets():
            route: Route | None = self.fib.lookup(prefix + bytes(8))
            if route is not None and route.next_hop is not None:
                for src, dst, hop, plaintext in self.pending_out.pop(prefix):
                    self.seal_and_send(src, dst, hop, plaintext, now, queue=False)
        for prefix in self.pending_in.subnets():
            if self.fib.lookup(prefix + bytes(8)) is not None:
                for frame in self.pending_in.pop(prefix):
                    self.from_peer(frame, now)

    def tick(self, now: float) -> None:
        self.now = now
        if self.sessions is not None:
            self.sessions.tick(now)
            self.sync_sessions()
        for _src, _dst, _hop, plaintext in self.pending_out.expire(now):
            if plaintext[1] == INNER_L3:
                self._host_icmp(plaintext, 4, DEST_UNREACHABLE, CODE_NO_ROUTE, now)
        self.pending_in.expire(now)
        if now >= self.next_refresh:
            # routes in use: ask again, the router refreshes those about to expire (4.4)
            self.need.update(prefix + bytes(8) for prefix in self.routes)
            self.routes.clear()
            self.keys_in.clear()
            self.next_refresh = now + REFRESH_INTERVAL

    def gauges(self) -> dict[str, Any]:
        return {
            "pending_out": len(self.pending_out),
            "pending_in": len(self.pending_in),
            "route_cache": len(self.routes),
            "keys": len(self.keys),
            "sessions": len(self.by_index),
            "session_peers_capable": len(self.capable),
            "nonce_filter": len(self.nonce_filter),
            "session_handshake_ms": (
                round(self.sessions.handshake_times[-1] * 1000, 2)
                if self.sessions is not None and self.sessions.handshake_times
                else None
            ),
        }

    def all_counters(self) -> Counter[str]:
        c = Counter(self.counters)
        if self.sessions is not None:
            c.update(self.sessions.counters)
        c["tun_tx_merged_segments"] = self.gro.merged
        for k, v in self.pending_out.drops.items():
            c[f"tx_{k}"] += v
        for k, v in self.pending_in.drops.items():
            c[f"rx_{k}"] += v
        return c


def l3_plaintext(p: bytes, off: int) -> bytes:
    return L3_HEADER + memoryview(p)[off:]


def _never(nonce: Any, data: Any, aad: Any) -> bytes:
    raise InvalidTag
