"""The native data-plane kernel (common/_kernel.c) against the pure-Python
reference: the same batches into two DataPlanes, one with the kernel and
one without, must give the same bytes out and the same counted drops.
Nonces come from a counter (``nonce_bytes``) so the ciphertexts compare.

Also run under AddressSanitizer by ``make asan``."""

from __future__ import annotations

import os
import struct
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import native
from common.crypto import SessionKey, shared_secret
from common.fib import FibReplica
from common.identity import Identity
from common.wire.inner import INNER_MESSAGE, INNER_OOB_ICMP, L3_HEADER
from services.tund import gro as pygro
from services.tund import gso
from services.tund.dataplane import DataPlane, KeyCache
from services.tund.tun import VNET_HDR_SIZE

K: Any = native.kernel
pytestmark = pytest.mark.skipif(K is None, reason=f"native kernel not in use: {native.REASON}")
NOW = 1000.0
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ME, PEER, OTHER, STRANGER = (Identity.from_secret(bytes([i]) * 32) for i in (1, 2, 3, 4))


class Counting:
    """A deterministic nonce scheme: 8-byte counter after a 4-byte prefix."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, nbytes: int) -> bytes:
        out = b"".join(b"\x00\x00\x00\x07" + (self.n + i).to_bytes(8, "big") for i in range(nbytes // 12))
        self.n += nbytes // 12
        return out


def fib() -> FibReplica:
    f = FibReplica()
    entries = [[i.address.packed[:8] + bytes(8), 64, hop, i.public_key] for i, hop in ((PEER, "p"), (OTHER, "o"))]
    f.load_snapshot({"epoch": 1, "seq": 0, "entries": entries})
    return f


def plane(me: Identity, use_native: bool, vnet: bool = True, tun: bool = True) -> DataPlane:
    dp = DataPlane(
        me, fib(), KeyCache(me.private_key, native=use_native), tun=tun, vnet=vnet, kernel=K if use_native else None
    )
    dp.nonce_bytes = Counting()
    return dp


def outcome(dp: DataPlane) -> dict[str, Any]:
    writes = [b"".join(bytes(b) for b in w) for w in dp.gro.flush()]
    counters = Counter({k: v for k, v in dp.all_counters().items() if v})
    return {
        "out": dp.take_out(),
        "writes": writes,
        "counters": counters,
        "messages": dp.messages,
        "need": dp.need,
        "pending_out": len(dp.pending_out),
        "pending_in": len(dp.pending_in),
    }


def both(vnet: bool = True, tun: bool = True) -> tuple[DataPlane, DataPlane]:
    return plane(ME, False, vnet, tun), plane(ME, True, vnet, tun)


# --- packets ---------------------------------------------------------------------

addr_choice = st.sampled_from(["me", "peer", "other", "stranger", "own_net", "multicast", "public"])


def address(kind: str, host: bytes) -> bytes:
    if kind == "me":
        return ME.address.packed
    if kind == "own_net":
        return ME.address.packed[:8] + host
    if kind == "multicast":
        return b"\xff\x02" + bytes(13) + b"\x01"
    if kind == "public":
        return b"\x20\x01" + bytes(6) + host
    ident = {"peer": PEER, "other": OTHER, "stranger": STRANGER}[kind]
    return ident.address.packed[:8] + host if host[0] & 1 else ident.address.packed


@st.composite
def tcp_packet(draw: st.DrawFn, payload_max: int = 1400) -> tuple[bytes, int]:
    """An IPv6/TCP packet (no checksum) and its TCP header length."""
    src = address(draw(st.sampled_from(["me", "me", "public"])), bytes(8))
    dst = address(draw(addr_choice), bytes(7) + b"\x01")
    hop = draw(st.sampled_from([0, 1, 2, 64, 255]))
    opts = draw(st.sampled_from([b"", b"\x01\x01\x08\x0a" + bytes(8), bytes(40)]))
    payload = draw(st.binary(max_size=payload_max))
    flags = draw(st.sampled_from([0x10, 0x18, 0x11, 0x90, 0x02, 0x12, 0x19, 0x99]))
    seq = draw(st.integers(0, 0xFFFFFFFF))
    thl = 20 + len(opts)
    tcp = struct.pack("!HHIIBBHHH", 5000, 443, seq, 77, (thl // 4) << 4, flags, 512, 0, 0) + opts
    ip = struct.pack("!IHBB", 0x60000000, thl + len(payload), 6, hop) + src + dst
    return ip + tcp + payload, thl


@st.composite
def tun_read(draw: st.DrawFn) -> bytes:
    """What one TUN read may hand tund: plain packets, NEEDS_CSUM packets,
    TSO super packets (sane and garbage), and junk."""
    kind = draw(st.sampled_from(["plain", "csum", "gso", "gso", "junk", "big"]))
    if kind == "junk":
        return draw(st.binary(max_size=80))
    pkt, thl = draw(tcp_packet(payload_max=6000 if kind == "gso" else 1300))
    if kind == "big":
        pkt = pkt[:4] + struct.pack("!H", len(pkt) - 40 + 200) + pkt[6:] + bytes(200)
    if kind == "plain" or kind == "big":
        return bytes(VNET_HDR_SIZE) + pkt
    if kind == "csum":
        start = draw(st.sampled_from([40, 40, 0, 41, 2000]))
        offset = draw(st.sampled_from([16, 16, 6, 5000]))
        return struct.pack("=BBHHHH", 1, 0, 0, 0, start, offset) + pkt
    gso_type = draw(st.sampled_from([4, 4, 0x84, 3, 1]))
    mss = draw(st.sampled_from([1, 7, 536, 1000, 1328, 1348, 1350, 0]))
    start = draw(st.sampled_from([40, 40, 40, 20]))
    head = struct.pack("=BBHHHH", 1, gso_type, 40 + thl, mss, start, 16)
    cut = draw(st.sampled_from([None, None, None, 45, 61, 70]))
    return (head + pkt)[:cut] if cut else head + pkt


@SETTINGS
@given(st.lists(tun_read(), min_size=1, max_size=12), st.booleans())
def test_from_tun_native_equals_reference(reads: list[bytes], vnet: bool) -> None:
    py, c = both(vnet=vnet)
    if not vnet:
        reads = [r[VNET_HDR_SIZE:] for r in reads]
    py.from_tun(list(reads), NOW)
    c.from_tun(list(reads), NOW)
    assert outcome(c) == outcome(py)


@pytest.mark.parametrize("use_native", [False, True])
def test_default_nonces_are_random_and_open_at_the_peer(use_native: bool) -> None:
    """With the default scheme (os.urandom; the kernel draws the same kind
    of bytes with getrandom, once per batch and only when a packet needs
    one) every frame of a batch has its own nonce, plain packets and a TSO
    super packet's segments alike, and the peer opens each one."""
    dp = DataPlane(
        ME, fib(), KeyCache(ME.private_key, native=use_native), tun=True, vnet=True, kernel=K if use_native else None
    )
    assert dp.nonce_bytes is os.urandom
    pkts = [bytes(VNET_HDR_SIZE) + tcp_to(PEER, bytes([i]) * 100) for i in range(20)]
    seg = tcp_to(PEER, bytes(3000))
    pkts.append(struct.pack("=BBHHHH", 1, 4, 60, 1000, 40, 16) + seg)
    dp.from_tun(pkts, NOW)
    blob = dp.take_out()["p"]
    nonces = []
    pos = 0
    while pos < len(blob):
        end = pos + 40 + struct.unpack_from("!H", blob, pos + 5)[0]
        nonces.append(blob[end - 12 : end])
        pos = end
    assert pos == len(blob) and len(nonces) == 23
    assert len(set(nonces)) == len(nonces)
    back = FibReplica()
    back.load_snapshot({"epoch": 1, "seq": 0, "entries": [[ME.address.packed[:8] + bytes(8), 64, "m", ME.public_key]]})
    peer = DataPlane(PEER, back, KeyCache(PEER.private_key, native=False), tun=True, vnet=False, kernel=None)
    peer.from_peer(blob, NOW)
    opened = b"".join(b"".join(bytes(b) for b in w) for w in peer.gro.flush())
    assert peer.counters == Counter(rx_opened=23)
    for p in pkts[:20]:  # as sent, the hop limit one less
        ip = p[VNET_HDR_SIZE:]
        assert ip[:7] + bytes([ip[7] - 1]) + ip[8:] in opened


