"""apid: the HTTP API (``--api-addr``), the JSON-RPC server
(``--jsonrpc-addr``) and Prometheus metrics (``--metrics-api-address``),
each a waitress server (a production WSGI server) with its own threads, so
a burst on one cannot starve the others. All three share one ``NodeApi``
and the stats apid collects.

apid is off the data path: it only asks other services over the bus, so
killing it never affects forwarding. It runs at a lower CPU priority
(``NICENESS``) for the same reason: under API load the data path wins.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import zmq
from waitress import create_server

from common import bus
from common.identity import Identity, load_key_file
from common.lifecycle import start_service
from common.nodeconfig import NodeConfig
from common.options import OptionError, parse_socket_addr

from .app import create_app
from .core import NodeApi
from .dashboard import expected_services
from .extensions import ApiContext, register_all
from .messages import Messages
from .rpc import RpcRegistry, create_rpc_app, register_node_methods
from .stats import Sampler, StatsCollector
from .websocket import serve_rpc

log = logging.getLogger("apid")

MAX_BODY = 2 * 1024 * 1024  # the reference's (axum's) default body limit
HTTP_THREADS = 32  # message long-polls hold a thread each
RPC_THREADS = 4
METRICS_THREADS = 2
CHANNEL_TIMEOUT = 30  # seconds a client may take to send a request
CONNECTION_LIMIT = 200
NICENESS = 5


def build(
    cfg: NodeConfig, identity: Identity, ctx: zmq.Context
) -> tuple[Any, Any, Any, StatsCollector, Sampler, RpcRegistry, Messages]:
    """The three WSGI apps over one NodeApi, stats collector and sampler, and
    what the JSON-RPC port's WebSocket sessions use beside the HTTP app."""

    def call(
        service: str, method: str, params: dict[str, Any] | None = None, timeout_ms: int = bus.RPC_TIMEOUT_MS
    ) -> Any:
        return bus.rpc_call(ctx, cfg.run_dir, service, method, params, timeout_ms)

    api = NodeApi(cfg, identity, call)
    stats = StatsCollector(ctx, cfg.run_dir, cfg.start_time)
    sampler = Sampler(api, stats)
    http_app = create_app(api, stats, sampler, dashboard=cfg.dashboard)
    registry = RpcRegistry()
    register_node_methods(registry, api)
    register_all(ApiContext(cfg, identity, api, call, http_app, registry))
    rpc_app = create_rpc_app(registry, MAX_BODY)
    metrics_app = None
    if cfg.metrics_api_address is not None:  # prometheus_client (~1 MiB) only where it is served
        from .metrics import NodeCollector, create_metrics_app

        metrics_app = create_metrics_app(NodeCollector(api, stats, sampler, expected_services(cfg)))
    return http_app, rpc_app, metrics_app, stats, sampler, registry, Messages(call)


def serve(name: str, addr: str | None, app: Callable[..., Any] | None, threads: int) -> Any | None:
    """A started waitress server on ``addr`` in a thread, or None (logged)."""
    if addr is None or app is None:
        return None
    try:
        host, port = parse_socket_addr(f"{name} address", addr)
        server = create_server(
            app,
            map={},
            host=host,
            port=port,
            threads=threads,
            channel_timeout=CHANNEL_TIMEOUT,
            connection_limit=CONNECTION_LIMIT,
            max_request_body_size=MAX_BODY,
            ident="mycelium",
        )
    except (OptionError, OSError) as exc:
        # the reference logs and keeps the node running without that server
        log.error("cannot serve the %s on %s: %s", name, addr, exc)
        return None
    threading.Thread(target=server.run, name=name, daemon=True).start()
    log.info("%s on http://%s", name, addr)
    return server


def serve_jsonrpc(addr: str | None, registry: RpcRegistry, rpc_app: Any, messages: Messages) -> Any | None:
    """The JSON-RPC port (HTTP POST and WebSocket, see websocket.py), or None (logged)."""
    if addr is None:
        return None
    try:
        host, port = parse_socket_addr("JSON-RPC API address", addr)
        server, _ = serve_rpc("JSON-RPC API", host, port, registry, rpc_app, messages, RPC_THREADS)
    except (OptionError, OSError) as exc:
        log.error("cannot serve the JSON-RPC API on %s: %s", addr, exc)
        return None
    log.info("JSON-RPC API on http://%s (WebSocket: ws://%s/)", addr, addr)
    return server


def main(argv: list[str] | None = None) -> int:
    cfg, _ = start_service("apid", argv)
    logging.getLogger("waitress").setLevel(logging.ERROR)
    try:
        os.nice(NICENESS)
    except OSError:
        pass
    identity = Identity.from_secret(load_key_file(cfg.key_file))
    ctx = zmq.Context()
    http_app, rpc_app, metrics_app, stats, sampler, registry, messages = build(cfg, identity, ctx)
    stats.start()
    sampler.start()
    servers = [
        serve("HTTP API", cfg.api_addr, http_app, HTTP_THREADS),
        serve("metrics API", cfg.metrics_api_address, metrics_app, METRICS_THREADS),
    ]
    rpc_server = serve_jsonrpc(cfg.jsonrpc_addr, registry, rpc_app, messages)
    if cfg.dashboard and servers[0] is not None:
        log.info("dashboard on http://%s/dashboard", cfg.api_addr)

    stop = threading.Event()

    def on_signal(_sig: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(1.0):
        pass
    log.info("stopping")
    sampler.stop()
    stats.stop()
    for server in servers:
        if server is not None:
            with contextlib.suppress(Exception):
                server.close()
    if rpc_server is not None:
        rpc_server.should_exit = True
    logging.shutdown()
    # waitress worker threads may sit in a bus call; nothing here needs flushing
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
