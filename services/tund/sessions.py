"""Session keys between two of our nodes (docs/EXTENSIONS.md 2-5), sans-IO.

The engine negotiates ephemeral X25519 session keys end to end with any
destination it sends data to, rotates them, and tells the data plane
which AES-GCM state and nonce scheme to use per packet:

- ``send_state(peer)``: the confirmed session to seal with, ``None`` for
  the static key (a reference node, or a peer not yet negotiated) or
  ``BLOCKED`` (the peer has shown support, but no usable session is left:
  the data plane drops and counts, never falls back to the static key);
- ``by_index``: receive states by the 4-byte index at the start of a
  session nonce; each carries its replay window;
- ``capable``: /64 prefixes of peers that completed a handshake since this
  node started; static-key data from them is refused (downgrade).

Events in: ``on_packet`` (a decrypted INNER_SESSION payload),
``confirm`` (first packet opened under a responder's session),
``undecryptable`` (a peer's packet opened with no key we hold: it may have
restarted), ``tick``. Actions out: ``outbox`` (destination address,
sealed body) for the data plane to frame and route; ``changed`` (drop
cached keys); ``log`` (lines worth a warning).

Keys are erased as far as Python allows: the HKDF output is written into
a bytearray that is zeroed once the AES-GCM objects hold it; the
ephemeral private keys and AES-GCM objects (OpenSSL contexts, cleansed on
free) lose their last reference when a session ends. The X25519 output
(``exchange`` returns immutable bytes) cannot be zeroed.
"""

from __future__ import annotations

import os
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.crypto import DecryptError, SessionKey, shared_secret
from common.identity import Identity, address_of
from common.replay import new_window
from common.wire.errors import CodecError
from common.wire.session import Confirm, Init, Resp, decode_session

KDF_LABEL = b"pymycelium session v1"
MAX_PEERS = 4096
SESSIONS_PER_PEER = 3  # current, the one it replaced (packets in flight), one being set up
INIT_RETRY = 1.0  # first retransmission of an unanswered INIT; doubles ...
INIT_RETRY_MAX = 8.0  # ... up to this while the peer has shown support
PROBE_TRIES = 3  # INITs to a peer that never answered before backing off
PROBE_BACKOFF = 30.0  # then one probe this often, doubling ...
PROBE_BACKOFF_MAX = 600.0  # ... up to this (a reference node drops each harmlessly)
RESTART_HINT_INTERVAL = 1.0  # an undecryptable packet triggers at most one INIT this often


class _Blocked:
    def __repr__(self) -> str:
        return "BLOCKED"


BLOCKED: Final = _Blocked()


@dataclass
class SessionConfig:
    enabled: bool = True
    rekey_after: float = 120.0  # seconds of a session's life before a new one is negotiated
    rekey_packets: int = 1 << 30  # ... or packets sent under it
    keep_old: float = 10.0  # a replaced session still opens packets in flight this long

    @property
    def reject_after(self) -> float:
        """Past this age a session no longer seals: if rotation keeps failing, traffic stops (visibly)."""
        return 3 * self.rekey_after + min(30.0, 2 * self.rekey_after)


class SendState:
    """Our sending half of a session: AES-GCM state and counter nonces."""

    __slots__ = ("aead", "ctr", "remote_index")

    def __init__(self, aead: AESGCM, remote_index: bytes) -> None:
        self.aead = aead
        self.remote_index = remote_index
        self.ctr = 0

    def nonce(self) -> bytes:
        c = self.ctr
        self.ctr = c + 1
        return self.remote_index + c.to_bytes(8, "big")


class RecvState:
    """Our receiving half: AES-GCM state, index and replay window."""

    __slots__ = ("aead", "confirmed", "index", "prefix", "public_key", "session", "used", "window")

    def __init__(self, aead: AESGCM, index: bytes, public_key: bytes, session: Session, native: bool = True) -> None:
        self.aead = aead
        self.index = index
        self.public_key = public_key
        self.prefix = address_of(public_key).packed[:8]  # packets under this index must come from this /64
        self.window = new_window(native)
        self.confirmed = session.initiator  # a responder's session is confirmed by its first packet
        self.session = session
        self.used = session.created  # last packet opened under it (the data plane sets it)


