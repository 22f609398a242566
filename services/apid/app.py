"""The HTTP API (reference paths and JSON shapes, API.md section 2).

Handlers ask the owning service over the bus and never hold a node-wide
lock, so one slow call cannot stall the others (the reference's locking
quirk, API.md 2.7, is deliberately not copied).
"""

from __future__ import annotations

import ipaddress
import threading
import time
from typing import Any
from urllib.parse import unquote

import msgpack
import zmq
from flask import Flask, Response, jsonify, request

from common import bus
from common.identity import Identity
from common.nodeconfig import NodeConfig

PEERD_FAMILIES = ("tcp",)


class StatsCollector:
    """Latest stats message of every service, fed by a SUB socket thread."""

    def __init__(self, ctx: zmq.Context, run_dir: str) -> None:
        self.latest: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.sock = bus.bind(ctx, zmq.SUB, run_dir, "stats", hwm=1000)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.thread = threading.Thread(target=self._run, name="stats", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                msg = bus.unpack(self.sock.recv_multipart())
            except (bus.BusError, msgpack.UnpackException):
                continue
            except zmq.ZMQError:
                return
            service = msg.fields.get("service")
            if isinstance(service, str):
                msg.fields["received"] = time.time()
                with self.lock:
                    self.latest[service] = msg.fields

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            return {k: dict(v) for k, v in self.latest.items()}


def create_app(cfg: NodeConfig, identity: Identity, ctx: zmq.Context, stats: StatsCollector | None) -> Flask:
    app = Flask("mycelium-api")
    run = cfg.run_dir

    def call(service: str, method: str, params: dict[str, Any] | None = None) -> Any:
        return bus.rpc_call(ctx, run, service, method, params)

    @app.errorhandler(bus.BusError)
    def bus_down(exc: bus.BusError) -> tuple[Response, int]:
        return jsonify({"error": str(exc)}), 503

    @app.get("/api/v1/admin")
    def info() -> Response:
        return jsonify(
            {
                "nodeSubnet": str(identity.subnet),
                "nodeIp": str(identity.address),
                "nodePubkey": identity.public_key.hex(),
                "nodeStartTime": cfg.start_time,
            }
        )

    @app.get("/api/v1/admin/peers")
    def peers() -> Response:
        out: list[Any] = []
        for fam in PEERD_FAMILIES:
            out.extend(call(bus.peerd_name(fam), "list_peers"))
        return jsonify(out)

    def peer_call(method: str, endpoint: str) -> Response | tuple[str, int]:
        proto = endpoint.split("://", 1)[0].lower() if "://" in endpoint else ""
        family = proto if proto in PEERD_FAMILIES else PEERD_FAMILIES[0]
        result = call(bus.peerd_name(family), method, {"endpoint": endpoint})
        error = result.get("error") if isinstance(result, dict) else None
        if error is None:
            return Response(status=204)
        status = {"parse": 400, "exists": 409, "unknown": 404}.get(error, 500)
        return result.get("message", error), status

    @app.post("/api/v1/admin/peers")
    def add_peer() -> Response | tuple[str, int]:
        body = request.get_json(silent=True)
        if body is None:
            return "Failed to parse the request body as JSON", 400
        if not isinstance(body, dict) or not isinstance(body.get("endpoint"), str):
            return "Failed to deserialize the JSON body: missing field `endpoint`", 422
        return peer_call("add_peer", body["endpoint"])

    @app.delete("/api/v1/admin/peers/<path:endpoint>")
    def remove_peer(endpoint: str) -> Response | tuple[str, int]:
        return peer_call("remove_peer", unquote(endpoint))

    @app.get("/api/v1/admin/routes/selected")
    def routes_selected() -> Response:
        return jsonify(call("router", "routes_selected"))

    @app.get("/api/v1/admin/routes/fallback")
    def routes_fallback() -> Response:
        return jsonify(call("router", "routes_fallback"))

    @app.get("/api/v1/admin/routes/queried")
    def routes_queried() -> Response:
        return jsonify(call("router", "routes_queried"))

    @app.get("/api/v1/pubkey/<ip>")
    def pubkey(ip: str) -> Response | tuple[str, int]:
        try:
            addr = ipaddress.IPv6Address(ip)
        except ValueError:
            return f"Invalid IP address {ip!r}", 400
        key = call("router", "pubkey", {"addr": addr.packed})
        if key is None:
            return Response(status=404)
        return jsonify({"publicKey": key})

    @app.get("/api/v1/admin/services")
    def services() -> Response:
        """Our extension: each service's latest counters, gauges, pid and uptime."""
        return jsonify(stats.snapshot() if stats else {})

    return app
