"""JSON-RPC 2.0 dispatch (services/apid/rpc.py) over a NodeApi whose bus is
a stub: method names, positional and named params, error codes, batches,
notifications, and that no input can make ``dispatch`` raise."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common import bus
from common.identity import Identity
from common.nodeconfig import NodeConfig
from services.apid.core import NodeApi
from services.apid.rpc import RpcRegistry, create_rpc_app, openrpc_document, register_node_methods

PEER = {
    "endpoint": {"proto": "tcp", "addr": {"socket": "192.0.2.6:9651"}},
    "type": "static",
    "connectionState": "alive",
    "txBytes": 10,
    "rxBytes": 20,
    "discovered": 5,
    "lastConnected": 3,
    "txPackets": 7,  # a peerd extra: kept out of API answers
}
ROUTE = {"subnet": "406:1d77:2438:aa7c::/64", "nextHop": "TCP a <-> b", "metric": 20, "seqno": 0}
KEY = "ab" * 32


class StubBus:
    """Answers the bus calls NodeApi makes, records them, can play dead."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.peers: set[str] = {"tcp://192.0.2.6:9651"}
        self.down = False

    def __call__(
        self, service: str, method: str, params: dict[str, Any] | None = None, timeout_ms: int | None = None
    ) -> Any:
        self.calls.append((service, method, params))
        if self.down:
            raise bus.BusError(f"{service} did not answer {method} within 2000 ms")
        if method == "list_peers":
            return [PEER]
        if method in ("add_peer", "remove_peer"):
            ep = params["endpoint"] if params else ""
            if "://" not in ep:
                return {"error": "parse", "message": f"invalid endpoint {ep!r}"}
            if method == "add_peer":
                if ep in self.peers:
                    return {"error": "exists", "message": "A peer identified by that endpoint already exists"}
                self.peers.add(ep)
            else:
                if ep not in self.peers:
                    return {"error": "unknown", "message": "A peer identified by that endpoint does not exist"}
                self.peers.discard(ep)
            return {"ok": True}
        if method in ("routes_selected", "routes_fallback"):
            return [ROUTE]
        if method == "routes_queried":
            return [{"subnet": "503:5478:df06:d79a::/64", "expiration": "13"}]
        if method == "pubkey":
            return KEY if bytes(params["addr"])[:2] == b"\x04\x06" else None
        if method == "packet_stats":
            return {"error": "method", "message": "unknown method"}
        if method == "peers":
            return [{"peer": "tcp-x-1", "linkName": "TCP 1.2.3.4:1 <-> 192.0.2.6:9651", "cost": 15}]
        raise AssertionError(f"unexpected bus call {service} {method}")


@pytest.fixture
def stub() -> StubBus:
    return StubBus()


@pytest.fixture
def api(stub: StubBus, tmp_path: Any) -> NodeApi:
    cfg = NodeConfig(run_dir=str(tmp_path), key_file=str(tmp_path / "key"), start_time=1716100000)
    return NodeApi(cfg, Identity.from_secret(bytes(range(32))), stub)


@pytest.fixture
def registry(api: NodeApi) -> RpcRegistry:
    reg = RpcRegistry()
    register_node_methods(reg, api)
    return reg


def call(reg: RpcRegistry, method: str, params: Any = None, rid: Any = 1) -> dict[str, Any]:
    req: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
    if params is not None:
        req["params"] = params
    answer = reg.dispatch(json.dumps(req).encode())
    assert isinstance(answer, dict)
    return answer


def test_admin_methods(registry: RpcRegistry, api: NodeApi) -> None:
    assert call(registry, "getInfo")["result"] == api.info()
    assert call(registry, "getInfo")["result"]["nodeStartTime"] == 1716100000
    peers = call(registry, "getPeers")["result"]
    assert peers == [{k: v for k, v in PEER.items() if k != "txPackets"}]
    assert call(registry, "getSelectedRoutes")["result"] == [ROUTE]
    assert call(registry, "getFallbackRoutes")["result"] == [ROUTE]
    assert call(registry, "getQueriedSubnets")["result"][0]["expiration"] == "13"
    assert call(registry, "getPacketStatistics")["result"] == {"bySource": [], "byDestination": []}
    assert call(registry, "rpc.discover")["result"] == openrpc_document()
    assert call(registry, "getInfo", rid="abc")["id"] == "abc"


