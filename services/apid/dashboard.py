"""The ops dashboard at ``/dashboard`` on the API address.

One page (static/dashboard.html, .css, .js, all served from the package:
no CDN, the node may have no internet) that polls ``/dashboard/api/state``
once a second and redraws in place: the services' health, uptime and
restarts; peers with state, link cost and traffic rates; packet, byte and
drop rates as small time-series charts; the selected routes.
"""

from __future__ import annotations

import json
import time
from functools import cache
from importlib import resources
from typing import Any

from flask import Flask, Response

from common.nodeconfig import NodeConfig
from common.programs import programs

from .core import NodeApi, Unavailable
from .stats import Sampler, StatsCollector, is_drop_counter, numeric, peer_key

STATIC = {
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}
MAX_ROUTES_SHOWN = 500
SERIES_POINTS = 120


def expected_services(cfg: NodeConfig) -> tuple[str, ...]:
    """The programs this node runs (a peerd per transport family)."""
    return tuple(name for name, _module, _prio in programs(cfg))


@cache
def asset(name: str) -> bytes:
    return resources.files("services.apid").joinpath(f"static/{name}").read_bytes()


def _remote_of(link_name: str) -> str:
    return link_name.rsplit(" <-> ", 1)[-1] if " <-> " in link_name else link_name.split(" -> ", 1)[-1]


def state(api: NodeApi, stats: StatsCollector | None, sampler: Sampler | None) -> dict[str, Any]:
    now = time.time()
    errors: list[str] = []
    if sampler is not None:
        peers, _when = sampler.latest_peers()
    else:
        try:
            peers = api.peers_raw()
        except Unavailable as exc:
            peers = []
            errors.append(str(exc))
    try:
        costs = {_remote_of(name): cost for name, cost in api.link_costs().items()}
    except Unavailable as exc:
        costs = {}
        errors.append(str(exc))
    peer_rows = []
    for p in peers:
        ep = p.get("endpoint") or {}
        sock = (ep.get("addr") or {}).get("socket")
        peer_rows.append(
            {
                "endpoint": peer_key(p),
                "proto": ep.get("proto"),
                "type": p.get("type"),
                "state": p.get("connectionState"),
                "cost": costs.get(sock) if sock else None,
                "rxBytes": p.get("rxBytes"),
                "txBytes": p.get("txBytes"),
                "rxRate": p.get("rxRate", 0),
                "txRate": p.get("txRate", 0),
                "lastConnected": p.get("lastConnected"),
            }
        )
    try:
        selected = api.selected_routes()
    except Unavailable as exc:
        selected = []
        errors.append(str(exc))
    selected.sort(key=lambda r: str(r.get("subnet")))
    drops = []
    snapshot = stats.snapshot() if stats else {}
    for service, fields in snapshot.items():
        for name, value in (fields.get("counters") or {}).items():
            if numeric(value) and value and is_drop_counter(name):
                drops.append({"service": service, "reason": name, "count": value})
    drops.sort(key=lambda d: -d["count"])
    return {
        "now": now,
        "node": api.info(),
        "services": stats.services(expected_services(api.cfg), now) if stats else [],
        "peers": peer_rows,
        "routes": {"total": len(selected), "selected": selected[:MAX_ROUTES_SHOWN]},
        "series": sampler.recent(SERIES_POINTS) if sampler else [],
        "drops": drops[:20],
        "errors": errors,
    }


def register_dashboard(app: Flask, api: NodeApi, stats: StatsCollector | None, sampler: Sampler | None) -> None:
    @app.get("/dashboard")
    def dashboard_page() -> Response:
        return Response(asset("dashboard.html"), mimetype="text/html", headers={"Cache-Control": "no-cache"})

    @app.get("/dashboard/static/<name>")
    def dashboard_asset(name: str) -> Response:
        mimetype = STATIC.get(name)
        if mimetype is None:
            return Response(json.dumps({"error": "no such file"}), 404, mimetype="application/json")
        return Response(asset(name), mimetype=mimetype, headers={"Cache-Control": "no-cache"})

    @app.get("/dashboard/api/state")
    def dashboard_state() -> Response:
        return Response(
            json.dumps(state(api, stats, sampler), separators=(",", ":")),
            mimetype="application/json",
            headers={"Cache-Control": "no-store"},
        )
