"""JSON-RPC 2.0 (API.md section 3): the reference's method names, params
(positional or by name), error codes, batches and ``rpc.discover``.

``RpcRegistry`` maps a method name to a function and its parameter list;
the functions are thin adapters over ``core.NodeApi``, the same code the
HTTP handlers call. Anything a client sends ends in a JSON-RPC answer (or,
for notifications, none); nothing raises out of ``dispatch``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from flask import Flask, Response, request
from flask.json.provider import DefaultJSONProvider

from .core import (
    RPC_INTERNAL_ERROR,
    RPC_INVALID_PARAMS,
    RPC_INVALID_REQUEST,
    RPC_METHOD_NOT_FOUND,
    RPC_PARSE_ERROR,
    ApiError,
    NodeApi,
)

log = logging.getLogger("apid.rpc")

MAX_BATCH = 1000
MAX_WS_FRAME = 2 * 1024 * 1024  # a WebSocket request, as the HTTP body limit
U64_MAX = (1 << 64) - 1
# jsonrpsee's texts for the standard codes; custom codes all read "Server error"
MESSAGES = {
    RPC_PARSE_ERROR: "Parse error",
    RPC_INVALID_REQUEST: "Invalid request",
    RPC_METHOD_NOT_FOUND: "Method not found",
    RPC_INVALID_PARAMS: "Invalid params",
    RPC_INTERNAL_ERROR: "Internal error",
}
_MISSING = object()


class ParamError(Exception):
    """A parameter that does not deserialise into the method's type (-32602)."""


# --- parameter types (what serde would accept for the Rust parameter) -------


def string(value: Any) -> str:
    if not isinstance(value, str):
        raise ParamError(f"invalid type: {_kind(value)}, expected a string")
    return value


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ParamError(f"invalid type: {_kind(value)}, expected a boolean")
    return value


