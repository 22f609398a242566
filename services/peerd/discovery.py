"""Link-local peer discovery (PROTOCOL.md 2.7), sans-IO.

The engine decides which interfaces to join, when to send beacons and what
a received datagram means; the shell (``discovery_socket.py``) owns the UDP
socket and the interface scan. As in the reference: beacons go to
``[ff02::cafe%if]:9650`` on every joined interface at start and every 60 s,
a valid beacon from ``fe80::/64`` that is not our own names a peer of type
``linkLocalDiscovery`` at ``tcp://[src%scope]:<port>`` (``tls://`` in a
private network), and every node dials what it discovers (so two nodes
that see each other hold two links, as the reference does).

Two differences, both for the ``interfaces come and go`` case: interfaces
are scanned every 5 s (not only before each 60 s send), and a newly joined
interface gets a beacon at once, so a LAN that comes up after the node is
found in seconds rather than up to a minute. Bad input is counted, never
stored: malformed or foreign datagrams, our own beacons, and anything over
a fixed rate (a flood) cost a counter increment each.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass

from common.endpoint import Endpoint
from common.wire.beacon import Beacon
from common.wire.errors import CodecError

GROUP = "ff02::cafe"
BEACON_INTERVAL = 60.0  # ref: LL_PEER_DISCOVERY_BEACON_INTERVAL
SCAN_INTERVAL = 5.0
RATE = 20.0  # beacons per second handled; more are dropped and counted (a flood)
BURST = 40.0
LINK_LOCAL = ipaddress.IPv6Network("fe80::/64")


@dataclass(frozen=True)
class Join:
    ifindex: int


@dataclass(frozen=True)
class Send:
    ifindex: int
    payload: bytes


Action = Join | Send


class Discovery:
    """State: the joined interfaces, the send timer and a token bucket."""

    def __init__(
        self, router_id: bytes, tcp_port: int, private: bool, now: float, counters: Counter[str] | None = None
    ) -> None:
        self.router_id = router_id
        self.beacon = Beacon(tcp_port, router_id).encode()
        self.proto = "tls" if private else "tcp"
        self.joined: set[int] = set()
        self.next_send = now + BEACON_INTERVAL  # the first beacons are the greetings of the first scan, at start
        self.next_scan = now
        self.tokens = BURST
        self.last_refill = now
        self.counters: Counter[str] = Counter() if counters is None else counters

    def interfaces(self, found: set[int], now: float) -> list[Action]:
        """A scan's result (qualifying interface indexes): join the new ones
        and greet them; forget the gone ones (leaving is implicit)."""
        self.next_scan = now + SCAN_INTERVAL
        self.joined &= found
        return [Join(i) for i in sorted(found - self.joined)]

    def join_result(self, ifindex: int, ok: bool) -> list[Action]:
        """The shell joined (or failed to join) the group on ``ifindex``."""
        if not ok:
            self.counters["discovery_join_failed"] += 1
            return []
        self.joined.add(ifindex)
        self.counters["discovery_interfaces_joined"] += 1
        return [Send(ifindex, self.beacon)]

    def tick(self, now: float) -> list[Action]:
        """Beacons on every joined interface when the interval is up."""
        if now < self.next_send:
            return []
        self.next_send = now + BEACON_INTERVAL
        return [Send(i, self.beacon) for i in sorted(self.joined)]

    def next_event(self) -> float:
        return min(self.next_send, self.next_scan)

    def datagram(self, data: bytes, host: str, scope: int, now: float) -> Endpoint | None:
        """A received datagram from ``host`` (no scope text) on interface
        ``scope``: the endpoint it announces, or None (counted)."""
        count = self.counters
        self.tokens = min(BURST, self.tokens + (now - self.last_refill) * RATE)
        self.last_refill = now
        if self.tokens < 1.0:
            count["discovery_dropped_rate"] += 1
            return None
        self.tokens -= 1.0
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            count["discovery_dropped_source"] += 1
            return None
        if ip.version != 6 or ip not in LINK_LOCAL or not scope:
            count["discovery_dropped_not_link_local"] += 1
            return None
        try:
            beacon = Beacon.decode(data)
        except CodecError:
            count["discovery_dropped_malformed"] += 1
            return None
        if beacon.router_id[:32] == self.router_id[:32]:  # our key: this node (any run of it)
            count["discovery_dropped_own"] += 1
            return None
        if beacon.tcp_port == 0:
            count["discovery_dropped_malformed"] += 1
            return None
        count["discovery_beacons"] += 1
        return Endpoint(self.proto, f"{ip}%{scope}", beacon.tcp_port)
