"""Security extensions in the API (docs/EXTENSIONS.md 7): the inbound
firewall (show, reload) and the session-key state per peer. Each HTTP
route and its JSON-RPC method call one implementation, which asks tund."""

from __future__ import annotations

import json
from typing import Any

from flask import Response

from common import bus

from .context import ApiContext
from .core import RPC_INTERNAL_ERROR, ApiError, Call, Unavailable

RPC_FIREWALL_REJECTED = -32010  # a rule file that cannot be used (old rules kept)


class Security:
    def __init__(self, call: Call) -> None:
        self.call = call

    def _tund(self, method: str) -> Any:
        try:
            return self.call("tund", method, None)
        except bus.BusError as exc:
            raise Unavailable(str(exc)) from exc

    def firewall(self) -> dict[str, Any]:
        return dict(self._tund("firewall"))

    def reload_firewall(self) -> dict[str, Any]:
        """``{ok, error, firewall}``; a rejected file is ``ok: false`` with its
        one-line error (JSON-RPC's custom error codes carry no text)."""
        return dict(self._tund("firewall_reload"))

    def sessions(self) -> list[dict[str, Any]]:
        result = self._tund("sessions")
        if not isinstance(result, list):
            raise ApiError(500, RPC_INTERNAL_ERROR, "tund answered sessions with something else")
        return result


def register(ctx: ApiContext) -> None:
    impl = Security(ctx.call)
    http = ctx.http

    def json_response(value: Any) -> Response:
        return Response(json.dumps(value), status=200, mimetype="application/json")

    @http.get("/api/v1/admin/firewall")
    def get_firewall() -> Response:
        return json_response(impl.firewall())

    @http.post("/api/v1/admin/firewall/reload")
    def reload_firewall() -> Response:
        result = impl.reload_firewall()
        if not result.get("ok"):
            raise ApiError(422, RPC_FIREWALL_REJECTED, f"firewall rules not reloaded: {result.get('error')}")
        return json_response(result)

    @http.get("/api/v1/admin/sessions")
    def get_sessions() -> Response:
        return json_response(impl.sessions())

    ctx.rpc.add("getFirewall", impl.firewall)
    ctx.rpc.add("reloadFirewall", impl.reload_firewall)
    ctx.rpc.add("getSessions", impl.sessions)