def tcp_to(dst: Identity, payload: bytes) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 5000, 443, 1, 77, 5 << 4, 0x18, 512, 0, 0)
    return (
        struct.pack("!IHBB", 0x60000000, 20 + len(payload), 6, 64)
        + ME.address.packed
        + dst.address.packed
        + tcp
        + payload
    )


@SETTINGS
@given(st.lists(tun_read(), min_size=1, max_size=6))
def test_from_tun_offset_4_plaintexts(reads: list[bytes]) -> None:
    """Plaintexts (inner header + IPv6), as the GSO fallback feeds back."""
    py, c = both()
    pts = [L3_HEADER + r[VNET_HDR_SIZE:] for r in reads]
    py.from_tun(list(pts), NOW, off=4)
    c.from_tun(list(pts), NOW, off=4)
    assert outcome(c) == outcome(py)


@SETTINGS
@given(tcp_packet(payload_max=9000), st.sampled_from([1, 3, 100, 536, 1328, 1400]), st.booleans())
def test_split_tcp_native_equals_gso(pkt_thl: tuple[bytes, int], mss: int, ecn: bool) -> None:
    pkt, thl = pkt_thl
    sp = bytes(VNET_HDR_SIZE) + pkt
    sp = struct.pack("=BBHHHH", 1, 0x84 if ecn else 4, 40 + thl, mss, 40, 16) + sp[VNET_HDR_SIZE:]
    try:
        want: list[bytes] | type = [bytes(x) for x in gso.split_tcp(sp, VNET_HDR_SIZE, L3_HEADER)]
    except gso.SegmentError:
        want = gso.SegmentError
    try:
        got: list[bytes] | type = K.split_tcp(sp, VNET_HDR_SIZE)
    except gso.SegmentError:
        got = gso.SegmentError
    assert got == want