class Session:
    __slots__ = ("created", "initiator", "recv", "replaced", "send")

    def __init__(self, initiator: bool, created: float) -> None:
        self.initiator = initiator
        self.created = created
        self.replaced = 0.0  # when a newer session took over sending (0: not yet)
        self.send: SendState
        self.recv: RecvState


class _Pending:
    __slots__ = ("ephemeral", "init", "next_try", "sent_at", "tries")

    def __init__(self, init: Init, ephemeral: X25519PrivateKey, now: float) -> None:
        self.init = init
        self.ephemeral = ephemeral
        self.sent_at = now
        self.next_try = now + INIT_RETRY
        self.tries = 1


class Peer:
    __slots__ = (
        "address", "blocked", "capable", "current", "last_hint", "last_init_ts", "next_probe", "pending",
        "probe_backoff", "public_key", "sessions",
    )  # fmt: skip

    def __init__(self, public_key: bytes) -> None:
        self.public_key = public_key
        self.address = address_of(public_key).packed
        self.capable = False
        self.current: Session | None = None
        self.sessions: list[Session] = []  # newest first
        self.pending: _Pending | None = None
        self.last_init_ts = 0
        self.next_probe = 0.0
        self.probe_backoff = PROBE_BACKOFF
        self.last_hint = -RESTART_HINT_INTERVAL
        self.blocked = False