def test_peer_methods_and_their_codes(registry: RpcRegistry, stub: StubBus) -> None:
    ep = "tcp://198.51.100.1:9651"
    assert call(registry, "addPeer", [ep])["result"] is True
    assert call(registry, "addPeer", {"endpoint": ep})["error"] == {"code": -32010, "message": "Server error"}
    assert call(registry, "addPeer", ["junk"])["error"]["code"] == -32009
    assert call(registry, "deletePeer", {"endpoint": ep})["result"] is True
    assert call(registry, "deletePeer", [ep])["error"]["code"] == -32011
    assert call(registry, "deletePeer", ["junk"])["error"]["code"] == -32012
    assert "data" not in call(registry, "deletePeer", ["junk"])["error"]


def test_pubkey_codes(registry: RpcRegistry, stub: StubBus) -> None:
    assert call(registry, "getPublicKeyFromIp", ["406:1d77::1"])["result"] == KEY
    assert call(registry, "getPublicKeyFromIp", {"ip": "406:1d77::1"})["result"] == KEY
    assert call(registry, "getPublicKeyFromIp", {"mycelium_ip": "406:1d77::1"})["result"] == KEY
    assert call(registry, "getPublicKeyFromIp", ["500::1"])["error"]["code"] == -32008
    for outside in ("1.2.3.4", "2001:db8::1", "::1"):  # parse, but no route can cover them
        assert call(registry, "getPublicKeyFromIp", [outside])["error"]["code"] == -32008
    for bad in ("", "nope", " 406::1", "fe80::1%eth0", "406::1/64"):
        assert call(registry, "getPublicKeyFromIp", [bad])["error"]["code"] == -32007
    lookups = [c for c in stub.calls if c[1] == "pubkey"]
    assert len(lookups) == 4  # only the overlay addresses reached the router


def test_params_validation(registry: RpcRegistry) -> None:
    for params in ([], {}, [None], [1], [True], [["tcp://x"]], {"endpoint": 5}, {"other": "tcp://1.2.3.4:1"}):
        err = call(registry, "addPeer", params)["error"]
        assert err["code"] == -32602 and err["message"] == "Invalid params", params
    assert call(registry, "addPeer", ["tcp://1.2.3.4:1", "extra"])["error"]["code"] == -32602
    assert call(registry, "addPeer", {"endpoint": "tcp://1.2.3.4:1", "extra": 1})["result"] is True
    # parameterless methods ignore whatever params come along
    assert "result" in call(registry, "getPeers", [1, 2, 3])
    assert "result" in call(registry, "getInfo", {"x": 1})


def test_protocol_errors(registry: RpcRegistry) -> None:
    def raw(body: bytes) -> Any:
        return registry.dispatch(body)

    assert raw(b"{")["error"]["code"] == -32700
    assert raw(b"\xff\xfe")["error"]["code"] == -32700
    assert raw(b"NaN")["error"]["code"] == -32700
    assert raw('{"jsonrpc":"2.0","id":1,"method":"getInfo"}'.encode("utf-16"))["error"]["code"] == -32700
    assert raw(b"[]")["error"]["code"] == -32600
    assert raw(b"1")["error"] == {"code": -32600, "message": "Invalid request"}
    assert raw(b'{"jsonrpc":"2.0","id":1}')["error"]["code"] == -32600
    assert raw(b'{"jsonrpc":"2.0","id":1.5,"method":"getInfo"}') == {
        "jsonrpc": "2.0",
        "error": {"code": -32600, "message": "Invalid request"},
        "id": None,
    }
    assert raw(b'{"jsonrpc":"2.0","id":1,"method":"getInfo","params":5}')["error"]["code"] == -32600
    assert raw(b'{"jsonrpc":"2.0","id":7,"method":"nope"}') == {
        "jsonrpc": "2.0",
        "error": {"code": -32601, "message": "Method not found"},
        "id": 7,
    }
    # notifications get no answer, alone or in a batch
    assert raw(b'{"jsonrpc":"2.0","method":"getInfo"}') is None
    assert raw(b'{"jsonrpc":"2.0","method":"nope"}') is None
    assert raw(b'[{"jsonrpc":"2.0","method":"getInfo"}]') is None
    batch = raw(b'[{"jsonrpc":"2.0","id":1,"method":"getInfo"},{"jsonrpc":"2.0","method":"getInfo"},5]')
    assert [x.get("id") for x in batch] == [1, None] and "error" in batch[1]


