"""The HTTP API, JSON-RPC server and metrics of real nodes, checked against
the shapes, status codes and error codes of shared/spec/API.md (sections
1-3), plus hostile input that must never crash or hang apid.

One 3-node ring serves the whole module (started once, always stopped).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest

from services.apid.rpc import openrpc_document
from tests.vectors import data_file

from .nodes import wait_for
from .test_api_nodes import ApiNode, running_mesh

pytestmark = pytest.mark.integration

HEX64 = re.compile(r"^[0-9a-f]{64}$")
OVERLAY = ipaddress.IPv6Network("400::/7")
PEER_KEYS = {"endpoint", "type", "connectionState", "txBytes", "rxBytes", "discovered", "lastConnected"}
SPEC_OPENRPC = data_file("openrpc.json")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[list[ApiNode]]:
    with running_mesh(tmp_path_factory.mktemp("api"), 3, request) as nodes:
        yield nodes


# --- shapes (API.md section 1) ------------------------------------------------------


def check_info(info: Any) -> None:
    assert set(info) == {"nodeSubnet", "nodeIp", "nodePubkey", "nodeStartTime"}
    subnet = ipaddress.IPv6Network(info["nodeSubnet"])
    assert subnet.prefixlen == 64 and subnet.subnet_of(OVERLAY)
    assert ipaddress.IPv6Address(info["nodeIp"]) in subnet
    assert HEX64.match(info["nodePubkey"])
    assert isinstance(info["nodeStartTime"], int) and abs(info["nodeStartTime"] - time.time()) < 3600


def check_peer(p: Any) -> None:
    assert set(p) == PEER_KEYS
    ep = p["endpoint"]
    assert set(ep) == {"proto", "addr"} and ep["proto"] in ("tcp", "tls", "quic", "vsock")
    assert set(ep["addr"]) == {"socket"}
    host, _, port = ep["addr"]["socket"].rpartition(":")
    ipaddress.ip_address(host.strip("[]").split("%")[0])
    assert 0 < int(port) < 65536
    assert p["type"] in ("static", "linkLocalDiscovery", "inbound")
    assert p["connectionState"] in ("alive", "connecting", "dead")
    for key in ("txBytes", "rxBytes", "discovered"):
        assert isinstance(p[key], int) and p[key] >= 0
    assert p["lastConnected"] is None or (isinstance(p["lastConnected"], int) and p["lastConnected"] >= 0)


def check_route(r: Any) -> None:
    assert set(r) == {"subnet", "nextHop", "metric", "seqno"}
    assert ipaddress.IPv6Network(r["subnet"]).subnet_of(OVERLAY)
    assert re.match(r"^TCP \S+:\d+ <-> \S+:\d+$", r["nextHop"]), r["nextHop"]
    assert r["metric"] == "infinite" or (isinstance(r["metric"], int) and 0 <= r["metric"] <= 65534)
    assert isinstance(r["seqno"], int) and 0 <= r["seqno"] <= 0xFFFF


def check_queried(q: Any) -> None:
    assert set(q) == {"subnet", "expiration"}
    ipaddress.IPv6Network(q["subnet"])
    assert isinstance(q["expiration"], str) and q["expiration"].isdigit()


def check_packet_stats(s: Any) -> None:
    assert set(s) == {"bySource", "byDestination"}
    for entry in s["bySource"] + s["byDestination"]:
        assert set(entry) == {"ip", "packetCount", "byteCount"}
        ipaddress.ip_address(entry["ip"])
        assert isinstance(entry["packetCount"], int) and isinstance(entry["byteCount"], int)


def random_overlay_address() -> str:
    return str(ipaddress.IPv6Address(bytes([0x04 | (os.urandom(1)[0] & 1)]) + os.urandom(15)))


# --- every implemented path, HTTP and JSON-RPC ----------------------------------------


def test_info(mesh: list[ApiNode]) -> None:
    for node in mesh:
        info = node.api("/api/v1/admin")
        check_info(info)
        assert node.result("getInfo") == info
        # the three nodes are different nodes
    assert len({n.info["nodePubkey"] for n in mesh}) == 3


def test_peers(mesh: list[ApiNode]) -> None:
    a = mesh[0]
    peers = a.api("/api/v1/admin/peers")
    assert len(peers) == 2
    for p in peers:
        check_peer(p)
        assert p["connectionState"] == "alive" and p["rxBytes"] > 0 and p["txBytes"] > 0
        assert p["lastConnected"] is not None
    assert {p["type"] for p in peers} == {"static", "inbound"}
    static = next(p for p in peers if p["type"] == "static")
    assert static["endpoint"]["addr"]["socket"] == f"127.0.0.1:{mesh[1].tcp_port}"
    rpc_peers = a.result("getPeers")
    assert [p["endpoint"] for p in rpc_peers] == [p["endpoint"] for p in peers]
    for p in rpc_peers:
        check_peer(p)


def test_routes_selected_and_fallback(mesh: list[ApiNode]) -> None:
    a, b, c = mesh
    selected = a.api("/api/v1/admin/routes/selected")
    assert {r["subnet"] for r in selected} == {b.subnet, c.subnet}
    for r in selected:
        check_route(r)
        assert r["metric"] != "infinite"
    assert {r["subnet"] for r in a.result("getSelectedRoutes")} == {b.subnet, c.subnet}
    fallback = a.api("/api/v1/admin/routes/fallback")
    assert isinstance(fallback, list)
    for r in fallback:
        check_route(r)
    assert isinstance(a.result("getFallbackRoutes"), list)


def test_routes_queried(mesh: list[ApiNode]) -> None:
    a = mesh[0]
    target = random_overlay_address()
    status, _body = a.api_status(f"/api/v1/pubkey/{target}")
    assert status == 404  # nobody has it; the miss starts a query
    subnet = str(ipaddress.IPv6Network(f"{target}/64", strict=False))
    queried = a.api("/api/v1/admin/routes/queried")
    for q in queried:
        check_queried(q)
    assert subnet in {q["subnet"] for q in queried}
    rpc = a.result("getQueriedSubnets")
    assert subnet in {q["subnet"] for q in rpc}
    for q in rpc:
        check_queried(q)


def test_packet_statistics(mesh: list[ApiNode]) -> None:
    stats = mesh[0].api("/api/v1/admin/stats/packets")
    check_packet_stats(stats)
    check_packet_stats(mesh[0].result("getPacketStatistics"))


def test_pubkey(mesh: list[ApiNode]) -> None:
    a, b, _c = mesh
    body = a.api(f"/api/v1/pubkey/{b.address}")
    assert body == {"publicKey": b.info["nodePubkey"]}
    # any address inside the subnet answers with the subnet's key
    inside = str(ipaddress.IPv6Network(b.subnet)[12345])
    assert a.api(f"/api/v1/pubkey/{inside}") == body
    assert a.result("getPublicKeyFromIp", [b.address]) == b.info["nodePubkey"]
    assert a.result("getPublicKeyFromIp", {"ip": b.address}) == b.info["nodePubkey"]
    # openrpc.json names the param mycelium_ip (API.md 6.8): accepted too
    assert a.result("getPublicKeyFromIp", {"mycelium_ip": b.address}) == b.info["nodePubkey"]
    for unknown in ("1.2.3.4", "2001:db8::1", random_overlay_address()):
        status, raw = a.api_status(f"/api/v1/pubkey/{unknown}")
        assert status == 404 and raw == b""
        assert a.rpc("getPublicKeyFromIp", [unknown])["error"] == {"code": -32008, "message": "Server error"}
    for bad in ("zz", "1.2.3", "fe80::1%25eth0", "%20%3A%3A1", "400::1::2"):
        status, raw = a.api_status(f"/api/v1/pubkey/{bad}")
        assert status == 400 and "error" in json.loads(raw)
    assert a.rpc("getPublicKeyFromIp", ["not an ip"])["error"]["code"] == -32007


def test_peer_add_and_remove(mesh: list[ApiNode]) -> None:
    a = mesh[0]
    ep = "tcp://127.0.0.1:1"  # nothing listens there: the peer stays, not alive
    status, raw = a.api_status("/api/v1/admin/peers", "POST", {"endpoint": ep})
    assert (status, raw) == (204, b"")
    listed = {f"{p['endpoint']['proto']}://{p['endpoint']['addr']['socket']}": p for p in a.api("/api/v1/admin/peers")}
    assert listed[ep]["type"] == "static" and listed[ep]["connectionState"] in ("dead", "connecting")
    status, raw = a.api_status("/api/v1/admin/peers", "POST", {"endpoint": ep})
    assert (status, raw) == (409, b"A peer identified by that endpoint already exists")
    status, raw = a.api_status(f"/api/v1/admin/peers/{quote(ep, safe='')}", "DELETE")
    assert (status, raw) == (204, b"")
    status, raw = a.api_status(f"/api/v1/admin/peers/{quote(ep, safe='')}", "DELETE")
    assert (status, raw) == (404, b"A peer identified by that endpoint does not exist")
    for bad in ("127.0.0.1:1", "tcp://host.example:1", "tcp://127.0.0.1:0", "tcp://[::1:1", "udp://127.0.0.1:1"):
        status, raw = a.api_status("/api/v1/admin/peers", "POST", {"endpoint": bad})
        assert status == 400 and raw, (bad, raw)
        status, raw = a.api_status(f"/api/v1/admin/peers/{quote(bad, safe='')}", "DELETE")
        assert status == 400 and raw, (bad, raw)

    # the same through JSON-RPC, positional and by name
    assert a.result("addPeer", [ep]) is True
    assert a.rpc("addPeer", {"endpoint": ep})["error"] == {"code": -32010, "message": "Server error"}
    assert a.rpc("addPeer", ["nonsense"])["error"]["code"] == -32009
    assert a.result("deletePeer", {"endpoint": ep}) is True
    assert a.rpc("deletePeer", [ep])["error"]["code"] == -32011
    assert a.rpc("deletePeer", ["nonsense"])["error"]["code"] == -32012
    assert a.rpc("addPeer", [])["error"]["code"] == -32602
    assert a.rpc("addPeer", [42])["error"]["code"] == -32602
    assert a.rpc("addPeer", {"endpointt": ep})["error"]["code"] == -32602
    # the real links were not touched
    assert a.alive_peers() == 2


# --- bad input never crashes or hangs apid (API.md 2, issue "Bad input") ----------------


def test_bad_http_input(mesh: list[ApiNode]) -> None:
    a = mesh[0]
    json_ct = {"Content-Type": "application/json"}
    cases: list[tuple[str, str, bytes | None, dict[str, str], int]] = [
        ("POST", "/api/v1/admin/peers", b'{"endpoint": "tcp://127.0.0.1:1"}', {}, 415),
        ("POST", "/api/v1/admin/peers", b'{"endpoint": "tcp://127.0.0.1:1"}', {"Content-Type": "text/plain"}, 415),
        ("POST", "/api/v1/admin/peers", b"", json_ct, 400),
        ("POST", "/api/v1/admin/peers", b"{", json_ct, 400),
        ("POST", "/api/v1/admin/peers", b"\xff\xfe{}", json_ct, 400),
        ("POST", "/api/v1/admin/peers", b'{"endpoint": NaN}', json_ct, 400),
        ("POST", "/api/v1/admin/peers", b"[" * 100_000, json_ct, 400),
        ("POST", "/api/v1/admin/peers", b'{"endpoint": 1' + b"0" * 5000 + b"}", json_ct, 400),
        ("POST", "/api/v1/admin/peers", b"[]", json_ct, 422),
        ("POST", "/api/v1/admin/peers", b"{}", json_ct, 422),
        ("POST", "/api/v1/admin/peers", b'{"endpoint": 5}', json_ct, 422),
        ("POST", "/api/v1/admin/peers", b'{"endpoint": null}', json_ct, 422),
        ("POST", "/api/v1/admin/peers", b'"tcp://127.0.0.1:1"', json_ct, 422),
        ("GET", "/api/v1/nope", None, {}, 404),
        ("GET", "/api/v1/pubkey/", None, {}, 404),
        ("PUT", "/api/v1/admin", b"{}", json_ct, 405),
        ("DELETE", "/api/v1/admin/routes/selected", None, {}, 405),
    ]
    for method, path, data, headers, expected in cases:
        status, resp_headers, body = a.raw(path, method, data, headers)
        assert status == expected, (method, path, (data or b"")[:40], status, body[:200])
        if expected in (400, 404, 405, 415, 422):
            assert "application/json" in resp_headers.get("Content-Type", "")
            assert isinstance(json.loads(body)["error"], str)
    # a body over the 2 MiB limit is refused before it is read
    with socket.create_connection(("127.0.0.1", a.api_port), timeout=10) as s:
        s.sendall(
            b"POST /api/v1/admin/peers HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 3145728\r\n\r\n{" + b" " * 65536
        )
        assert s.recv(1000).startswith(b"HTTP/1.1 413")
    # an endpoint that does not parse: the reference's text body
    status, resp_headers, body = a.raw(
        "/api/v1/admin/peers", "POST", b'{"endpoint": "x' + b"y" * 100_000 + b'"}', json_ct
    )
    assert status == 400 and resp_headers["Content-Type"].startswith("text/plain") and body
    # unknown fields are ignored, as the reference's serde does
    status, _h, body = a.raw(
        "/api/v1/admin/peers", "POST", b'{"endpoint": "tcp://127.0.0.1:2", "extra": [1, 2]}', json_ct
    )
    assert status == 204
    assert a.api_status(f"/api/v1/admin/peers/{quote('tcp://127.0.0.1:2', safe='')}", "DELETE")[0] == 204
    assert a.all_running() and a.api("/api/v1/admin")["nodeIp"] == a.address


def test_slow_and_broken_clients_do_not_hang_apid(mesh: list[ApiNode]) -> None:
    a = mesh[0]
    idle: list[socket.socket] = []
    try:
        for _ in range(30):  # connections that never finish their request
            s = socket.create_connection(("127.0.0.1", a.api_port), timeout=5)
            s.sendall(b"POST /api/v1/admin/peers HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
            idle.append(s)
        for junk in (b"\x00\xff" * 100 + b"\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"GET " + b"a" * 70000 + b"\r\n\r\n"):
            with socket.create_connection(("127.0.0.1", a.api_port), timeout=5) as s:
                s.sendall(junk)
                s.settimeout(5)
                try:
                    s.recv(1000)
                except (TimeoutError, ConnectionResetError):
                    pass
        t0 = time.monotonic()
        assert a.api("/api/v1/admin")["nodeIp"] == a.address
        assert time.monotonic() - t0 < 2
    finally:
        for s in idle:
            s.close()


def test_parallel_requests(mesh: list[ApiNode]) -> None:
    a = mesh[0]
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(20):
                a.api("/api/v1/admin/routes/selected")
                a.api("/api/v1/admin/peers")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors


# --- JSON-RPC protocol (API.md section 3) ----------------------------------------------


def test_jsonrpc_protocol(mesh: list[ApiNode]) -> None:
    a = mesh[0]
    info = a.api("/api/v1/admin")
    for path in ("/", "/rpc"):
        status, body = a.rpc_raw(b'{"jsonrpc":"2.0","id":"x","method":"getInfo"}', path)
        assert status == 200 and json.loads(body) == {"jsonrpc": "2.0", "result": info, "id": "x"}
    # batches, notifications, errors with their ids
    batch = [
        {"jsonrpc": "2.0", "id": 1, "method": "getInfo"},
        {"jsonrpc": "2.0", "method": "getInfo"},  # notification: no answer
        {"jsonrpc": "2.0", "id": 2, "method": "noSuchMethod"},
        {"jsonrpc": "2.0", "id": 3, "method": "getPublicKeyFromIp", "params": [5]},
        {"jsonrpc": "1.0", "id": 4, "method": "getInfo"},
        17,
    ]
    status, body = a.rpc_raw(json.dumps(batch).encode())
    answers = json.loads(body)
    assert status == 200 and len(answers) == 5
    by_id = {x["id"]: x for x in answers}
    assert by_id[1]["result"] == info
    assert by_id[2]["error"] == {"code": -32601, "message": "Method not found"}
    assert by_id[3]["error"]["code"] == -32602
    assert by_id[4]["error"]["code"] == -32600
    assert by_id[None]["error"]["code"] == -32600
    status, body = a.rpc_raw(b'[{"jsonrpc":"2.0","method":"getInfo"}]')
    assert status == 200 and body == b""
    for raw, code in ((b"{", -32700), (b"\xff", -32700), (b"[]", -32600), (b'"x"', -32600), (b"[" * 50000, -32700)):
        status, body = a.rpc_raw(raw)
        assert status == 200 and json.loads(body) == {
            "jsonrpc": "2.0",
            "error": {"code": code, "message": {-32700: "Parse error", -32600: "Invalid request"}[code]},
            "id": None,
        }
    status, _ = a.rpc_raw(b'{"jsonrpc":"2.0","id":1,"method":"getInfo"}', content_type="text/plain")
    assert status == 415
    # parameterless methods ignore params; openrpc discovery serves the reference document
    assert a.result("getPeers", ["ignored"]) == a.result("getPeers")
    discovered = a.result("rpc.discover")
    assert discovered == openrpc_document()
    assert discovered == json.loads(SPEC_OPENRPC.read_text())
    assert {m["name"] for m in discovered["methods"]} >= {"getInfo", "getPeers", "addPeer", "getSelectedRoutes"}


# --- metrics, restarts and the data path without apid -----------------------------------


def metric_value(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return None


def test_metrics(mesh: list[ApiNode]) -> None:
    a, b, _c = mesh
    # what the services published in the last second
    wait_for(
        "the router's latest stats",
        lambda: metric_value(a.metrics(), "mycelium_routes", kind="selected", service="router") == 2,
        10,
    )
    static = f"tcp://127.0.0.1:{b.tcp_port}"

    def sampled_both_ways() -> bool:  # the peer list is sampled once a second: wait for one after traffic
        text = a.metrics()
        return all(
            (metric_value(text, f"mycelium_peer_{way}_bytes_total", endpoint=static, type="static") or 0) > 0
            for way in ("rx", "tx")
        )

    wait_for("a sampled peer list", sampled_both_ways, 10)
    text = a.metrics()
    assert metric_value(text, "mycelium_peer_rx_bytes_total", endpoint=static, type="static") > 0
    assert metric_value(text, "mycelium_peer_tx_bytes_total", endpoint=static, type="static") > 0
    assert metric_value(text, "mycelium_peer_connected", endpoint=static) == 1
    assert metric_value(text, "mycelium_peers", state="alive") == 2
    assert metric_value(text, "mycelium_queue_depth", service="peerd-tcp", queue="send_queue") is not None
    assert metric_value(text, "mycelium_info", node_ip=a.address) == 1
    for service in ("router", "tund", "peerd-tcp", "apid"):  # each reports within a second of starting
        wait_for(f"{service} up", lambda s=service: metric_value(a.metrics(), "mycelium_service_up", service=s) == 1, 5)
        text = a.metrics()
        assert metric_value(text, "mycelium_service_restarts_total", service=service) is not None
    for family in ("mycelium_drops_total", "mycelium_crypto_operations_total", "mycelium_service_counter_total"):
        assert f"# TYPE {family.removesuffix('_total')} counter" in text or f"# TYPE {family} counter" in text
    status, _h, _b = a.raw("/metrics")  # not on the API address
    assert status == 404


def test_restarts_are_counted_and_apid_is_off_the_data_path(mesh: list[ApiNode]) -> None:
    a, b, c = mesh
    before = metric_value(a.metrics(), "mycelium_service_restarts_total", service="tund") or 0
    os.kill(a.program_pid("tund"), signal.SIGKILL)
    wait_for(
        "tund's restart to be counted",
        lambda: (metric_value(a.metrics(), "mycelium_service_restarts_total", service="tund") or 0) > before,
        20,
        interval=0.3,
    )
    services = {s["name"]: s for s in a.api("/dashboard/api/state")["services"]}
    assert services["tund"]["restarts"] >= 1

    # killing apid leaves the links and routes alone; supervisord brings it back
    links_b = b.counters("peerd-tcp").get("links_opened", 0)
    links_c = c.counters("peerd-tcp").get("links_opened", 0)
    os.kill(a.program_pid("apid"), signal.SIGKILL)
    time.sleep(1.5)
    assert b.alive_peers() == 2 and c.alive_peers() == 2
    assert a.subnet in b.selected() and a.subnet in c.selected()
    wait_for("apid back", lambda: a.api("/api/v1/admin"), 20)
    assert a.alive_peers() == 2 and set(a.selected()) == {b.subnet, c.subnet}
    assert b.counters("peerd-tcp").get("links_opened", 0) == links_b
    assert c.counters("peerd-tcp").get("links_opened", 0) == links_c
    wait_for(
        "apid's own restart to be counted",
        lambda: metric_value(a.metrics(), "mycelium_service_restarts_total", service="apid") == 1,
        10,
    )
