"""One implementation of every API operation, shared by the HTTP API
(app.py) and the JSON-RPC server (rpc.py).

An operation answers with plain JSON values or raises ``ApiError``, which
carries both renderings of the failure: the HTTP status (and body kind) and
the JSON-RPC error code the reference uses for it (API.md sections 2 and 3).
Operations ask the owning service over the bus; they never hold a
node-wide lock (API.md 2.7 is deliberately not copied).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common import bus
from common.identity import Identity
from common.nodeconfig import NodeConfig
from common.wire.rules import is_overlay_address

# keys of the reference's PeerStats; anything else a peerd adds (per-peer
# packet counts for the metrics, say) is kept out of the API answers
PEER_STATS_KEYS = ("endpoint", "type", "connectionState", "txBytes", "rxBytes", "discovered", "lastConnected")

# JSON-RPC error codes of the reference (API.md section 3)
RPC_PARSE_ERROR = -32700
RPC_INVALID_REQUEST = -32600
RPC_METHOD_NOT_FOUND = -32601
RPC_INVALID_PARAMS = -32602
RPC_INTERNAL_ERROR = -32603
RPC_BAD_IP = -32007
RPC_PUBKEY_NOT_FOUND = -32008
RPC_ADD_PEER_PARSE = -32009
RPC_PEER_EXISTS = -32010
RPC_PEER_NOT_FOUND = -32011
RPC_DELETE_PEER_PARSE = -32012

Call = Callable[[str, str, "dict[str, Any] | None"], Any]


LIST_TIMEOUT_MS = 15_000  # route listings (see NodeApi._list)


class ApiError(Exception):
    """A failed operation. ``body`` is how HTTP renders it: "text" (the
    reference's short text body), "json" ({"error": message}) or "empty"."""

    def __init__(self, http_status: int, rpc_code: int, message: str, body: str = "json") -> None:
        super().__init__(message)
        self.http_status = http_status
        self.rpc_code = rpc_code
        self.message = message
        self.body = body


class Unavailable(ApiError):
    """The service that owns the answer did not reply (it is restarting)."""

    def __init__(self, message: str) -> None:
        super().__init__(503, RPC_INTERNAL_ERROR, message, "json")


def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Rust's ``IpAddr::from_str``: IPv4 or IPv6, no zone id, no spaces."""
    if not isinstance(text, str) or "%" in text or text != text.strip() or not text:
        raise ValueError(f"invalid IP address syntax: {text!r}")
    return ipaddress.ip_address(text)


@dataclass
class NodeApi:
    """The operations of API.md 2.1 / 3 that this node serves."""

    cfg: NodeConfig
    identity: Identity
    call: Call

    def _call(
        self, service: str, method: str, params: dict[str, Any] | None = None, timeout_ms: int | None = None
    ) -> Any:
        try:
            if timeout_ms is None:
                return self.call(service, method, params)
            return self.call(service, method, params, timeout_ms=timeout_ms)  # type: ignore[call-arg]
        except bus.BusError as exc:
            raise Unavailable(str(exc)) from exc

    # --- admin ---------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {
            "nodeSubnet": str(self.identity.subnet),
            "nodeIp": str(self.identity.address),
            "nodePubkey": self.identity.public_key.hex(),
            "nodeStartTime": self.cfg.start_time,
        }

    def peers_raw(self) -> list[dict[str, Any]]:
        """Every peerd's list, with whatever extra keys the peerd reports; a
        peerd that is restarting is left out (503 only if none answers)."""
        out: list[dict[str, Any]] = []
        missing: Unavailable | None = None
        answered = 0
        for fam in self.cfg.peerd_families:
            try:
                listed = self._call(bus.peerd_name(fam), "list_peers")
            except Unavailable as exc:
                missing = exc
                continue
            answered += 1
            if isinstance(listed, list):
                out.extend(p for p in listed if isinstance(p, dict))
        if missing is not None and not answered:
            raise missing
        return out

    def peers(self) -> list[dict[str, Any]]:
        return [{k: p.get(k) for k in PEER_STATS_KEYS} for p in self.peers_raw()]

    def _peer_call(self, method: str, endpoint: str, parse_code: int) -> None:
        proto = endpoint.split("://", 1)[0].lower() if "://" in endpoint else ""
        family = self.cfg.family_of_proto(proto) or next(iter(self.cfg.peerd_families), "tcp")
        result = self._call(bus.peerd_name(family), method, {"endpoint": endpoint})
        error = result.get("error") if isinstance(result, dict) else "bad reply"
        if error is None:
            return
        message = str(result.get("message", error)) if isinstance(result, dict) else str(error)
        if error == "parse":
            raise ApiError(400, parse_code, message, "text")
        if error == "exists":
            raise ApiError(409, RPC_PEER_EXISTS, message, "text")
        if error == "unknown":
            raise ApiError(404, RPC_PEER_NOT_FOUND, message, "text")
        raise ApiError(500, RPC_INTERNAL_ERROR, f"{bus.peerd_name(family)}: {message}")

    def add_peer(self, endpoint: str) -> None:
        self._peer_call("add_peer", endpoint, RPC_ADD_PEER_PARSE)

    def delete_peer(self, endpoint: str) -> None:
        self._peer_call("remove_peer", endpoint, RPC_DELETE_PEER_PARSE)

    # --- routes --------------------------------------------------------------

    def _list(self, method: str) -> list[Any]:
        # A public node lists ~100k routes: building that takes the router
        # longer than a plain call may wait, and a busy node is not a dead one.
        result = self._call("router", method, timeout_ms=LIST_TIMEOUT_MS)
        return result if isinstance(result, list) else []

    def selected_routes(self) -> list[dict[str, Any]]:
        return self._list("routes_selected")

    def fallback_routes(self) -> list[dict[str, Any]]:
        return self._list("routes_fallback")

    def queried_subnets(self) -> list[dict[str, Any]]:
        return self._list("routes_queried")

    def packet_statistics(self) -> dict[str, list[dict[str, Any]]]:
        """Merged over the peerds, which see every data packet (originated,
        forwarded, delivered). A peerd without ``packet_stats`` counts nothing."""
        by_source: dict[str, list[int]] = {}
        by_destination: dict[str, list[int]] = {}
        for fam in self.cfg.peerd_families:
            try:
                result = self._call(bus.peerd_name(fam), "packet_stats")
            except Unavailable:
                continue  # restarting: its counts come back with it
            if not isinstance(result, dict) or "error" in result:
                continue
            for key, table in (("bySource", by_source), ("byDestination", by_destination)):
                for entry in result.get(key) or []:
                    if not isinstance(entry, dict) or not isinstance(entry.get("ip"), str):
                        continue
                    counts = table.setdefault(entry["ip"], [0, 0])
                    counts[0] += int(entry.get("packetCount", 0))
                    counts[1] += int(entry.get("byteCount", 0))

        def rows(table: dict[str, list[int]]) -> list[dict[str, Any]]:
            return [{"ip": ip, "packetCount": n, "byteCount": b} for ip, (n, b) in table.items()]

        return {"bySource": rows(by_source), "byDestination": rows(by_destination)}

    def link_costs(self) -> dict[str, int]:
        """The router's link cost of each live link, by link name ("TCP a <-> b")."""
        result = self._call("router", "peers")
        out: dict[str, int] = {}
        for p in result if isinstance(result, list) else []:
            if isinstance(p, dict) and isinstance(p.get("linkName"), str) and isinstance(p.get("cost"), int):
                out[p["linkName"]] = p["cost"]
        return out

    # --- keys ----------------------------------------------------------------

    def pubkey_from_ip(self, text: str) -> str:
        """Longest-prefix lookup; a miss inside the overlay also starts a route
        query (docs/ARCHITECTURE.md), one outside 400::/7 is simply not found."""
        try:
            ip = parse_ip(text)
        except ValueError as exc:
            raise ApiError(400, RPC_BAD_IP, str(exc)) from exc
        if not is_overlay_address(ip):
            raise ApiError(404, RPC_PUBKEY_NOT_FOUND, f"{ip} is not an overlay address (400::/7)", "empty")
        key = self._call("router", "pubkey", {"addr": ip.packed})
        if not isinstance(key, str):
            raise ApiError(404, RPC_PUBKEY_NOT_FOUND, f"no route covers {ip}", "empty")
        return key
