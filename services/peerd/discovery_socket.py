"""The shell around the discovery engine: the UDP socket on ``[::]:9650``,
the interface scan, and the loop that feeds them to ``Discovery``. It
lives in peerd-tcp, the process that owns stream links, and needs no
privilege (multicast joins and sends on an unprivileged port)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

from common.endpoint import Endpoint

from .discovery import GROUP, Discovery, Join, Send

log = logging.getLogger("peerd.discovery")

SIOCGIFFLAGS = 0x8913
SIOCGIFHWADDR = 0x8927
IFF_UP = 0x1
IFF_LOOPBACK = 0x8
IFF_POINTOPOINT = 0x10
IFF_MULTICAST = 0x1000
ARPHRD_NONE = 0xFFFE  # TUN devices
IFA_F_DADFAILED = 0x08
IFA_F_TENTATIVE = 0x40
IF_INET6 = "/proc/self/net/if_inet6"
RECV_BATCH = 64  # datagrams read per wake-up before yielding


def link_local_interfaces(text: str) -> dict[int, str]:
    """From /proc/net/if_inet6: interfaces holding a usable fe80::/64
    address (not tentative, not failed DAD), index -> name."""
    out: dict[int, str] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 6 or not parts[0].startswith("fe80000000000000"):
            continue
        try:
            index, flags = int(parts[1], 16), int(parts[4], 16)
        except ValueError:
            continue
        if not flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED):
            out[index] = parts[5]
    return out


def qualifies(flags: int, hwtype: int) -> bool:
    """The reference's filter: up, multicast, not loopback, not point-to-point, not TUN."""
    return (
        bool(flags & IFF_UP)
        and bool(flags & IFF_MULTICAST)
        and not flags & (IFF_LOOPBACK | IFF_POINTOPOINT)
        and hwtype != ARPHRD_NONE
    )


def scan(allowed: list[str]) -> set[int]:
    """Indexes of the interfaces discovery should use right now."""
    try:
        candidates = link_local_interfaces(Path(IF_INET6).read_text())
    except OSError:
        return set()
    found: set[int] = set()
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        for index, name in candidates.items():
            if allowed and name not in allowed:
                continue
            req = struct.pack("16s16x", name.encode()[:15])
            try:
                flags = struct.unpack_from("H", fcntl.ioctl(s, SIOCGIFFLAGS, req), 16)[0]
                hwtype = struct.unpack_from("H", fcntl.ioctl(s, SIOCGIFHWADDR, req), 16)[0]
            except OSError:
                continue
            if qualifies(flags, hwtype):
                found.add(index)
    return found


class DiscoveryService:
    """Runs the engine; every endpoint a beacon names goes to ``on_peer``."""

    def __init__(self, engine: Discovery, port: int, allowed: list[str], on_peer: Callable[[Endpoint], None]) -> None:
        self.engine = engine
        self.port = port
        self.allowed = list(allowed)
        self.on_peer = on_peer
        self.sock: socket.socket | None = None

    def open(self) -> bool:
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)  # our own beacons are no news
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 1)
            s.bind(("::", self.port))
        except OSError as exc:
            s.close()
            log.error("cannot bind the discovery socket [::]:%d (%s); link-local discovery is off", self.port, exc)
            return False
        s.setblocking(False)
        self.sock = s
        only = f" (only {', '.join(self.allowed)})" if self.allowed else ""
        log.info("link-local discovery on UDP port %d%s", self.port, only)
        return True

    def apply(self, actions: list[Join | Send]) -> None:
        assert self.sock is not None
        group = socket.inet_pton(socket.AF_INET6, GROUP)
        while actions:
            action = actions.pop(0)
            if isinstance(action, Join):
                try:
                    mreq = group + struct.pack("@I", action.ifindex)
                    self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
                    ok = True
                except OSError as exc:
                    ok = exc.errno == 98  # EADDRINUSE: already a member
                    if not ok:
                        log.warning("cannot join %s on interface %d: %s", GROUP, action.ifindex, exc)
                if ok:
                    log.info("discovery joined %s on interface %d", GROUP, action.ifindex)
                actions.extend(self.engine.join_result(action.ifindex, ok))
            else:
                try:
                    self.sock.sendto(action.payload, (GROUP, self.port, 0, action.ifindex))
                    self.engine.counters["discovery_beacons_sent"] += 1
                except OSError as exc:
                    self.engine.counters["discovery_send_failed"] += 1
                    log.debug("beacon on interface %d failed: %s", action.ifindex, exc)

    def on_readable(self) -> None:
        assert self.sock is not None
        now = time.monotonic()
        for _ in range(RECV_BATCH):
            try:
                data, addr = self.sock.recvfrom(128)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("discovery receive failed: %s", exc)
                return
            scope = addr[3] if len(addr) >= 4 else 0
            ep = self.engine.datagram(data, addr[0], scope, now)
            if ep is not None:
                self.on_peer(ep)

    async def run(self, stop: asyncio.Event) -> None:
        if not self.open():
            return
        assert self.sock is not None
        loop = asyncio.get_running_loop()
        loop.add_reader(self.sock.fileno(), self.on_readable)
        warned = False
        try:
            while not stop.is_set():
                now = time.monotonic()
                if now >= self.engine.next_scan:
                    found = await asyncio.to_thread(scan, self.allowed)
                    self.apply(self.engine.interfaces(found, time.monotonic()))
                    if not self.engine.joined and not warned:
                        log.warning("link-local discovery is on but no interface qualifies (yet)")
                    warned = warned or not self.engine.joined
                self.apply(self.engine.tick(time.monotonic()))
                delay = max(0.05, self.engine.next_event() - time.monotonic())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        finally:
            loop.remove_reader(self.sock.fileno())
            self.sock.close()
