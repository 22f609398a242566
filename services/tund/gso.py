"""Segmentation of TCP "super packets" read from the TUN (TSO in user space).

With TCP segmentation offload negotiated on the TUN, the kernel hands us
one IPv6/TCP packet of up to 64 KiB per read (virtio-net header
GSO_TCPV6) instead of ~45 MTU-sized ones: one ``read`` instead of ~45,
and the sending host's TCP stack works per 64 KiB too. The wire still
carries MTU-sized packets (the reference's 1400-byte TUN MTU), so we cut
the super packet here, the way Linux's ``tcp_gso_segment`` does: every
segment gets the IPv6 and TCP headers of the original with its own
payload length, sequence number and checksum; CWR stays on the first
segment only, FIN and PSH on the last only.

The TCP checksum of each segment must be complete (a receiver that does
not coalesce hands the segment to its kernel, which verifies it). Summing
1.3 KB in Python costs ~2.7 µs per segment, more than the ``read`` the
offload saves; numpy sums all segments of a super packet in one call
(~0.25 µs per segment), and the headers' part is a few integer additions.
"""

from __future__ import annotations

import struct

from common.native import SegmentError
from common.wire.checksum import NEXT_TCP, ones_sum, ones_sums, pseudo_header_sum

from .tun import VNET_GSO_ECN, VNET_GSO_TCPV6, VNET_HDR

TCP_FIN = 0x01
TCP_PSH = 0x08
TCP_CWR = 0x80
IPV6_HEADER = 40
_SEQ = struct.Struct("!I")
__all__ = ["SegmentError", "ones_sums", "split_tcp"]
_HEADS: dict[tuple[int, int], struct.Struct] = {}


def _head(prefix_len: int, options_len: int) -> struct.Struct:
    """prefix + IPv6 header + TCP header with the per-segment fields
    (payload length, sequence number, flags, checksum) as arguments."""
    key = (prefix_len, options_len)
    s = _HEADS.get(key)
    if s is None:
        # prefix+ip[0:4] | payload length | ip[6:40]+ports | seq | ack+offset | flags | window | checksum | urg+options
        s = _HEADS[key] = struct.Struct(f"!{prefix_len + 4}sH38sI5sB2sH{2 + options_len}s")
    return s


def split_tcp(packet: bytes, off: int, prefix: bytes) -> list[bytes]:
    """Cut a GSO_TCPV6 super packet (virtio-net header at 0, IPv6 at
    ``off``) into ``prefix`` + one IPv6/TCP packet per segment, checksums
    complete."""
    _flags, gso_type, _hdr_len, mss, csum_start, _csum_offset = VNET_HDR.unpack_from(packet, 0)
    if gso_type & ~VNET_GSO_ECN != VNET_GSO_TCPV6:
        raise SegmentError(f"GSO type {gso_type} is not TCP over IPv6")
    if len(packet) < off + IPV6_HEADER + 20 or packet[off + 6] != NEXT_TCP or csum_start != IPV6_HEADER:
        raise SegmentError("not TCP right after the IPv6 header")
    tcp = off + IPV6_HEADER
    thl = (packet[tcp + 12] >> 4) * 4
    data = tcp + thl
    total = len(packet) - data
    if thl < 20 or total <= 0 or mss <= 0:
        raise SegmentError("inconsistent TCP header or segment size")
    count = -(-total // mss)
    sums = ones_sums(packet, data, mss, count)
    ip = packet[off : off + IPV6_HEADER]
    th = packet[tcp:data]
    flags = th[13]
    middle = flags & ~(TCP_FIN | TCP_PSH | TCP_CWR)
    last_extra = flags & (TCP_FIN | TCP_PSH)
    first_extra = flags & TCP_CWR
    seq0 = _SEQ.unpack_from(th, 4)[0]
    # everything of the pseudo header and the TCP header that is the same in
    # every segment: addresses, next header, ports, ack, offset, window,
    # urgent pointer, options (and the middle segments' flags)
    fixed = (
        pseudo_header_sum(ip[8:40], 0, NEXT_TCP)
        + ones_sum(th[0:4] + th[8:12] + bytes((th[12], middle)) + th[14:16] + th[18:thl])
    ) % 0xFFFF
    pack = _head(len(prefix), thl - 20).pack
    a, b, c, window, d = prefix + ip[0:4], ip[6:40] + th[0:4], th[8:13], th[14:16], th[18:thl]
    view = memoryview(packet)
    end = len(packet)
    # the checksum of a segment is fixed + its sequence number (a 32-bit
    # number is congruent to the sum of its two 16-bit halves mod 0xFFFF) +
    # its TCP length + its payload's sum (+ flags beyond the middle ones);
    # -x % 0xFFFF is the one's complement of the folded sum x
    full = thl + mss
    base = fixed + full
    seqs = [(seq0 + k) & 0xFFFFFFFF for k in range(0, count * mss, mss)]
    out = [
        pack(a, full, b, q, c, middle, window, -(base + q + s) % 0xFFFF, d) + view[p : p + mss]
        for q, s, p in zip(seqs, sums, range(data, end, mss), strict=True)
    ]
    for i in {0, count - 1}:  # the first and last segments: other flags, the last maybe shorter
        fl = middle | (first_extra if i == 0 else 0) | (last_extra if i == count - 1 else 0)
        p = data + i * mss
        size = min(mss, end - p)
        q = seqs[i]
        csum = -(fixed + q + thl + size + sums[i] + fl - middle) % 0xFFFF
        out[i] = pack(a, thl + size, b, q, c, fl, window, csum, d) + view[p : p + size]
    return out