def test_bus_down_is_an_internal_error(registry: RpcRegistry, stub: StubBus) -> None:
    stub.down = True
    err = call(registry, "getPeers")["error"]
    assert err["code"] == -32603 and "did not answer" in err["data"]
    assert "result" in call(registry, "getInfo")  # needs no other service


def test_http_transport(registry: RpcRegistry) -> None:
    client = create_rpc_app(registry, 1 << 20).test_client()
    body = b'{"jsonrpc":"2.0","id":1,"method":"getInfo"}'
    for path in ("/", "/rpc"):
        resp = client.post(path, data=body, content_type="application/json")
        assert resp.status_code == 200 and resp.json["result"]["nodeStartTime"] == 1716100000
    assert client.post("/", data=body, content_type="text/plain").status_code == 415
    assert client.get("/").status_code == 405
    assert client.post("/elsewhere", data=body, content_type="application/json").status_code == 404
    resp = client.post("/", data=b'{"jsonrpc":"2.0","method":"getInfo"}', content_type="application/json")
    assert resp.status_code == 200 and resp.data == b""


def test_registering_twice_is_refused(registry: RpcRegistry) -> None:
    with pytest.raises(ValueError):
        registry.add("getInfo", lambda: None)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
requests = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": st.sampled_from(["2.0", "1.0", 2]) | json_values,
        "id": st.integers() | st.text(max_size=5) | st.none() | json_values,
        "method": st.sampled_from(sorted(openrpc_document()["methods"][i]["name"] for i in range(5)))
        | st.sampled_from(["getInfo", "addPeer", "deletePeer", "getPublicKeyFromIp", "rpc.discover"])
        | st.text(max_size=10),
        "params": json_values,
    },
)


@settings(max_examples=300, deadline=None)
@given(body=st.one_of(requests, st.lists(requests, max_size=5), json_values))
def test_dispatch_never_raises(body: Any) -> None:
    reg = RpcRegistry()
    stub = StubBus()
    cfg = NodeConfig(run_dir="/nonexistent", key_file="/nonexistent/key")
    register_node_methods(reg, NodeApi(cfg, Identity.from_secret(bytes(32)), stub))
    answer = reg.dispatch(json.dumps(body).encode())
    for item in answer if isinstance(answer, list) else [answer] if answer is not None else []:
        assert item["jsonrpc"] == "2.0" and ("result" in item) != ("error" in item)
        if "error" in item:
            assert isinstance(item["error"]["code"], int) and item["error"]["message"]


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=200))
def test_dispatch_of_arbitrary_bytes(raw: bytes) -> None:
    reg = RpcRegistry()
    cfg = NodeConfig(run_dir="/nonexistent", key_file="/nonexistent/key")
    register_node_methods(reg, NodeApi(cfg, Identity.from_secret(bytes(32)), StubBus()))
    reg.dispatch(raw)


def test_the_websocket_servers_housekeeping_turns_once_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn's own loop wakes ten times a second; ours once, still passing
    on_tick the counts at which it refreshes the Date header (every tenth)."""
    import asyncio

    import uvicorn

    from services.apid.websocket import RpcUvicorn

    sleeps: list[float] = []
    ticks: list[int] = []

    async def fake_sleep(delay: float) -> None:
        sleeps.append(delay)

    async def on_tick(self: RpcUvicorn, counter: int) -> bool:
        ticks.append(counter)
        return len(ticks) == 3

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    monkeypatch.setattr(RpcUvicorn, "on_tick", on_tick)
    server = RpcUvicorn(uvicorn.Config(app=lambda *_: None, lifespan="off"))
    asyncio.run(server.main_loop())
    assert sleeps == [1.0, 1.0]
    assert ticks == [0, 10, 20] and all(t % 10 == 0 for t in ticks)
