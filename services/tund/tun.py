"""The TUN device: creation (python-pytun), configuration through rtnetlink
(address, MTU, up) and the virtio-net header used for offloads.

Both directions use the virtio-net header (``IFF_VNET_HDR``) so that one
read or write carries up to 64 KiB: reads negotiate checksum and TCPv6
segmentation offload (TUNSETOFFLOAD), so the kernel hands us whole TCP
"super packets" that ``gso.py`` cuts into MTU-sized segments, and packets
whose checksum it left to us (NEEDS_CSUM); writes hand the kernel one
coalesced TCP super packet instead of ~45 (GRO in user space, ``gro.py``).

The device is not persistent: it disappears, with its address and the
400::/7 route, when the last process holding a queue exits.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os
import socket
import struct
import time

import pytun

from common.nodeconfig import valid_tun_name

MTU = 1400
TX_QUEUE_LEN = 1000  # packets the kernel queues for us to read (default 500: drops under a TCP burst)
SIOCSIFTXQLEN = 0x8943
OVERLAY_PREFIX_LEN = 7  # the node address on /7 routes 400::/7 into the TUN (PROTOCOL.md 1.4)

TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM = 0x01  # we take packets whose checksum is left to us
TUN_F_TSO6 = 0x04  # ... and TCPv6 super packets
TUN_F_TSO_ECN = 0x08  # ... also with CWR set (cleared after the first segment)
VNET_HDR_SIZE = 10  # struct virtio_net_hdr (no num_buffers)
VNET_F_NEEDS_CSUM = 1
VNET_GSO_NONE = 0
VNET_GSO_TCPV6 = 4
VNET_GSO_ECN = 0x80
VNET_HDR = struct.Struct("=BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset (native order)
VNET_PLAIN = bytes(VNET_HDR_SIZE)

# rtnetlink
_RTM_NEWADDR = 20
_NLM_F_REQUEST = 0x1
_NLM_F_ACK = 0x4
_NLM_F_REPLACE = 0x100
_NLM_F_CREATE = 0x400
_NLMSG_ERROR = 2
_IFA_ADDRESS = 1
_IFA_LOCAL = 2
_IFA_FLAGS = 8
_IFA_F_NODAD = 0x02
_IFA_F_PERMANENT = 0x80


class TunError(Exception):
    """The TUN device cannot be created or configured; the message is user-facing."""


valid_name = valid_tun_name  # the rule lives in common/nodeconfig.py (the CLI checks it too)


def read_packets(fd: int, max_packets: int, budget: int, size: int) -> tuple[list[bytes], int]:
    """Up to ``max_packets`` reads of at most ``size`` bytes from a
    non-blocking ``fd``, stopping once ``budget`` bytes are in or the fd
    is drained; (packets, errno of a failed read or 0). The reference
    for the C kernel's read_tun, which tund uses when it is built."""
    pkts: list[bytes] = []
    read = os.read
    for _ in range(max_packets):
        try:
            p = read(fd, size)
        except BlockingIOError:
            break
        except OSError as exc:
            return pkts, exc.errno or errno.EIO
        if not p:  # nothing a TUN returns; never spin on it
            break
        pkts.append(p)
        budget -= len(p)
        if budget <= 0:
            break
    return pkts, 0


def write_packets(fd: int, writes: list[list[bytes]]) -> tuple[int, int, int]:
    """One writev per list of buffers (GRO's output): (written, failed,
    errno of the last failure or 0). The reference for the C kernel's
    write_tun, which tund uses when it is built."""
    written = failed = last = 0
    for bufs in writes:
        try:
            os.writev(fd, bufs)
            written += 1
        except OSError as exc:
            failed += 1
            last = exc.errno or errno.EIO
    return written, failed, last


def _rtattr(kind: int, data: bytes) -> bytes:
    length = 4 + len(data)
    return struct.pack("=HH", length, kind) + data + bytes((4 - length % 4) % 4)


