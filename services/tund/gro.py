"""Receive-side coalescing ("GRO in user space") for packets written to the TUN.

Consecutive in-order TCP segments of one flow are merged into one
IPv6/TCP "super packet" of up to 64 KiB and handed to the kernel with a
virtio-net header (GSO_TCPV6, NEEDS_CSUM): one write and one trip through
the kernel's stack instead of ~45. Everything else is written as is.

A write is a list of buffers for ``os.writev`` (no buffer is joined):
the virtio-net header, the rewritten IPv6 and TCP headers and the payloads
of the decrypted packets.

Merging rules (those of Linux GRO and wireguard-go): same addresses and
ports, same IPv6 first word (traffic class incl. ECN, flow label), same
hop limit, same ACK number, same TCP header length and options bytes
(timestamps included), flags exactly ACK (PSH allowed on the last
segment), the sequence number continuing the group, and every segment
but the last exactly the size of the first. The checksums of merged
segments are not verified: the payload was authenticated end to end by
AES-GCM, and the kernel treats NEEDS_CSUM packets as verified.
"""

from __future__ import annotations

import struct

from common.wire.checksum import NEXT_TCP, pseudo_header_sum

from .tun import VNET_F_NEEDS_CSUM, VNET_GSO_TCPV6, VNET_HDR, VNET_PLAIN

TCP_ACK = 0x10
TCP_PSH = 0x08
MAX_PAYLOAD = 65535  # IPv6 payload length field
_U16 = struct.Struct("!H")
_SEQ = struct.Struct("!I")
IP = 4  # where the IPv6 header starts in a decrypted plaintext (after the inner header)
HOP_BYTES = [bytes((i,)) for i in range(256)]
MAX_OPEN = 256  # flows with an open group; one more closes the oldest (bounded per turn)


class _Group:
    __slots__ = (
        "ack",
        "data_off",
        "full_len",
        "gso",
        "h1",
        "h2",
        "h3",
        "hop",
        "key",
        "next_seq",
        "opts",
        "payloads",
        "psh",
        "pt",
        "thl",
        "total",
        "word0",
    )

    def __init__(self, pt: bytes, key: bytes, hop: int, thl: int, size: int, seq: int, payload: bytes) -> None:
        self.pt = pt
        self.key = key
        self.hop = hop
        self.thl = thl
        self.gso = size
        self.total = size
        self.next_seq = (seq + size) & 0xFFFFFFFF
        self.word0 = pt[4:8]
        self.ack = pt[52:56]
        self.opts = pt[64 : 44 + thl]
        self.payloads: list[bytes | memoryview] = [payload]
        self.psh = 0
        # for the fast path: what a full-size, ACK-only next segment repeats
        # of this one (IPv6 header and ports; ack, offset, flags, window;
        # urgent pointer and options), and its length
        self.h1 = pt[4:48]
        self.h2 = pt[52:60]
        self.h3 = pt[62 : 44 + thl]
        self.full_len = len(pt)
        self.data_off = 44 + thl


def single(pt: bytes, hop: int, vnet: bool) -> list[bytes | memoryview]:
    """One decrypted L3 packet as it goes to the TUN, hop limit replaced."""
    view = memoryview(pt)
    bufs: list[bytes | memoryview] = [view[4:11], HOP_BYTES[hop], view[12:]]
    if vnet:
        bufs.insert(0, VNET_PLAIN)
    return bufs


def _pseudo_sum(addrs: bytes, length: int) -> int:
    """Folded (not inverted) IPv6 pseudo-header sum for TCP: what the
    checksum field holds in a CHECKSUM_PARTIAL packet."""
    return pseudo_header_sum(addrs, length, NEXT_TCP) or 0xFFFF


class Gro:
    def __init__(self, vnet: bool) -> None:
        self.vnet = vnet
        self.open: dict[bytes, _Group] = {}
        self.writes: list[list[bytes | memoryview]] = []
        self.merged = 0  # segments that went out inside a super packet
        self.last: _Group | None = None  # the group the previous segment joined or opened

    def add(self, pt: bytes, hop: int) -> None:
        """A decrypted plaintext (inner header included) holding one IPv6 packet."""
        g = self.last
        if (
            g is not None
            and len(pt) == g.full_len
            and pt.startswith(g.h1, 4)
            and _SEQ.unpack_from(pt, 48)[0] == g.next_seq
            and pt.startswith(g.h2, 52)
            and pt.startswith(g.h3, 62)
            and hop == g.hop
            and g.total + g.gso + g.thl <= MAX_PAYLOAD
        ):  # the common case, the next full-size segment of the last flow: same checks as below, fewer steps
            g.payloads.append(pt[g.data_off :])
            g.total += g.gso
            g.next_seq = (g.next_seq + g.gso) & 0xFFFFFFFF
            return
        if not self.vnet or pt[10] != NEXT_TCP or len(pt) < 64:
            self.writes.append(single(pt, hop, self.vnet))
            return
        thl = (pt[56] >> 4) << 2
        size = len(pt) - 44 - thl
        flags = pt[57]
        key = pt[12:48]
        g = self.open.get(key)
        if g is not None:
            if (
                size > 0
                and (flags | TCP_PSH) == (TCP_ACK | TCP_PSH)
                and size <= g.gso
                and thl == g.thl
                and hop == g.hop
                and _SEQ.unpack_from(pt, 48)[0] == g.next_seq
                and g.total + size + thl <= MAX_PAYLOAD
                and pt[52:56] == g.ack
                and pt[4:8] == g.word0
                and pt[64 : 44 + thl] == g.opts
                and (pt[8] << 8 | pt[9]) == thl + size
            ):
                g.payloads.append(pt[44 + thl :])
                g.total += size
                g.next_seq = (g.next_seq + size) & 0xFFFFFFFF
                if size < g.gso or flags & TCP_PSH:
                    g.psh = flags & TCP_PSH
                    self._close(g)
                else:
                    self.last = g
                return
            self._close(g)
        if size > 0 and flags == TCP_ACK and thl >= 20 and (pt[8] << 8 | pt[9]) == thl + size:
            if len(self.open) >= MAX_OPEN:
                self._close(next(iter(self.open.values())))
            seq = _SEQ.unpack_from(pt, 48)[0]
            self.open[key] = self.last = _Group(pt, key, hop, thl, size, seq, pt[44 + thl :])
        else:
            self.writes.append(single(pt, hop, True))

    def _close(self, g: _Group) -> None:
        del self.open[g.key]
        if self.last is g:
            self.last = None
        pt = g.pt
        if len(g.payloads) == 1:
            self.writes.append(single(pt, g.hop, True))
            return
        thl = g.thl
        length = thl + g.total
        ip = pt[4:8] + _U16.pack(length) + pt[10:11] + HOP_BYTES[g.hop] + pt[12:44]
        tcp = bytearray(pt[44 : 44 + thl])
        tcp[13] |= g.psh
        tcp[16:18] = _U16.pack(_pseudo_sum(pt[12:44], length))
        vnet = VNET_HDR.pack(VNET_F_NEEDS_CSUM, VNET_GSO_TCPV6, 40 + thl, g.gso, 40, 16)
        self.merged += len(g.payloads)
        self.writes.append([vnet, ip, bytes(tcp), *g.payloads])

    def flush(self) -> list[list[bytes | memoryview]]:
        """Close every open group; the writes in arrival order per flow."""
        for g in list(self.open.values()):
            self._close(g)
        out, self.writes = self.writes, []
        return out
