"""Which peers a peerd knows, their link state and traffic counters, and
when to dial them (PROTOCOL.md 2.8). Sans-IO: the shell reports
connect/disconnect events with ``now`` and asks ``due_dials(now)``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from common.endpoint import Endpoint

STATIC = "static"
INBOUND = "inbound"
DISCOVERED = "linkLocalDiscovery"

CONNECTING = "connecting"
ALIVE = "alive"
DEAD = "dead"

FIRST_RETRY = 1.0
MAX_RETRY = 5.0  # the reference rescans every 5 s
MAX_DISCOVERED_FAILURES = 3  # ref: MAX_FAILED_LOCAL_PEER_CONNECTION_ATTEMPTS
MAX_DISCOVERED = 64  # discovered peers held at once: forged beacons cannot fill memory
DIALLED = (STATIC, DISCOVERED)


@dataclass
class PeerEntry:
    endpoint: Endpoint
    kind: str
    discovered: float  # wall clock, for the API
    state: str = DEAD
    link_id: str | None = None
    tx_bytes: int = 0
    rx_bytes: int = 0
    last_connected: float | None = None  # wall clock
    next_dial: float = 0.0  # monotonic
    backoff: float = FIRST_RETRY
    failures: int = 0  # dials failed in a row (reset by a link)
    last_error: str = ""  # why the last dial failed (logged once per reason)

    def to_json(self, wall_now: float) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint.to_json(),
            "type": self.kind,
            "connectionState": self.state,
            "txBytes": self.tx_bytes,
            "rxBytes": self.rx_bytes,
            "discovered": int(wall_now - self.discovered),
            "lastConnected": None if self.last_connected is None else int(wall_now - self.last_connected),
        }


class PeerExists(Exception):
    """Adding an endpoint that is already known (API 409)."""


class PeerUnknown(Exception):
    """Removing an endpoint that is not known (API 404)."""


@dataclass
class PeerTable:
    entries: dict[str, PeerEntry] = field(default_factory=dict)  # keyed by str(endpoint)

    def add_static(self, ep: Endpoint, now: float) -> PeerEntry:
        key = str(ep)
        if key in self.entries:
            raise PeerExists(key)
        entry = self.entries[key] = PeerEntry(ep, STATIC, time.time(), next_dial=now)
        return entry

    def remove(self, ep: Endpoint) -> PeerEntry:
        entry = self.entries.pop(str(ep), None)
        if entry is None:
            raise PeerUnknown(str(ep))
        return entry

    def add_discovered(self, ep: Endpoint, now: float) -> str:
        """A peer a beacon named: "added", "known" (that address and protocol
        is already a peer, ref ``add_peer``) or "full" (counted by the shell)."""
        if any(e.endpoint == ep for e in self.entries.values()):
            return "known"
        if sum(1 for e in self.entries.values() if e.kind == DISCOVERED) >= MAX_DISCOVERED:
            return "full"
        self.entries[str(ep)] = PeerEntry(ep, DISCOVERED, time.time(), next_dial=now)
        return "added"

    def add_inbound(self, ep: Endpoint, link_id: str) -> PeerEntry:
        entry = self.entries[str(ep)] = PeerEntry(ep, INBOUND, time.time(), state=ALIVE, link_id=link_id)
        entry.last_connected = time.time()
        return entry

    def static_endpoints(self) -> list[str]:
        return [k for k, e in self.entries.items() if e.kind == STATIC]

    def due_dials(self, now: float) -> list[PeerEntry]:
        """Static and discovered peers that are down and whose retry time has come; marks them connecting."""
        due = []
        for entry in self.entries.values():
            if entry.kind in DIALLED and entry.state == DEAD and entry.next_dial <= now:
                entry.state = CONNECTING
                due.append(entry)
        return due

    def next_dial_time(self) -> float | None:
        times = [e.next_dial for e in self.entries.values() if e.kind in DIALLED and e.state == DEAD]
        return min(times) if times else None

    def connected(self, entry: PeerEntry, link_id: str) -> None:
        entry.state = ALIVE
        entry.link_id = link_id
        entry.last_connected = time.time()
        entry.backoff = FIRST_RETRY
        entry.failures = 0
        entry.last_error = ""

    def dial_failed(self, entry: PeerEntry, now: float) -> bool:
        """Back off; a discovered peer that failed 3 times in a row is
        forgotten (returns True), as the reference does."""
        entry.state = DEAD
        entry.next_dial = now + entry.backoff
        entry.backoff = min(entry.backoff * 2, MAX_RETRY)
        entry.failures += 1
        if entry.kind == DISCOVERED and entry.failures >= MAX_DISCOVERED_FAILURES:
            self.entries.pop(str(entry.endpoint), None)
            return True
        return False

    def disconnected(self, link_id: str, now: float) -> None:
        for key, entry in list(self.entries.items()):
            if entry.link_id != link_id:
                continue
            entry.link_id = None
            if entry.kind == INBOUND:
                del self.entries[key]  # inbound peers are never redialled
            else:
                entry.state = DEAD
                entry.next_dial = now + FIRST_RETRY
                entry.backoff = FIRST_RETRY

    def by_link(self, link_id: str) -> PeerEntry | None:
        for entry in self.entries.values():
            if entry.link_id == link_id:
                return entry
        return None
