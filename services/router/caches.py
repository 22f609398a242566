"""Request caches (PROTOCOL.md 6.1): who we sent seqno and route requests
to, and who asked us, so requests are neither repeated nor echoed.

Both are soft state: when full, the oldest entry is evicted (counted by the
engine) rather than refusing new requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Subnets are given by their int key (Subnet.key), as the engine's tables are.
SeqnoKey = tuple[bytes, int, int]  # (router id, subnet key, requested seqno)


@dataclass(slots=True)
class SeqnoRequestInfo:
    first_sent: float
    last_sent: float
    targets: list[str] = field(default_factory=list)  # peers we sent the request to
    sources: list[str] = field(default_factory=list)  # peers that asked us (interested in the answer)
    owner: str | None = None  # the peer whose request created the entry (its share of the cache)


class SeqnoCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: dict[SeqnoKey, SeqnoRequestInfo] = {}
        # a dict, not a set: insertion order, so runs repeat whatever PYTHONHASHSEED is
        self._by_subnet: dict[int, dict[SeqnoKey, None]] = {}
        self._by_owner: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: SeqnoKey) -> SeqnoRequestInfo | None:
        return self.entries.get(key)

    def has_subnet(self, subnet: int) -> bool:
        return subnet in self._by_subnet

    def keys_for(self, subnet: int) -> list[SeqnoKey]:
        keys = self._by_subnet.get(subnet)
        return list(keys) if keys else []

    def owned_by(self, peer_id: str) -> int:
        """Entries created on behalf of ``peer_id``'s requests."""
        return self._by_owner.get(peer_id, 0)

    def forward(self, key: SeqnoKey, target: str | None, origin: str | None, now: float) -> SeqnoKey | None:
        """Record that the request went to ``target`` (on behalf of ``origin``);
        a None target only remembers the asker, for a request that could not
        be forwarded yet. Returns the key evicted to make room, if any."""
        evicted = None
        info = self.entries.get(key)
        if info is None:
            if len(self.entries) >= self.capacity:
                evicted = next(iter(self.entries))
                self.remove(evicted)
            info = self.entries[key] = SeqnoRequestInfo(now, now, owner=origin)
            self._by_subnet.setdefault(key[1], {})[key] = None
            if origin is not None:
                self._by_owner[origin] = self._by_owner.get(origin, 0) + 1
        if target is not None:
            info.last_sent = now
            if target not in info.targets:
                info.targets.append(target)
        if origin is not None and origin not in info.sources:
            info.sources.append(origin)
        return evicted

    def remove(self, key: SeqnoKey) -> None:
        info = self.entries.pop(key, None)
        if info is None:
            return
        if info.owner is not None:
            left = self._by_owner[info.owner] - 1
            if left > 0:
                self._by_owner[info.owner] = left
            else:
                del self._by_owner[info.owner]
        keys = self._by_subnet[key[1]]
        keys.pop(key, None)
        if not keys:
            del self._by_subnet[key[1]]

    def forget_peer(self, peer_id: str) -> None:
        for info in self.entries.values():
            if peer_id in info.targets:
                info.targets.remove(peer_id)
            if peer_id in info.sources:
                info.sources.remove(peer_id)


@dataclass(slots=True)
class RouteRequestInfo:
    generation: int  # generation of the last request we sent for the subnet
    receivers: list[str]  # all peers at the time it was sent
    sent: float


class RouteRequestCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: dict[int, RouteRequestInfo] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def info(self, subnet: int, now: float, max_age: float) -> RouteRequestInfo | None:
        info = self.entries.get(subnet)
        if info is None or now - info.sent > max_age:
            return None
        return info

    def record(self, subnet: int, generation: int, receivers: list[str], now: float) -> int | None:
        """Overwrite the entry for ``subnet``; returns the subnet evicted to make room, if any."""
        evicted = None
        if subnet not in self.entries and len(self.entries) >= self.capacity:
            evicted = next(iter(self.entries))
            del self.entries[evicted]
        self.entries.pop(subnet, None)  # re-insert so dict order stays oldest-first
        self.entries[subnet] = RouteRequestInfo(generation, receivers, now)
        return evicted

    def remove(self, subnet: int) -> None:
        self.entries.pop(subnet, None)

    def forget_peer(self, peer_id: str) -> None:
        for info in self.entries.values():
            if peer_id in info.receivers:
                info.receivers.remove(peer_id)