# --- the inbound direction ---------------------------------------------------------

KEY_PEER = SessionKey(shared_secret(PEER.private_key, ME.public_key), native=False)
KEY_WRONG = SessionKey(shared_secret(STRANGER.private_key, OTHER.public_key), native=False)


def frame(src: bytes, dst: bytes, hop: int, body: bytes) -> bytes:
    return struct.pack("!BBxxxHB", 1, 0, len(body), hop) + src + dst + body


@st.composite
def segments(draw: st.DrawFn) -> list[bytes]:
    """Consecutive TCP segments of one flow from PEER, as GRO sees them,
    with the odd change (short one, PSH, gap, other flags)."""
    n = draw(st.integers(1, 8))
    size = draw(st.sampled_from([1, 100, 1328]))
    seq = draw(st.integers(0, 0xFFFFFFFF))
    port = draw(st.sampled_from([1, 2]))
    out = []
    for _ in range(n):
        sz = draw(st.sampled_from([size, size, size, size // 2 or 1, 0]))
        flags = draw(st.sampled_from([0x10, 0x10, 0x10, 0x18, 0x11, 0x12]))
        seq += draw(st.sampled_from([0, 0, 0, 0, 7]))
        tcp = struct.pack("!HHIIBBHHH", port, 80, seq & 0xFFFFFFFF, 5, 5 << 4, flags, 100, 0xABCD, 0)
        src, dst = PEER.address.packed, ME.address.packed
        out.append(L3_HEADER + struct.pack("!IHBB", 0x60000000, 20 + sz, 6, 60) + src + dst + tcp + bytes(sz))
        seq += sz
    return out


FRAME_KINDS = (
    *("flow", "flow", "flow", "udp", "wrong_key", "short", "short_body", "garbage", "message", "inner_bad"),
    *("spoofed", "same_owner_net", "unknown_src", "oob", "bad_version", "past_end", "not_v6"),
)


@st.composite
def peer_frames(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(FRAME_KINDS))
    src, dst, hop = PEER.address.packed, ME.address.packed, draw(st.sampled_from([1, 63]))
    nonce = draw(st.binary(min_size=12, max_size=12))
    if kind == "flow":
        return b"".join(frame(src, dst, hop, KEY_PEER.seal(pt, nonce)) for pt in draw(segments()))
    if kind == "garbage":
        return draw(st.binary(max_size=100))
    if kind == "bad_version":
        return b"\x02" + frame(src, dst, hop, bytes(40))[1:]
    if kind == "past_end":
        return frame(src, dst, hop, bytes(40))[:-5]
    if kind == "short":
        return frame(src, dst, hop, draw(st.binary(max_size=31)))
    if kind == "short_body":  # shorter than the tag
        return frame(src, dst, hop, draw(st.binary(max_size=15)))
    if kind == "unknown_src":
        return frame(STRANGER.address.packed, dst, hop, KEY_PEER.seal(L3_HEADER + bytes(60), nonce))
    if kind == "wrong_key":
        return frame(src, dst, hop, KEY_WRONG.seal(L3_HEADER + bytes(60), nonce))
    if kind == "message":
        return frame(src, dst, hop, KEY_PEER.seal(bytes((1, INNER_MESSAGE, 0, 0)) + b"hello", nonce))
    if kind == "oob":
        return frame(src, dst, hop, KEY_PEER.seal(bytes((1, INNER_OOB_ICMP, 0, 0)) + bytes(50), nonce))
    if kind == "inner_bad":
        return frame(src, dst, hop, KEY_PEER.seal(draw(st.binary(min_size=4, max_size=60)), nonce))
    ip_src = {
        "spoofed": OTHER.address.packed,
        "same_owner_net": PEER.address.packed[:8] + b"\x00" * 7 + b"\x09",
    }.get(kind, src)
    version = 0x40 if kind == "not_v6" else 0x60
    udp = bytes((version, 0, 0, 0)) + struct.pack("!HBB", 12, 17, 64) + ip_src + dst + bytes(12)
    return frame(src, dst, hop, KEY_PEER.seal(L3_HEADER + udp, nonce))


@SETTINGS
@given(st.lists(peer_frames(), min_size=1, max_size=10), st.booleans(), st.booleans(), st.integers(1, 3))
def test_from_peer_native_equals_reference(blobs: list[bytes], vnet: bool, tun: bool, calls: int) -> None:
    py, c = both(vnet=vnet, tun=tun)
    blob = b"".join(blobs)
    cut = len(blob) // calls
    pieces = [blob[i * cut : (i + 1) * cut] if i < calls - 1 else blob[i * cut :] for i in range(calls)]
    for piece in pieces:  # several batches in one loop turn: GRO groups stay open across them
        py.from_peer(piece, NOW)
        c.from_peer(memoryview(piece), NOW)  # tund hands the kernel the ring's memory itself
    assert outcome(c) == outcome(py)


@SETTINGS
@given(st.lists(segments(), min_size=1, max_size=6), st.booleans(), st.randoms(use_true_random=False))
def test_gro_native_equals_reference(flows: list[list[bytes]], vnet: bool, rnd: Any) -> None:
    """Interleaved flows straight into both Gro implementations."""
    pkts = [pt for f in flows for pt in f]
    rnd.shuffle(pkts)
    ref, nat = pygro.Gro(vnet), K.Gro(vnet)
    for pt in pkts:
        ref.add(pt, 60)
        nat.add(pt, 60)
    assert [b"".join(bytes(b) for b in w) for w in nat.flush()] == [b"".join(bytes(b) for b in w) for w in ref.flush()]
    assert nat.merged == ref.merged


def test_gro_bounded_open_groups() -> None:
    """More flows than MAX_OPEN in one turn: both close the oldest."""
    ref, nat = pygro.Gro(True), K.Gro(True)
    assert pygro.MAX_OPEN == K.GRO_MAX_OPEN
    for port in range(pygro.MAX_OPEN + 10):
        tcp = struct.pack("!HHIIBBHHH", port, 80, 1, 5, 5 << 4, 0x10, 100, 0, 0)
        pt = L3_HEADER + struct.pack("!IHBB", 0x60000000, 30, 6, 60) + bytes(32) + tcp + bytes(10)
        ref.add(pt, 5)
        nat.add(pt, 5)
    assert nat.open_groups == len(ref.open) == pygro.MAX_OPEN
    assert [b"".join(bytes(b) for b in w) for w in nat.flush()] == [b"".join(bytes(b) for b in w) for w in ref.flush()]


# --- AES-GCM -------------------------------------------------------------------------


@SETTINGS
@given(
    st.binary(min_size=32, max_size=32),
    st.binary(max_size=2000),
    st.binary(min_size=12, max_size=12),
    st.one_of(st.none(), st.binary(max_size=80)),
    st.booleans(),
)
def test_aead_matches_cryptography(key: bytes, data: bytes, nonce: bytes, aad: bytes | None, evp: bool) -> None:
    """Both of the kernel's ways to AES-GCM (the provider's functions, EVP)
    give cryptography's bytes and refuse what it refuses."""
    ref, nat = SessionKey(key, native=False).aead, K.Aead(key, evp=evp)
    ct = nat.encrypt(nonce, data, aad)
    assert ct == ref.encrypt(nonce, data, aad)
    assert nat.decrypt(nonce, ct, aad) == data
    bad = bytes([ct[0] ^ 1]) + ct[1:]
    with pytest.raises(Exception) as e1:
        nat.decrypt(nonce, bad, aad)
    with pytest.raises(Exception) as e2:
        ref.decrypt(nonce, bad, aad)
    assert e1.type is e2.type
    with pytest.raises(e2.type):
        nat.decrypt(nonce, ct[:15], aad)
    with pytest.raises(e2.type):
        nat.decrypt(nonce, ct, (aad or b"") + b"x")
    assert nat.decrypt(nonce, ct, aad) == data  # a refusal leaves the context usable


def test_aead_uses_the_providers_functions() -> None:
    """OpenSSL 3's default provider has every function the direct path
    needs, so a kernel that quietly fell back to EVP (~0.1 us more per seal
    and per open) fails here; evp=True still picks EVP."""
    assert K.GCM_BACKEND == "provider"
    assert K.Aead(bytes(32)).backend == "provider"
    assert K.Aead(bytes(32), evp=True).backend == "evp"
    assert SessionKey(bytes(32)).aead.backend == "provider"


def test_aead_refuses_bad_sizes() -> None:
    with pytest.raises(ValueError):
        K.Aead(bytes(16))
    with pytest.raises(ValueError):
        K.Aead(bytes(32)).encrypt(bytes(8), b"x", None)


@SETTINGS
@given(st.binary(max_size=3000), st.integers(0, 64))
def test_garbage_never_crashes_the_kernel(data: bytes, off: int) -> None:
    """Bytes from nowhere into every entry point: counted drops or a
    SegmentError, nothing read outside the buffer (``make asan``)."""
    c = plane(ME, True)
    c.from_peer(data, NOW)
    c.from_tun([data], NOW, off=min(off, 64))
    c.from_tun([bytes(VNET_HDR_SIZE) + data], NOW)
    for gso_type in (4, 0x84):
        c.from_tun([struct.pack("=BBHHHH", 0, gso_type, 0, 0xFFFF, 40, 16) + data], NOW)
    try:
        K.split_tcp(data, off)
    except gso.SegmentError:
        pass
    if len(data) >= 44:
        K.Gro(True).add(data, 3)
    c.gro.flush()
    c.take_out()


# --- peerd ---------------------------------------------------------------------------


@SETTINGS
@given(
    st.lists(
        st.tuples(
            st.sampled_from([0, 1, 2, 64]), st.sampled_from(["me", "peer"]), st.integers(0, 2), st.binary(max_size=50)
        ),
        min_size=1,
        max_size=40,
    ),
    st.booleans(),
)
def test_all_local_native_equals_numpy(packets: list[tuple[int, str, int, bytes]], gaps: bool) -> None:
    from services.peerd import local_batch

    buf, offsets = bytearray(), []
    for hop, dst, src, body in packets:
        if gaps and src == 2:
            buf += b"\x00" * 3  # a control packet's bytes between data packets
        offsets.append(len(buf))
        srcs = (PEER, OTHER, STRANGER)
        buf += frame(srcs[src].address.packed, address(dst, bytes(8)), hop, body)
    own = ME.address.packed[:8]
    ref, nat = bytearray(buf), bytearray(buf)
    assert K.all_local(nat, list(offsets), own) == local_batch._all_local_numpy(ref, list(offsets), own)
    assert nat == ref


def test_the_classes_the_kernel_reads_keep_their_fields_in_its_slots() -> None:
    """With the kernel built, the objects it reads on every call derive from
    its slot bases (native.fields), so it reads their fields without a
    lookup; to Python they stay attributes, unset ones raising as usual."""
    from common.datapath import DataOut
    from common.shmring import RingReader, RingWriter
    from services.peerd.sendqueue import SendQueue

    for cls, base in (
        (DataPlane, K.PlaneFields),
        (DataOut, K.OutFields),
        (RingWriter, K.RingFields),
        (RingReader, K.RingFields),
        (SendQueue, K.QueueFields),
    ):
        assert issubclass(cls, base), cls
    dp = plane(ME, True)
    dp.out = {"x": [b"1"]}
    assert dp.out == {"x": [b"1"]} and "out" not in vars(dp)  # in the slot, not the instance dict
    reader = RingReader("/nonexistent")
    assert reader.map is None
    with pytest.raises(AttributeError):
        _ = reader.head  # a writer's field the reader never sets