class SessionEngine:
    def __init__(
        self,
        identity: Identity,
        static_key: Callable[[bytes], SessionKey],
        config: SessionConfig | None = None,
        wall_ns: Callable[[], int] = time.time_ns,
        native: bool = True,
    ) -> None:
        self.identity = identity
        # the C kernel's AES-GCM contexts and replay windows where it is built (False: the references)
        self.native = native
        self.own_addr = identity.address.packed
        self.static_key = static_key  # the KeyCache's get: AES-GCM with the static shared secret
        self.config = config or SessionConfig()
        self.wall_ns = wall_ns
        self.peers: OrderedDict[bytes, Peer] = OrderedDict()
        self.by_index: dict[bytes, RecvState] = {}
        self.capable: set[bytes] = set()
        self.outbox: list[tuple[bytes, bytes]] = []
        self.changed = False
        self.log: list[str] = []
        self.counters: Counter[str] = Counter()
        self.handshake_times: list[float] = []  # seconds from INIT sent to RESP taken (last few)
        self._last_ts = 0

    # --- what the data plane asks ---------------------------------------------

    def send_state(self, public_key: bytes, now: float) -> SendState | _Blocked | None:
        """How to seal the next packet to this peer (also starts a handshake
        when one is due)."""
        if not self.config.enabled:
            return None
        peer = self._peer(public_key)
        s = peer.current
        if s is not None and now - s.created < self.config.reject_after:
            self._maybe_rekey(peer, s, now)
            return s.send
        if peer.pending is None and now >= peer.next_probe:
            self._start(peer, now)
        if not peer.capable:
            return None
        if not peer.blocked:
            peer.blocked = True
            self.log.append(
                f"no session key with {address_of(public_key)} (it negotiated before; negotiation is not "
                "answered): traffic to it is blocked, never sent with the static key"
            )
        self.counters["session_blocked"] += 1
        return BLOCKED

    def undecryptable(self, public_key: bytes, now: float) -> None:
        """A packet from this peer opened with no key we have: after a restart
        of either side, a fresh INIT replaces what was lost."""
        if not self.config.enabled:
            return
        peer = self._peer(public_key)
        if now - peer.last_hint < RESTART_HINT_INTERVAL or peer.pending is not None:
            return
        peer.last_hint = now
        self.counters["session_restart_hint"] += 1
        self._start(peer, now)

    def static_refused(self, public_key: bytes, now: float) -> None:
        """We refused static-key data from a peer that negotiated: it lost its
        session (restart) or never saw our CONFIRM. Confirm again, or start
        anew (at most once a second)."""
        peer = self.peers.get(public_key)
        if peer is None or now - peer.last_hint < RESTART_HINT_INTERVAL or peer.pending is not None:
            return
        peer.last_hint = now
        self.counters["session_refused_hint"] += 1
        s = peer.current
        if s is not None and s.initiator and now - s.created < self.config.reject_after:
            nonce = s.send.nonce()
            confirm = Confirm(s.recv.index).encode()
            self.outbox.append((peer.address, s.send.aead.encrypt(nonce, confirm, None) + nonce))
        else:
            self._start(peer, now)

    def open_sent(self, public_key: bytes, body: bytes) -> bytes | None:
        """Open a body we sealed to this peer under a session (an OOB ICMP
        hands our own packet back, 4.6); None if no session matches."""
        peer = self.peers.get(public_key)
        if peer is None or len(body) < 32:
            return None
        idx = body[-12:-8]
        for s in peer.sessions:
            if s.send.remote_index == idx:
                try:
                    return s.send.aead.decrypt(body[-12:], body[:-12], None)
                except Exception:
                    return None
        return None

    # --- events -----------------------------------------------------------------

    def on_packet(self, src: bytes, public_key: bytes, payload: bytes, via: RecvState | None, now: float) -> None:
        """A decrypted session packet (after its inner header) from ``src``,
        whose key is ``public_key``; ``via``: the session it came under
        (None: the static key)."""
        if not self.config.enabled:
            self.counters["session_disabled_dropped"] += 1
            return
        try:
            pkt = decode_session(payload)
        except CodecError:
            self.counters["session_malformed"] += 1
            return
        peer = self._peer(public_key)
        if isinstance(pkt, Init) and via is None:
            self._on_init(peer, src, pkt, now)
        elif isinstance(pkt, Resp) and via is None:
            self._on_resp(peer, src, pkt, now)
        elif isinstance(pkt, Confirm) and via is not None:
            if not via.confirmed:
                self.confirm(via, now)
        else:
            self.counters["session_wrong_key"] += 1

    def confirm(self, rs: RecvState, now: float) -> None:
        """The first packet under a responder's session: the initiator holds
        the keys, so this side may now seal with it too."""
        rs.confirmed = True
        peer = self.peers.get(rs.public_key)
        if peer is None:
            return
        self._take_over(peer, rs.session, now)
        self.counters["session_confirmed"] += 1

    def tick(self, now: float) -> None:
        """Retransmit or give up INITs, rotate, expire and erase old sessions."""
        if not self.config.enabled:
            return
        for peer in list(self.peers.values()):
            p = peer.pending
            if p is not None and now >= p.next_try:
                if not peer.capable and p.tries >= PROBE_TRIES:
                    peer.pending = None  # a reference node, or nobody answers: probe again later
                    peer.next_probe = now + peer.probe_backoff
                    peer.probe_backoff = min(PROBE_BACKOFF_MAX, peer.probe_backoff * 2)
                    self.counters["session_probe_unanswered"] += 1
                else:  # a fresh INIT (a responder refuses a timestamp it has taken: its RESP may be what was lost)
                    tries = p.tries + 1
                    self._start(peer, now)
                    if peer.pending is not None:
                        peer.pending.tries = tries
                        peer.pending.next_try = now + min(INIT_RETRY_MAX, INIT_RETRY * 2 ** (tries - 1))
                    self.counters["session_init_retry"] += 1
            if peer.current is not None:
                self._maybe_rekey(peer, peer.current, now)
            self._expire(peer, now)

    # --- handshake ----------------------------------------------------------------

    def _start(self, peer: Peer, now: float) -> None:
        try:
            static = self.static_key(peer.public_key)
        except (DecryptError, ValueError):
            self.counters["session_unusable_key"] += 1
            peer.next_probe = now + PROBE_BACKOFF_MAX
            return
        eph = X25519PrivateKey.generate()
        init = Init(
            self._new_index(), self._timestamp(), eph.public_key().public_bytes_raw(), self.own_addr, peer.address,
            os.urandom(8),
        )  # fmt: skip
        peer.pending = _Pending(init, eph, now)
        self.outbox.append((peer.address, static.seal(init.encode())))
        self.counters["session_init_sent"] += 1

    def _on_init(self, peer: Peer, src: bytes, init: Init, now: float) -> None:
        if init.initiator != src or init.initiator != peer.address or init.responder != self.own_addr:
            self.counters["session_misaddressed"] += 1
            return
        if init.timestamp <= peer.last_init_ts:
            self.counters["session_init_stale"] += 1  # a replayed INIT (or one overtaken by a newer)
            return
        peer.last_init_ts = init.timestamp
        eph = X25519PrivateKey.generate()
        try:
            dh = eph.exchange(X25519PublicKey.from_public_bytes(init.ephemeral))
            static = self.static_key(peer.public_key)
            salt = shared_secret(self.identity.private_key, peer.public_key)
        except (ValueError, DecryptError):
            self.counters["session_bad_ephemeral"] += 1
            return
        resp = Resp(
            self._new_index(), init.index, init.timestamp, eph.public_key().public_bytes_raw(), init.initiator,
            init.responder, init.nonce,
        )  # fmt: skip
        i2r, r2i = _derive(dh, salt, init, resp, self.native)
        s = Session(initiator=False, created=now)
        s.send = SendState(r2i, init.index)
        s.recv = RecvState(i2r, resp.index, peer.public_key, s, self.native)
        # only one unconfirmed responder session per peer (a replayed INIT after our restart costs one slot)
        for old in [o for o in peer.sessions if not o.recv.confirmed]:
            self._drop(peer, old)
        self._add(peer, s)
        self.outbox.append((peer.address, static.seal(resp.encode())))
        self.counters["session_resp_sent"] += 1

    def _on_resp(self, peer: Peer, src: bytes, resp: Resp, now: float) -> None:
        p = peer.pending
        if (
            p is None
            or resp.initiator_index != p.init.index
            or resp.nonce != p.init.nonce
            or resp.timestamp != p.init.timestamp
            or resp.initiator != self.own_addr
            or resp.responder != src
            or src != peer.address
        ):
            self.counters["session_resp_unexpected"] += 1
            return
        try:
            dh = p.ephemeral.exchange(X25519PublicKey.from_public_bytes(resp.ephemeral))
            salt = shared_secret(self.identity.private_key, peer.public_key)
        except (ValueError, DecryptError):
            self.counters["session_bad_ephemeral"] += 1
            return
        i2r, r2i = _derive(dh, salt, p.init, resp, self.native)
        s = Session(initiator=True, created=now)
        s.send = SendState(i2r, resp.index)
        s.recv = RecvState(r2i, p.init.index, peer.public_key, s, self.native)
        self.handshake_times = [*self.handshake_times[-19:], now - p.sent_at]
        peer.pending = None  # the ephemeral secret goes with it
        self._add(peer, s)
        self._take_over(peer, s, now)
        confirm = Confirm(p.init.index).encode()
        nonce = s.send.nonce()
        self.outbox.append((peer.address, s.send.aead.encrypt(nonce, confirm, None) + nonce))
        self.counters["session_established"] += 1

    # --- bookkeeping ---------------------------------------------------------------

    def _take_over(self, peer: Peer, s: Session, now: float) -> None:
        old = peer.current
        if old is s:
            return
        if old is not None:
            old.replaced = now
        peer.current = s
        peer.probe_backoff = PROBE_BACKOFF
        if peer.blocked:
            peer.blocked = False
            self.log.append(f"session keys with {address_of(peer.public_key)} again: traffic resumes")
        if not peer.capable:
            peer.capable = True
            self.capable.add(peer.address[:8])
            self.log.append(f"session keys with {address_of(peer.public_key)}")
        self.changed = True

    def _maybe_rekey(self, peer: Peer, s: Session, now: float) -> None:
        if peer.pending is not None:
            return
        age = now - s.created
        due = self.config.rekey_after if s.initiator else self.config.rekey_after * 1.25  # one side goes first
        if age >= due or s.send.ctr >= self.config.rekey_packets:
            self.counters["session_rekey"] += 1
            self._start(peer, now)

    def _add(self, peer: Peer, s: Session) -> None:
        peer.sessions.insert(0, s)
        self.by_index[s.recv.index] = s.recv
        while len(peer.sessions) > SESSIONS_PER_PEER:
            self._drop(peer, peer.sessions[-1])

    def _drop(self, peer: Peer, s: Session) -> None:
        """Forget a session; its keys lose their last reference here."""
        if s in peer.sessions:
            peer.sessions.remove(s)
        self.by_index.pop(s.recv.index, None)
        if peer.current is s:
            peer.current = None
        s.send.aead = s.recv.aead = None  # type: ignore[assignment]
        self.changed = True
        self.counters["session_erased"] += 1

    def _expire(self, peer: Peer, now: float) -> None:
        keep_old, reject = self.config.keep_old, self.config.reject_after
        for s in list(peer.sessions):
            # a replaced session goes once the peer stopped using it too (crossed handshakes: each
            # side may seal with a different one), and any session once it is too old to seal
            if (s.replaced and now - max(s.replaced, s.recv.used) > keep_old) or now - s.created > reject + keep_old:
                self._drop(peer, s)
        if peer.current is not None and now - peer.current.created >= reject:
            self.changed = True  # send_state answers BLOCKED (or static for a peer never capable) from now

    def _peer(self, public_key: bytes) -> Peer:
        peer = self.peers.get(public_key)
        if peer is None:
            peer = self.peers[public_key] = Peer(public_key)
            if len(self.peers) > MAX_PEERS:
                self._evict()
        else:
            self.peers.move_to_end(public_key)
        return peer

    def _evict(self) -> None:
        """The least recently used peer goes; one that showed support is kept
        while a never-capable one can go instead (downgrade resistance)."""
        victim = next((pk for pk, p in self.peers.items() if not p.capable), next(iter(self.peers)))
        peer = self.peers.pop(victim)
        for s in list(peer.sessions):
            self._drop(peer, s)
        if peer.capable:
            self.capable.discard(peer.address[:8])

    def _new_index(self) -> bytes:
        while True:
            idx = os.urandom(4)
            if idx not in self.by_index:
                return idx

    def _timestamp(self) -> int:
        ts = max(self.wall_ns(), self._last_ts + 1)  # strictly increasing even if the clock steps back
        self._last_ts = ts
        return ts

    def snapshot(self, now: float) -> list[dict[str, object]]:
        """For the API: one entry per peer we negotiated (or tried) with."""
        out: list[dict[str, object]] = []
        for peer in self.peers.values():
            cur = peer.current
            usable = cur is not None and now - cur.created < self.config.reject_after
            out.append(
                {
                    "address": str(address_of(peer.public_key)),
                    "publicKey": peer.public_key.hex(),
                    "capable": peer.capable,
                    "state": "session" if usable else "blocked" if peer.capable else "static",
                    "sessions": len(peer.sessions),
                    "currentAge": None if cur is None else round(now - cur.created, 1),
                    "sent": None if cur is None else cur.send.ctr,
                    "negotiating": peer.pending is not None,
                }
            )
        return out


def _derive(dh: bytes, salt: bytes, init: Init, resp: Resp, native: bool = True) -> tuple[AESGCM, AESGCM]:
    """Two AES-256-GCM states (initiator->responder, responder->initiator)
    from the ephemeral exchange, salted with the static shared secret (only
    the two key holders can derive them) and bound to the whole handshake;
    the kernel's ``Aead`` where built (``SessionKey``), as for static keys."""
    buf = bytearray(64)
    info = KDF_LABEL + init.encode() + resp.encode()
    try:
        HKDF(hashes.SHA256(), 64, salt, info).derive_into(dh, buf)
        with memoryview(buf) as view:
            return SessionKey(view[:32], native).aead, SessionKey(view[32:], native).aead  # type: ignore[arg-type]
    finally:
        buf[:] = bytes(64)
