"""The SOCKS5 proxy operations (API.md 2.2 and the proxy methods of section
3), one implementation for HTTP and JSON-RPC, carried out by proxyd over
the bus (``proxyd.rpc``)."""

from __future__ import annotations

from typing import Any

from flask import Response

from common import bus, wake
from common.endpoint import EndpointError, parse_socket_address

from . import rpc
from .app import empty, json_body, json_response
from .context import ApiContext
from .core import RPC_INTERNAL_ERROR, ApiError, Unavailable

RPC_PROXY_CONNECT = -32032  # the reference's code for any failed connectProxy
CONNECT_TIMEOUT_MS = 15_000  # proxyd may race greetings for up to 5 s, then bind
SERVICE = "proxyd"


def remote_param(value: Any) -> str:
    """JSON-RPC ``remote``: a string that deserialises as a SocketAddr."""
    text = rpc.string(value)
    try:
        parse_socket_address(text)
    except EndpointError as exc:
        raise rpc.ParamError(f"invalid socket address syntax: {exc}") from exc
    return text


def _connect_shape(value: Any) -> str | None:
    if not isinstance(value, dict):
        return "invalid type: expected struct ConnectProxyInput"
    remote = value.get("remote")
    if remote is None:
        return None
    try:
        parse_socket_address(remote)
    except EndpointError:
        return "remote: invalid socket address syntax"
    return None


class ProxyApi:
    def __init__(self, ctx: ApiContext) -> None:
        self.call = ctx.call
        self.run_dir = ctx.cfg.run_dir

    def _ask(self, method: str, params: dict[str, Any] | None = None, timeout_ms: int = bus.RPC_TIMEOUT_MS) -> Any:
        # proxyd starts on its first request (common/wake.py); asking again
        # while it runs costs supervisord a state check, and the request
        # waits on proxyd's socket until it is up
        wake.wake(self.run_dir, SERVICE)
        try:
            return self.call(SERVICE, method, params, timeout_ms=timeout_ms)  # type: ignore[call-arg]
        except bus.BusError as exc:
            raise Unavailable(str(exc)) from exc

    def proxies(self) -> list[str]:
        result = self._ask("list")
        return [a for a in result if isinstance(a, str)] if isinstance(result, list) else []

    def connect(self, remote: str | None) -> str:
        """The chosen remote as ``[ip]:port``; 404 / -32032 when none is valid or the bind failed."""
        result = self._ask("connect", {"remote": remote}, CONNECT_TIMEOUT_MS)
        if isinstance(result, dict) and isinstance(result.get("remote"), str):
            return str(result["remote"])
        message = str(result.get("message", "bad reply")) if isinstance(result, dict) else "bad reply"
        if isinstance(result, dict) and result.get("error") in ("none", "bind", "parse"):
            raise ApiError(404, RPC_PROXY_CONNECT, message, "empty")
        raise ApiError(500, RPC_INTERNAL_ERROR, f"{SERVICE}: {message}")

    def disconnect(self) -> bool:
        self._ask("disconnect")
        return True

    def start_probe(self) -> bool:
        self._ask("probe_start")
        return True

    def stop_probe(self) -> bool:
        self._ask("probe_stop")
        return True


def register(ctx: ApiContext) -> None:
    impl = ProxyApi(ctx)
    app = ctx.http

    @app.get("/api/v1/admin/proxy")
    def list_proxies() -> Response:
        return json_response(impl.proxies())

    @app.post("/api/v1/admin/proxy")
    def connect_proxy() -> Response:
        body = json_body(_connect_shape)
        return json_response(impl.connect(body.get("remote")))

    @app.delete("/api/v1/admin/proxy")
    def disconnect_proxy() -> Response:
        impl.disconnect()
        return empty(204)

    @app.get("/api/v1/admin/proxy/probe")
    def start_probe() -> Response:
        impl.start_probe()
        return empty(204)

    @app.delete("/api/v1/admin/proxy/probe")
    def stop_probe() -> Response:
        impl.stop_probe()
        return empty(204)

    ctx.rpc.add("getProxies", impl.proxies)
    ctx.rpc.add("connectProxy", impl.connect, rpc.Param("remote", remote_param, required=False))
    ctx.rpc.add("disconnectProxy", impl.disconnect)
    ctx.rpc.add("startProxyProbe", impl.start_probe)
    ctx.rpc.add("stopProxyProbe", impl.stop_probe)
