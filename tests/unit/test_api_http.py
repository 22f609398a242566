"""The HTTP API app (services/apid/app.py) with a stub bus: the reference's
status codes and bodies for good and bad input, the dashboard switch, and
that nothing a client sends yields a 5xx."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import quote

import pytest
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.identity import Identity
from common.nodeconfig import NodeConfig
from services.apid.app import create_app
from services.apid.core import NodeApi
from services.apid.dashboard import STATIC, asset
from services.apid.stats import Sampler, StatsCollector

from .test_api_rpc import KEY, PEER, ROUTE, StubBus, json_values


def make_client(tmp_path: Any, stub: StubBus, dashboard: bool = True) -> FlaskClient:
    cfg = NodeConfig(run_dir=str(tmp_path), key_file=str(tmp_path / "key"), start_time=1716100000)
    api = NodeApi(cfg, Identity.from_secret(bytes(range(32))), stub)
    stats = StatsCollector(None, str(tmp_path), cfg.start_time)
    sampler = Sampler(api, stats)
    if not stub.down:
        sampler.sample(1716100100.0)  # what the sampler thread does every second
    return create_app(api, stats, sampler, dashboard=dashboard).test_client()


@pytest.fixture
def stub() -> StubBus:
    return StubBus()


@pytest.fixture
def client(tmp_path: Any, stub: StubBus) -> FlaskClient:
    return make_client(tmp_path, stub)


def test_reads(client: FlaskClient) -> None:
    info = client.get("/api/v1/admin")
    assert info.status_code == 200 and info.mimetype == "application/json"
    assert list(info.json) == ["nodeSubnet", "nodeIp", "nodePubkey", "nodeStartTime"]  # reference order
    assert client.get("/api/v1/admin/peers").json == [{k: v for k, v in PEER.items() if k != "txPackets"}]
    assert client.get("/api/v1/admin/routes/selected").json == [ROUTE]
    assert client.get("/api/v1/admin/routes/fallback").json == [ROUTE]
    assert client.get("/api/v1/admin/routes/queried").json[0]["expiration"] == "13"
    assert client.get("/api/v1/admin/stats/packets").json == {"bySource": [], "byDestination": []}
    assert client.get("/api/v1/pubkey/406:1d77::1").json == {"publicKey": KEY}
    resp = client.get("/api/v1/pubkey/500::1")
    assert resp.status_code == 404 and resp.data == b"" and "Content-Type" not in resp.headers
    assert client.get("/api/v1/pubkey/1.2.3.4").status_code == 404
    resp = client.get("/api/v1/pubkey/zz")
    assert resp.status_code == 400 and "error" in resp.json


def test_peer_writes(client: FlaskClient) -> None:
    ep = "tcp://198.51.100.1:9651"
    resp = client.post("/api/v1/admin/peers", json={"endpoint": ep})
    assert resp.status_code == 204 and resp.data == b"" and "Content-Type" not in resp.headers
    resp = client.post("/api/v1/admin/peers", json={"endpoint": ep})
    assert resp.status_code == 409 and resp.mimetype == "text/plain"
    assert resp.data == b"A peer identified by that endpoint already exists"
    resp = client.post("/api/v1/admin/peers", json={"endpoint": "junk"})
    assert resp.status_code == 400 and resp.mimetype == "text/plain" and b"junk" in resp.data
    assert client.delete(f"/api/v1/admin/peers/{quote(ep, safe='')}").status_code == 204
    resp = client.delete(f"/api/v1/admin/peers/{quote(ep, safe='')}")
    assert resp.status_code == 404 and resp.data == b"A peer identified by that endpoint does not exist"
    assert client.delete("/api/v1/admin/peers/junk").status_code == 400
    assert client.delete("/api/v1/admin/peers/a%0Ab").status_code == 400  # newline: still the endpoint parser


@pytest.mark.parametrize(
    ("data", "content_type", "status"),
    [
        (b'{"endpoint":"tcp://1.2.3.4:1"}', None, 415),
        (b'{"endpoint":"tcp://1.2.3.4:1"}', "text/plain", 415),
        (b'{"endpoint":"tcp://1.2.3.4:1"}', "application/problem+json", 204),
        (b"", "application/json", 400),
        (b"{", "application/json", 400),
        (b"\xff", "application/json", 400),
        (b'{"endpoint": Infinity}', "application/json", 400),
        (b"[" * 10000, "application/json", 400),
        (b"[]", "application/json", 422),
        (b"{}", "application/json", 422),
        (b'{"endpoint": ["tcp://1.2.3.4:1"]}', "application/json", 422),
        (b'{"endpoint":"tcp://1.2.3.4:1","unknown":true}', "application/json", 204),
    ],
)
def test_add_peer_extractor(client: FlaskClient, data: bytes, content_type: str | None, status: int) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    resp = client.post("/api/v1/admin/peers", data=data, headers=headers)
    assert resp.status_code == status
    if status >= 400:
        assert resp.mimetype == "application/json" and resp.json["error"]


def test_unknown_paths_and_methods(client: FlaskClient) -> None:
    assert client.get("/api/v1/nothing").status_code == 404
    resp = client.put("/api/v1/admin")
    assert resp.status_code == 405 and "GET" in resp.headers["Allow"] and resp.json["error"]
    assert client.delete("/api/v1/admin/routes/selected").status_code == 405


def test_bus_down_is_503_json(client: FlaskClient, stub: StubBus) -> None:
    stub.down = True
    for path in ("/api/v1/admin/peers", "/api/v1/admin/routes/selected", "/api/v1/pubkey/406::1"):
        resp = client.get(path)
        assert resp.status_code == 503 and "did not answer" in resp.json["error"]
    assert client.get("/api/v1/admin").status_code == 200
    state = client.get("/dashboard/api/state")
    assert state.status_code == 200 and state.json["errors"]


def test_dashboard_switch_and_assets(tmp_path: Any, stub: StubBus, client: FlaskClient) -> None:
    page = client.get("/dashboard")
    assert page.status_code == 200 and b"<title>mycelium node</title>" in page.data
    for name, mimetype in STATIC.items():
        resp = client.get(f"/dashboard/static/{name}")
        assert resp.status_code == 200 and resp.mimetype == mimetype
    assert client.get("/dashboard/static/../app.py").status_code == 404
    assert client.get("/dashboard/static/nope.js").status_code == 404
    state = client.get("/dashboard/api/state").json
    assert state["peers"][0]["cost"] == 15 and state["routes"]["total"] == 1
    # nothing is fetched from elsewhere: no absolute URLs in the page or its assets
    for blob in (asset("dashboard.html"), *(asset(n) for n in STATIC)):
        assert not re.search(rb"(?:src|href)\s*=\s*[\"']?(?:https?:)?//", blob)
        assert b"http://" not in blob.replace(b"http://www.w3.org/2000/svg", b"")
        assert b"https://" not in blob
    off = make_client(tmp_path / "off", stub, dashboard=False)
    for path in ("/dashboard", "/dashboard/api/state", "/dashboard/static/dashboard.js"):
        assert off.get(path).status_code == 404
    assert off.get("/api/v1/admin").status_code == 200


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]),
    path=st.sampled_from(
        [
            "/api/v1/admin",
            "/api/v1/admin/peers",
            "/api/v1/admin/peers/",
            "/api/v1/admin/routes/selected",
            "/api/v1/admin/stats/packets",
            "/api/v1/pubkey/",
            "/dashboard/api/state",
            "/",
        ]
    ),
    suffix=st.text(max_size=30),
    body=st.binary(max_size=100) | st.builds(lambda v: json.dumps(v).encode(), json_values),
    content_type=st.sampled_from([None, "application/json", "text/plain", "application/x+json", ""]),
)
def test_nothing_a_client_sends_is_a_server_error(
    tmp_path: Any, method: str, path: str, suffix: str, body: bytes, content_type: str | None
) -> None:
    client = make_client(tmp_path, StubBus())
    headers = {} if content_type is None else {"Content-Type": content_type}
    target = path + quote(suffix, safe="")
    resp = client.open(target, method=method, data=body, headers=headers)
    assert resp.status_code < 500, (method, target, resp.status_code, resp.data[:200])
