"""What an API extension gets (see extensions.py); its own module so that
extensions import it without importing the registry."""

from __future__ import annotations

from dataclasses import dataclass

from flask import Flask

from common.identity import Identity
from common.nodeconfig import NodeConfig

from .core import Call, NodeApi
from .rpc import RpcRegistry


@dataclass
class ApiContext:
    cfg: NodeConfig
    identity: Identity
    api: NodeApi  # the admin operations
    call: Call  # bus.rpc_call bound to this node: call(service, method, params)
    http: Flask  # the HTTP API app
    rpc: RpcRegistry  # the JSON-RPC methods
