"""peerd's peer API (list / add / remove, API.md 2.1) and the static peers'
persistence (hard state: ``<run_dir>/peers-<family>.json``, one file per
peerd process so two never rewrite the same file; rewritten atomically).

Sans-IO apart from the one file: a request in, its JSON-able answer out,
plus the link to close when a connected peer is removed.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from common.endpoint import Endpoint, EndpointError

from .links.base import LinkStats
from .peer_table import PeerExists, PeerTable, PeerUnknown

LEGACY_FILE = "peers.json"


def peers_file(run_dir: str, family: str) -> Path:
    return Path(run_dir) / f"peers-{family}.json"


class PeerApi:
    """The peers a peerd serves (endpoints of its protocols) and their file."""

    def __init__(self, table: PeerTable, path: Path, protocols: Iterable[str]) -> None:
        self.table = table
        self.path = path
        self.protocols = tuple(protocols)

    # --- persistence ------------------------------------------------------

    def load(self, configured: list[str]) -> list[str]:
        """The static peers to start with: the saved list (the API may have
        changed it since start-up; before one file per family it was
        ``peers.json``), else the configured ones."""
        for path in (self.path, self.path.with_name(LEGACY_FILE)):
            try:
                saved = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(saved, list):
                return [p for p in saved if isinstance(p, str)]
        return list(configured)

    def save(self) -> None:
        """Write the static peers (after every change)."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.table.static_endpoints()))
        os.replace(tmp, self.path)

    def add_saved(self, texts: list[str], now: float) -> list[str]:
        """Add the static peers of our protocols; the endpoints skipped (not ours or invalid)."""
        skipped = []
        for text in texts:
            try:
                ep = Endpoint.parse(text)
            except EndpointError:
                skipped.append(text)
                continue
            if ep.proto not in self.protocols:
                skipped.append(text)
                continue
            try:
                self.table.add_static(ep, now)
            except PeerExists:
                pass
        return skipped

    # --- requests ---------------------------------------------------------

    def list_peers(self, live: Callable[[str], LinkStats | None]) -> list[dict[str, Any]]:
        """PeerStats for every peer; ``live(link_id)`` gives a connected
        peer's link counters (added to what earlier links carried)."""
        now = time.time()
        out = []
        for entry in self.table.entries.values():
            row = entry.to_json(now)
            stats = live(entry.link_id) if entry.link_id else None
            if stats is not None:
                row["txBytes"] += stats.tx_bytes
                row["rxBytes"] += stats.rx_bytes
            out.append(row)
        return out

    def add_or_remove(self, method: str, params: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        """``add_peer`` / ``remove_peer``: the answer, and the link id to close (if any)."""
        try:
            ep = Endpoint.parse(str(params.get("endpoint", "")))
        except EndpointError as exc:
            return {"error": "parse", "message": str(exc)}, None
        if ep.proto not in self.protocols:
            hint = " (tls:// needs a private network: --network-name)" if ep.proto == "tls" else ""
            return {"error": "parse", "message": f"this node has no {ep.proto} transport{hint}"}, None
        close = None
        if method == "add_peer":
            try:
                self.table.add_static(ep, time.monotonic())
            except PeerExists:
                return {"error": "exists", "message": "A peer identified by that endpoint already exists"}, None
        else:
            try:
                entry = self.table.remove(ep)
            except PeerUnknown:
                return {"error": "unknown", "message": "A peer identified by that endpoint does not exist"}, None
            close = entry.link_id
        self.save()
        return {"ok": True}, close
