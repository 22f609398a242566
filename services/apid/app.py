"""The HTTP API (reference paths, JSON shapes and status codes, API.md
section 2), plus our extension ``GET /api/v1/admin/services`` and the ops
dashboard.

Handlers are thin: they read the request the way the reference's axum
extractors do (``json_body``, path parameters) and call ``core.NodeApi``,
the implementation the JSON-RPC server shares. Failures are ``ApiError``s,
rendered with the reference's status; bodies of bad-input errors are JSON
``{"error": "..."}`` except where the reference documents a text body
(the peer endpoints' 400/404/409).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException
from werkzeug.routing import PathConverter

from .core import ApiError, NodeApi
from .stats import Sampler, StatsCollector

log = logging.getLogger("apid.http")

__all__ = ["ApiError", "StatsCollector", "create_app", "json_body", "render_error"]


def render_error(exc: ApiError) -> Response:
    if exc.body == "text":
        return Response(exc.message, status=exc.http_status, mimetype="text/plain")
    if exc.body == "empty":
        return empty(exc.http_status)
    return json_response({"error": exc.message}, exc.http_status)


def empty(status: int) -> Response:
    """A response without a body (and so without a content type)."""
    response = Response(b"", status=status)
    del response.headers["Content-Type"]
    return response


def json_response(value: Any, status: int = 200) -> Response:
    return Response(json.dumps(value, separators=(",", ":")), status=status, mimetype="application/json")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def json_body(check: Callable[[Any], str | None] | None = None) -> Any:
    """The request body as JSON, the way axum's ``Json`` extractor takes it:
    415 without a JSON content type, 400 for bytes that are not JSON, 422 when
    ``check`` (returning a reason, or None if the value fits) rejects it.
    Unknown object fields are ignored, as serde does by default."""
    mimetype = request.mimetype or ""
    if not (mimetype == "application/json" or (mimetype.startswith("application/") and mimetype.endswith("+json"))):
        raise ApiError(415, 0, "Expected request with `Content-Type: application/json`")
    raw = request.get_data(cache=False)
    try:
        # UTF-8 only, as serde_json reads it (json.loads would sniff UTF-16/32 in bytes)
        value = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ApiError(400, 0, f"Failed to parse the request body as JSON: {exc}") from exc
    if check is not None:
        reason = check(value)
        if reason is not None:
            raise ApiError(422, 0, f"Failed to deserialize the JSON body into the target type: {reason}")
    return value


def _add_peer_shape(value: Any) -> str | None:
    if not isinstance(value, dict):
        return "invalid type: expected struct AddPeer"
    if "endpoint" not in value:
        return "missing field `endpoint`"
    if not isinstance(value["endpoint"], str):
        return "endpoint: invalid type, expected a string"
    return None


class AnyPathConverter(PathConverter):
    """Everything to the end of the path, newlines and slashes included: the
    reference hands any (percent-decoded) segment to its endpoint parser."""

    regex = r"[\s\S]+"
    part_isolating = False  # werkzeug would infer True: the regex names no "/"


def create_app(
    api: NodeApi,
    stats: StatsCollector | None = None,
    sampler: Sampler | None = None,
    dashboard: bool = True,
) -> Flask:
    app = Flask("mycelium-api")
    app.json = DefaultJSONProvider(app)  # what Flask uses by default, typed so its options are visible
    app.json.sort_keys = False
    app.json.compact = True
    # a peer endpoint in the path (tcp://...) has a double slash of its own
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = False
    app.url_map.converters["anypath"] = AnyPathConverter

    @app.errorhandler(ApiError)
    def api_error(exc: ApiError) -> Response:
        return render_error(exc)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        response = json_response({"error": exc.description or exc.name}, exc.code or 500)
        for key, value in exc.get_headers():
            if key.lower() == "allow":
                response.headers[key] = value
        return response

    @app.errorhandler(Exception)
    def crashed(exc: Exception) -> Response:
        log.exception("%s %s failed", request.method, request.path)
        return json_response({"error": "internal error"}, 500)

    # --- admin (API.md 2.1) -------------------------------------------------------

    @app.get("/api/v1/admin")
    def info() -> Response:
        return json_response(api.info())

    @app.get("/api/v1/admin/peers")
    def peers() -> Response:
        return json_response(api.peers())

    @app.post("/api/v1/admin/peers")
    def add_peer() -> Response:
        body = json_body(_add_peer_shape)
        api.add_peer(body["endpoint"])
        return empty(204)

    @app.delete("/api/v1/admin/peers/<anypath:endpoint>")
    def delete_peer(endpoint: str) -> Response:
        api.delete_peer(endpoint)
        return empty(204)

    @app.get("/api/v1/admin/routes/selected")
    def routes_selected() -> Response:
        return json_response(api.selected_routes())

    @app.get("/api/v1/admin/routes/fallback")
    def routes_fallback() -> Response:
        return json_response(api.fallback_routes())

    @app.get("/api/v1/admin/routes/queried")
    def routes_queried() -> Response:
        return json_response(api.queried_subnets())

    @app.get("/api/v1/admin/stats/packets")
    def packet_stats() -> Response:
        return json_response(api.packet_statistics())

    @app.get("/api/v1/pubkey/<ip>")
    def pubkey(ip: str) -> Response:
        return json_response({"publicKey": api.pubkey_from_ip(ip)})

    # --- our extensions -----------------------------------------------------------

    @app.get("/api/v1/admin/services")
    def services() -> Response:
        """Each service's latest counters, gauges, pid and start time."""
        return json_response(stats.snapshot() if stats else {})

    if dashboard:
        from .dashboard import register_dashboard

        register_dashboard(app, api, stats, sampler)

    return app
