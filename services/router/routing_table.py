"""Routing-table state (PROTOCOL.md 6.1): per subnet either a pending query
or a list of route entries, one per neighbour, at most one selected.

Plain containers: all protocol decisions (feasibility, selection, timers)
live in the engine so that the rules of section 6 read in one place.

Tables are keyed by ``Subnet.key`` (an int), not by ``Subnet``: a Subnet
hashes through a Python ``__hash__`` call, which made every lookup several
times dearer than an int's (the engine does a dozen per Update). Equal keys
exactly when the Subnets are equal, and ``hash(subnet) == hash(subnet.key)``,
so tables keyed either way iterate alike.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from common.identity import subnet_of
from common.wire.subnet import IPAddress, Subnet

if TYPE_CHECKING:
    from .engine import FibEntry


def subnet_key6(value: int, prefix_len: int) -> int:
    """``Subnet(IPv6Address(value), prefix_len).key`` without building either."""
    shift = 128 - prefix_len
    return (((value >> shift) << shift << 8) | prefix_len) << 1 | 1


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
    timer_at: float | None = None  # deadline armed on the engine's route expiry timers
    # The engine's per-neighbour list of entries, oldest first (Learned), threaded through them.
    older: RouteEntry | None = field(default=None, repr=False)
    newer: RouteEntry | None = field(default=None, repr=False)


class Learned:
    """One neighbour's route entries, oldest first: a list threaded through
    the entries themselves (``older`` / ``newer``), for the fairness rules
    (how many, the newest) and a dead neighbour's cleanup. Two pointers per
    entry instead of a dict slot per entry."""

    __slots__ = ("count", "newest", "oldest")

    def __init__(self) -> None:
        self.count = 0
        self.oldest: RouteEntry | None = None
        self.newest: RouteEntry | None = None

    def __len__(self) -> int:
        return self.count

    def append(self, entry: RouteEntry) -> None:
        entry.older, entry.newer = self.newest, None
        if self.newest is None:
            self.oldest = entry
        else:
            self.newest.newer = entry
        self.newest = entry
        self.count += 1

    def unlink(self, entry: RouteEntry) -> None:
        older, newer = entry.older, entry.newer
        if older is None:
            self.oldest = newer
        else:
            older.newer = newer
        if newer is None:
            self.newest = older
        else:
            newer.older = older
        entry.older = entry.newer = None
        self.count -= 1

    def entries(self) -> list[RouteEntry]:
        """Oldest first."""
        out = []
        entry = self.oldest
        while entry is not None:
            out.append(entry)
            entry = entry.newer
        return out


class SubnetRoutes(list[RouteEntry]):
    """The *Routes* state of one subnet: the list of its route entries
    (``entries`` is the list itself: one object per subnet, not two, and one
    pointer less to follow per Update). The selected entry, if any, is kept
    first because the reference breaks metric ties by list order. Compared
    by identity, like the plain object it replaces (never by contents)."""

    __slots__ = ("fib", "public_key", "subnet")

    def __init__(self, public_key: bytes, subnet: Subnet) -> None:
        super().__init__()
        self.public_key = public_key  # fixed at creation (quirk 5)
        self.subnet = subnet  # the table's key as a Subnet
        # The forwarding entry the engine last published for the subnet (kept
        # here rather than in a dict of its own: one lookup less per Update).
        self.fib: FibEntry | None = None

    __eq__ = object.__eq__
    __ne__ = object.__ne__
    __hash__ = object.__hash__  # type: ignore[assignment]

    @property
    def entries(self) -> list[RouteEntry]:
        return self

    def selected(self) -> RouteEntry | None:
        if self and self[0].selected:
            return self[0]
        return None

    def find(self, neighbour: str) -> RouteEntry | None:
        for entry in self:
            if entry.neighbour == neighbour:
                return entry
        return None

    def add(self, entry: RouteEntry) -> None:
        self.append(entry)

    def select(self, entry: RouteEntry) -> None:
        current = self.selected()
        if current is entry:
            return
        if current is not None:
            current.selected = False
        self.remove(entry)
        self.insert(0, entry)
        entry.selected = True

    def unselect(self) -> None:
        current = self.selected()
        if current is not None:
            current.selected = False


class RoutingTable:
    """Subnets with *Routes* and subnets being *Queried*, with longest-prefix
    lookup. All accepted subnets are /64 or longer, so a lookup only tries the
    prefix lengths actually present (normally just 64). ``routes`` and
    ``queried`` are keyed by ``Subnet.key``; the methods take Subnets."""

    def __init__(self) -> None:
        self.routes: dict[int, SubnetRoutes] = {}
        self.queried: dict[int, float] = {}  # subnet key -> deadline
        self.queried_subnets: dict[int, Subnet] = {}  # subnet key -> the Subnet queried
        self._plens: Counter[int] = Counter()

    def add_routes(self, subnet: Subnet, public_key: bytes) -> SubnetRoutes:
        key = subnet.key
        self.drop_query(key, subnet.prefix_len)
        routes = SubnetRoutes(public_key, subnet)
        self.routes[key] = routes
        self._plens[subnet.prefix_len] += 1
        return routes

    def remove_routes(self, subnet: Subnet) -> None:
        if self.routes.pop(subnet.key, None) is not None:
            self._forget_plen(subnet.prefix_len)

    def mark_queried(self, subnet: Subnet, deadline: float) -> None:
        key = subnet.key
        if key not in self.queried:
            self._plens[subnet.prefix_len] += 1
            self.queried_subnets[key] = subnet
        self.queried[key] = deadline

    def drop_query(self, key: int, prefix_len: int) -> None:
        """Forget the query for the subnet with this key (and prefix length)."""
        if self.queried.pop(key, None) is not None:
            del self.queried_subnets[key]
            self._forget_plen(prefix_len)

    def lookup(self, address: IPAddress) -> tuple[Subnet, SubnetRoutes | None] | None:
        """Longest match for ``address``: (subnet, routes) for *Routes*,
        (subnet, None) for *Queried*, None when nothing covers it."""
        if address.version != 6:
            return None
        value = int(address)
        for plen in sorted(self._plens, reverse=True):
            key = subnet_key6(value, plen)
            routes = self.routes.get(key)
            if routes is not None or key in self.queried:
                # the match as built from the address (host bits kept), as before int keys
                return (subnet_of(address) if plen == 64 else Subnet(address, plen)), routes
        return None

    def _forget_plen(self, plen: int) -> None:
        self._plens[plen] -= 1
        if self._plens[plen] <= 0:
            del self._plens[plen]
