"""Close links at once when the interface they leave by goes down.

A TCP connection does not notice that its interface went down (or lost
its carrier) until retransmissions time out, minutes later, and Babel's
own liveness takes 43 s; meanwhile every packet routed over the link is
lost. The kernel announces link changes on rtnetlink, so peerd asks, when
a link comes up, which interface the route to the peer uses
(RTM_GETROUTE), and closes every link on an interface that loses IFF_UP
or IFF_LOWER_UP. The router then handles the peer as dead and switches
to another route in the same turn.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import struct
from collections.abc import Iterator

_RTMGRP_LINK = 0x1
_RTM_NEWLINK = 16
_RTM_DELLINK = 17
_RTM_GETROUTE = 26
_RTM_NEWROUTE = 24
_NLMSG_ERROR = 2
_NLM_F_REQUEST = 0x1
_RTA_DST = 1
_RTA_OIF = 4
_RTM_F_LOOKUP_TABLE = 0x1000
IFF_UP = 0x1
IFF_LOWER_UP = 0x10000
_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_RTMSG = struct.Struct("=BBBBBBBBI")


def _attrs(data: bytes, pos: int, end: int) -> Iterator[tuple[int, bytes]]:
    while pos + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, pos)
        if length < 4:
            return
        yield kind, data[pos + 4 : pos + length]
        pos += (length + 3) & ~3


def route_ifindex(host: str) -> int:
    """The interface index the kernel routes ``host`` out of; 0 if unknown."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return 0
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    bits = 32 if ip.version == 4 else 128
    attr = struct.pack("=HH", 4 + len(ip.packed), _RTA_DST) + ip.packed
    body = _RTMSG.pack(family, bits, 0, 0, 0, 0, 0, 0, _RTM_F_LOOKUP_TABLE) + attr
    msg = _NLMSGHDR.pack(16 + len(body), _RTM_GETROUTE, _NLM_F_REQUEST, 1, 0) + body
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as nl:
            nl.settimeout(1.0)
            nl.bind((0, 0))
            nl.send(msg)
            data = nl.recv(65536)
    except OSError:
        return 0
    pos = 0
    while pos + 16 <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, pos)
        if kind == _RTM_NEWROUTE:
            for akind, value in _attrs(data, pos + 16 + _RTMSG.size, pos + length):
                if akind == _RTA_OIF and len(value) >= 4:
                    return int(struct.unpack("=I", value[:4])[0])
        if length < 16:
            break
        pos += (length + 3) & ~3
    return 0


class LinkWatch:
    """A non-blocking rtnetlink socket subscribed to link changes."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.NETLINK_ROUTE)
        self.sock.bind((0, _RTMGRP_LINK))

    def fileno(self) -> int:
        return self.sock.fileno()

    def down_interfaces(self) -> set[int]:
        """Drain pending notifications; the indexes of interfaces now down or gone."""
        down: set[int] = set()
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return down
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # we fell behind; nothing to do but go on
                    continue
                return down
            pos = 0
            while pos + 16 + _IFINFOMSG.size <= len(data):
                length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, pos)
                if length < 16:
                    break
                if kind in (_RTM_NEWLINK, _RTM_DELLINK):
                    _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(data, pos + 16)
                    if kind == _RTM_DELLINK or not flags & IFF_UP or not flags & IFF_LOWER_UP:
                        down.add(index)
                pos += (length + 3) & ~3

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
