"""Routing-table state (PROTOCOL.md 6.1): per subnet either a pending query
or a list of route entries, one per neighbour, at most one selected.

Plain containers: all protocol decisions (feasibility, selection, timers)
live in the engine so that the rules of section 6 read in one place.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from common.identity import subnet_of
from common.wire.subnet import IPAddress, Subnet


@dataclass(slots=True, eq=False)
class RouteEntry:
    """One neighbour's route for a subnet; ``metric`` excludes our link cost."""

    subnet: Subnet  # as first announced (unmasked), sent back out as is
    router_id: bytes
    neighbour: str  # peer id
    metric: int
    seqno: int
    expires: float
    selected: bool = False
    timer_at: float | None = None  # deadline armed on the engine's route heap


class SubnetRoutes:
    """The *Routes* state of one subnet. The selected entry, if any, is kept
    first because the reference breaks metric ties by list order."""

    __slots__ = ("entries", "public_key")

    def __init__(self, public_key: bytes) -> None:
        self.public_key = public_key  # fixed at creation (quirk 5)
        self.entries: list[RouteEntry] = []

    def selected(self) -> RouteEntry | None:
        entries = self.entries
        if entries and entries[0].selected:
            return entries[0]
        return None

    def find(self, neighbour: str) -> RouteEntry | None:
        for entry in self.entries:
            if entry.neighbour == neighbour:
                return entry
        return None

    def add(self, entry: RouteEntry) -> None:
        self.entries.append(entry)

    def remove(self, entry: RouteEntry) -> None:
        self.entries.remove(entry)

    def select(self, entry: RouteEntry) -> None:
        current = self.selected()
        if current is entry:
            return
        if current is not None:
            current.selected = False
        self.entries.remove(entry)
        self.entries.insert(0, entry)
        entry.selected = True

    def unselect(self) -> None:
        current = self.selected()
        if current is not None:
            current.selected = False


class RoutingTable:
    """Subnets with *Routes* and subnets being *Queried*, with longest-prefix
    lookup. All accepted subnets are /64 or longer, so a lookup only tries the
    prefix lengths actually present (normally just 64)."""

    def __init__(self) -> None:
        self.routes: dict[Subnet, SubnetRoutes] = {}
        self.queried: dict[Subnet, float] = {}  # subnet -> deadline
        self._plens: Counter[int] = Counter()

    def add_routes(self, subnet: Subnet, public_key: bytes) -> SubnetRoutes:
        self.drop_query(subnet)
        routes = SubnetRoutes(public_key)
        self.routes[subnet] = routes
        self._plens[subnet.prefix_len] += 1
        return routes

    def remove_routes(self, subnet: Subnet) -> None:
        if self.routes.pop(subnet, None) is not None:
            self._forget_plen(subnet.prefix_len)

    def mark_queried(self, subnet: Subnet, deadline: float) -> None:
        if subnet not in self.queried:
            self._plens[subnet.prefix_len] += 1
        self.queried[subnet] = deadline

    def drop_query(self, subnet: Subnet) -> None:
        if self.queried.pop(subnet, None) is not None:
            self._forget_plen(subnet.prefix_len)

    def lookup(self, address: IPAddress) -> tuple[Subnet, SubnetRoutes | None] | None:
        """Longest match for ``address``: (subnet, routes) for *Routes*,
        (subnet, None) for *Queried*, None when nothing covers it."""
        if address.version != 6:
            return None
        for plen in sorted(self._plens, reverse=True):
            key = subnet_of(address) if plen == 64 else Subnet(address, plen)
            routes = self.routes.get(key)
            if routes is not None:
                return key, routes
            if key in self.queried:
                return key, None
        return None

    def _forget_plen(self, plen: int) -> None:
        self._plens[plen] -= 1
        if self._plens[plen] <= 0:
            del self._plens[plen]