def add_address(ifindex: int, address: ipaddress.IPv6Address, prefix_len: int) -> None:
    """RTM_NEWADDR with IFA_F_NODAD: usable at once, no 1-2 s of duplicate
    address detection during which the kernel would not use it as a source."""
    flags = _IFA_F_NODAD | _IFA_F_PERMANENT
    body = struct.pack("=BBBBI", socket.AF_INET6, prefix_len, flags, 0, ifindex)
    body += _rtattr(_IFA_LOCAL, address.packed) + _rtattr(_IFA_ADDRESS, address.packed)
    body += _rtattr(_IFA_FLAGS, struct.pack("=I", flags))
    seq = int(time.monotonic() * 1000) & 0x7FFFFFFF
    msg_flags = _NLM_F_REQUEST | _NLM_F_ACK | _NLM_F_CREATE | _NLM_F_REPLACE
    msg = struct.pack("=IHHII", 16 + len(body), _RTM_NEWADDR, msg_flags, seq, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as nl:
        nl.settimeout(5)
        nl.bind((0, 0))
        nl.send(msg)
        while True:
            data = nl.recv(65536)
            pos = 0
            while pos + 16 <= len(data):
                length, kind, _flags, rseq, _pid = struct.unpack_from("=IHHII", data, pos)
                if kind == _NLMSG_ERROR and rseq == seq:
                    (err,) = struct.unpack_from("=i", data, pos + 16)
                    if err == 0 or -err == errno.EEXIST:
                        return
                    raise TunError(f"cannot add {address}/{prefix_len}: {os.strerror(-err)}")
                pos += max(16, (length + 3) & ~3)


def _sysctl(path: str, value: str) -> None:
    with contextlib.suppress(OSError), open(path, "w") as f:
        f.write(value)


class TunDevice:
    """One queue of the node's TUN device (several with multiqueue)."""

    def __init__(self, dev: pytun.TunTapDevice, vnet: bool, tso: bool = True) -> None:
        self.dev = dev
        self.name = dev.name if isinstance(dev.name, str) else dev.name.decode()
        self.vnet = vnet
        self.tso = vnet and tso
        self.fd = dev.fileno()
        fl = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fl | os.O_NONBLOCK)
        if vnet:
            # without TSO the kernel segments and checksums itself, one packet per read
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO6 | TUN_F_TSO_ECN if self.tso else 0)
        # a raw FileIO: readinto returns None instead of raising when empty
        self.file = open(self.fd, "r+b", buffering=0, closefd=False)  # noqa: SIM115

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.dev.close()


def _open_queue(name: str, flags: int, attempts: int = 20) -> pytun.TunTapDevice:
    for i in range(attempts):
        try:
            return pytun.TunTapDevice(name=name, flags=flags)
        except pytun.Error as exc:
            code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
            if code == errno.EBUSY and i + 1 < attempts:  # a killed predecessor's device is still going away
                time.sleep(0.1)
                continue
            if code in (errno.EPERM, errno.EACCES):
                raise TunError(
                    "creating a TUN interface needs root or CAP_NET_ADMIN; run with --no-tun to run unprivileged"
                ) from exc
            raise TunError(f"cannot create TUN interface {name}: {exc}") from exc
    raise TunError(f"TUN interface {name} is busy")


def create(
    name: str, address: ipaddress.IPv6Address, queues: int = 1, vnet: bool = True, tso: bool = True
) -> list[TunDevice]:
    """Create (or attach to) the TUN device, give it MTU 1400 and
    ``address``/7 and bring it up; one TunDevice per queue."""
    if not valid_name(name):
        raise TunError(f"invalid TUN interface name {name!r} (1-15 characters, no '/', ':' or spaces)")
    if not os.path.exists("/dev/net/tun"):
        raise TunError("/dev/net/tun does not exist (load the tun module); run with --no-tun to run without TUN")
    flags = pytun.IFF_TUN | pytun.IFF_NO_PI
    if vnet:
        flags |= pytun.IFF_VNET_HDR
    if queues > 1:
        flags |= pytun.IFF_MULTI_QUEUE
    devices: list[TunDevice] = []
    try:
        first = _open_queue(name, flags)
        devices.append(TunDevice(first, vnet, tso))
        real = devices[0].name
        for _ in range(queues - 1):
            devices.append(TunDevice(_open_queue(real, flags), vnet, tso))
        # no link-local address: nothing but overlay traffic (no RS/MLD) goes into the TUN
        _sysctl(f"/proc/sys/net/ipv6/conf/{real}/addr_gen_mode", "1")
        _sysctl(f"/proc/sys/net/ipv6/conf/{real}/accept_ra", "0")
        _sysctl(f"/proc/sys/net/ipv6/conf/{real}/router_solicitations", "0")
        first.mtu = MTU
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            fcntl.ioctl(s, SIOCSIFTXQLEN, struct.pack("16si12x", real.encode(), TX_QUEUE_LEN))
        first.up()
        add_address(socket.if_nametoindex(real), address, OVERLAY_PREFIX_LEN)
    except (OSError, pytun.Error) as exc:
        for d in devices:
            d.close()
        if isinstance(exc, OSError) and exc.errno in (errno.EPERM, errno.EACCES):
            raise TunError(
                "configuring the TUN interface needs root or CAP_NET_ADMIN; run with --no-tun to run unprivileged"
            ) from exc
        raise TunError(f"cannot configure TUN interface {name}: {exc}") from exc
    except TunError:
        for d in devices:
            d.close()
        raise
    return devices