def u64(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= U64_MAX:
        raise ParamError(f"invalid value: {_kind(value)}, expected u64")
    return value


def obj(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ParamError(f"invalid type: {_kind(value)}, expected a map")
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{str(value).lower()}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value}`"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "sequence"
    return "map"


@dataclass
class Param:
    name: str
    convert: Callable[[Any], Any]
    required: bool = True
    aliases: tuple[str, ...] = ()  # names also accepted in by-name calls


@dataclass
class Method:
    name: str
    fn: Callable[..., Any]
    params: list[Param] = field(default_factory=list)


class RpcRegistry:
    def __init__(self) -> None:
        self.methods: dict[str, Method] = {}

    def add(self, name: str, fn: Callable[..., Any], *params: Param) -> None:
        if name in self.methods:
            raise ValueError(f"JSON-RPC method {name} registered twice")
        self.methods[name] = Method(name, fn, list(params))

    # --- dispatch ------------------------------------------------------------

    def dispatch(self, body: bytes) -> Any:
        """The JSON value to answer with, or None for no answer at all."""
        doc, error = self.parse(body)
        if error is not None:
            return error
        if isinstance(doc, list):
            answers = [a for a in (self.handle(item) for item in doc) if a is not None]
            return answers or None
        return self.handle(doc)

    @staticmethod
    def parse(body: bytes) -> tuple[Any, dict[str, Any] | None]:
        """(request or batch, None), or (None, the error to answer) for what is not one."""
        try:
            doc = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)  # UTF-8 only, as serde
        except (ValueError, RecursionError, UnicodeDecodeError):
            return None, error_response(None, RPC_PARSE_ERROR)
        if isinstance(doc, list) and (not doc or len(doc) > MAX_BATCH):
            return None, error_response(None, RPC_INVALID_REQUEST)
        return doc, None

    def handle(self, req: Any) -> dict[str, Any] | None:
        if not isinstance(req, dict):
            return error_response(None, RPC_INVALID_REQUEST)
        rid = req.get("id", _MISSING)
        notification = rid is _MISSING
        if notification:
            rid = None
        elif not (rid is None or isinstance(rid, str) or (isinstance(rid, int) and not isinstance(rid, bool))):
            return error_response(None, RPC_INVALID_REQUEST)
        method_name = req.get("method")
        params = req.get("params")
        if (
            req.get("jsonrpc") != "2.0"
            or not isinstance(method_name, str)
            or not isinstance(params, list | dict | None)
        ):
            return None if notification else error_response(rid, RPC_INVALID_REQUEST)
        method = self.methods.get(method_name)
        if method is None:
            return None if notification else error_response(rid, RPC_METHOD_NOT_FOUND)
        try:
            args = bind(method, params)
            result = method.fn(*args)
        except ParamError as exc:
            return None if notification else error_response(rid, RPC_INVALID_PARAMS, str(exc))
        except ApiError as exc:
            if exc.rpc_code == RPC_INTERNAL_ERROR:
                return None if notification else error_response(rid, RPC_INTERNAL_ERROR, exc.message)
            return None if notification else error_response(rid, exc.rpc_code)
        except Exception:  # a bug must cost one answer, never the server
            log.exception("JSON-RPC method %s failed", method_name)
            return None if notification else error_response(rid, RPC_INTERNAL_ERROR)
        if notification:
            return None
        return {"jsonrpc": "2.0", "result": result, "id": rid}


def bind(method: Method, params: list[Any] | dict[str, Any] | None) -> list[Any]:
    """Positional or by-name params -> the function's arguments."""
    spec = method.params
    if not spec:
        return []  # the reference ignores params of parameterless methods
    values: list[Any]
    if params is None:
        values = [_MISSING] * len(spec)
    elif isinstance(params, list):
        if len(params) > len(spec):
            raise ParamError(f"expected at most {len(spec)} parameters, got {len(params)}")
        values = list(params) + [_MISSING] * (len(spec) - len(params))
    else:
        values = []
        for p in spec:
            value = params.get(p.name, _MISSING)
            for alias in p.aliases:
                if value is _MISSING:
                    value = params.get(alias, _MISSING)
            values.append(value)
    args: list[Any] = []
    for p, value in zip(spec, values, strict=True):
        if value is _MISSING or value is None:
            if p.required:
                raise ParamError(f"missing value for required argument `{p.name}`")
            args.append(None)
        else:
            args.append(p.convert(value))
    return args


def error_response(rid: Any, code: int, data: str | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": MESSAGES.get(code, "Server error")}
    if data is not None and code in (RPC_INVALID_PARAMS, RPC_INTERNAL_ERROR):
        err["data"] = data
    return {"jsonrpc": "2.0", "error": err, "id": rid}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


@cache
def openrpc_document() -> dict[str, Any]:
    """The reference's OpenRPC document, shipped as package data."""
    text = resources.files("services.apid").joinpath("data/openrpc.json").read_text(encoding="utf-8")
    return json.loads(text)


def register_node_methods(registry: RpcRegistry, api: NodeApi) -> None:
    """Admin, peer, route, statistics and discovery methods (API.md 3)."""

    def ok(fn: Callable[..., Any]) -> Callable[..., bool]:
        def wrapped(*args: Any) -> bool:
            fn(*args)
            return True

        return wrapped

    registry.add("getInfo", api.info)
    registry.add("getPublicKeyFromIp", api.pubkey_from_ip, Param("ip", string, aliases=("mycelium_ip",)))
    registry.add("getPeers", api.peers)
    registry.add("addPeer", ok(api.add_peer), Param("endpoint", string))
    registry.add("deletePeer", ok(api.delete_peer), Param("endpoint", string))
    registry.add("getSelectedRoutes", api.selected_routes)
    registry.add("getFallbackRoutes", api.fallback_routes)
    registry.add("getQueriedSubnets", api.queried_subnets)
    registry.add("getPacketStatistics", api.packet_statistics)
    registry.add("rpc.discover", openrpc_document)


def create_rpc_app(registry: RpcRegistry, max_body: int) -> Flask:
    """POST on ``/`` and ``/rpc`` (the reference does not look at the path)."""
    app = Flask("mycelium-jsonrpc")
    app.json = DefaultJSONProvider(app)
    app.json.sort_keys = False
    app.url_map.merge_slashes = False

    def answer() -> Response:
        if request.mimetype != "application/json":
            return Response(
                "Supplied content type is not allowed. Content-Type: application/json is required\n",
                status=415,
                mimetype="text/plain",
            )
        if (request.content_length or 0) > max_body:
            return Response("Request body too large\n", status=413, mimetype="text/plain")
        result = registry.dispatch(request.get_data(cache=False))
        if result is None:
            return Response(status=200)
        return Response(json.dumps(result, separators=(",", ":")), status=200, mimetype="application/json")

    app.add_url_rule("/", "root", answer, methods=["POST"])
    app.add_url_rule("/rpc", "rpc", answer, methods=["POST"])

    @app.errorhandler(404)
    @app.errorhandler(405)
    def not_here(exc: Any) -> Response:
        code = getattr(exc, "code", 404)
        return Response(json.dumps({"error": str(getattr(exc, "description", exc))}), code, mimetype="application/json")

    @app.errorhandler(Exception)
    def crashed(exc: Exception) -> Response:
        code = getattr(exc, "code", None)
        if isinstance(code, int):  # an HTTPException from werkzeug (e.g. 400 on a broken request)
            return Response(json.dumps({"error": str(exc)}), code, mimetype="application/json")
        log.exception("JSON-RPC server error")
        return Response(json.dumps(error_response(None, RPC_INTERNAL_ERROR)), 500, mimetype="application/json")

    return app
