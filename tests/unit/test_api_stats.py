"""apid's stats (restart counting and its persistence, sampled rates), the
Prometheus families built from them, the CLI client's formatting and the
node options this issue adds (--no-dashboard, free JSON-RPC and metrics
addresses)."""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from common.identity import Identity
from common.nodeconfig import NodeConfig
from services.apid.core import NodeApi
from services.apid.metrics import NodeCollector, create_metrics_app
from services.apid.stats import STATE_FILE, Sampler, StatsCollector, crypto_operation, is_drop_counter
from services.cli.client import format_bytes, format_seconds, table
from services.cli.main import build_parser
from services.cli.options import OptionError, resolve
from tests.integration.nodes import free_port as free_tcp_port

from .test_api_rpc import StubBus

SERVICES = ("router", "tund", "apid", "peerd-tcp")


def stats_msg(service: str, pid: int, started: float, counters: dict[str, int] | None = None, **gauges: Any) -> dict:
    return {"service": service, "pid": pid, "started": started, "counters": counters or {}, "gauges": gauges}


def test_restarts_counted_from_pid_changes_and_persisted(tmp_path: Path) -> None:
    s = StatsCollector(None, str(tmp_path), node_start_time=100)
    s.record(stats_msg("router", 10, 1.0), 5.0)
    s.record(stats_msg("router", 10, 1.0), 6.0)
    assert s.restart_counts().get("router", 0) == 0
    s.record(stats_msg("router", 11, 7.0), 8.0)
    s.record(stats_msg("tund", 12, 1.0), 8.0)
    assert s.restart_counts() == {"router": 1}
    # a restarted apid (another pid in the state file) keeps the counts and counts itself
    state = json.loads((tmp_path / STATE_FILE).read_text())
    state["apid_pid"] = os.getpid() + 1
    (tmp_path / STATE_FILE).write_text(json.dumps(state))
    s2 = StatsCollector(None, str(tmp_path), node_start_time=100)
    assert s2.restart_counts() == {"router": 1, "apid": 1}
    s2.record(stats_msg("router", 11, 7.0), 9.0)  # same process as before apid's restart
    s2.record(stats_msg("tund", 13, 9.0), 9.0)  # restarted while apid was away
    assert s2.restart_counts() == {"router": 1, "apid": 1, "tund": 1}
    # a new run of the node starts from zero
    s3 = StatsCollector(None, str(tmp_path), node_start_time=200)
    assert s3.restart_counts() == {}


def test_corrupt_state_file_is_ignored(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text("{not json")
    s = StatsCollector(None, str(tmp_path), node_start_time=1)
    assert s.restart_counts() == {}
    s.record({"service": 5}, 1.0)  # junk from the bus is ignored
    s.record({"service": "x", "counters": "nope"}, 1.0)
    assert s.snapshot() == {}


def test_health(tmp_path: Path) -> None:
    s = StatsCollector(None, str(tmp_path))
    s.started = 0.0
    s.record(stats_msg("router", 10, 50.0), 98.0)
    s.record(stats_msg("tund", 11, 50.0), 90.0)
    s.record(stats_msg("peerd-tcp", 12, 50.0), 10.0)
    health = {x["name"]: x for x in s.services(("router", "tund", "apid", "peerd-tcp", "msgbus"), now=100.0)}
    assert health["router"]["health"] == "up" and health["router"]["uptime"] == 50.0
    assert health["tund"]["health"] == "stale"
    assert health["peerd-tcp"]["health"] == "down" and health["peerd-tcp"]["uptime"] is None
    assert health["msgbus"]["health"] == "down" and health["msgbus"]["pid"] is None
    assert health["apid"]["health"] == "up" and health["apid"]["pid"] == os.getpid()


def make_api(tmp_path: Path, stub: StubBus) -> NodeApi:
    cfg = NodeConfig(run_dir=str(tmp_path), key_file=str(tmp_path / "k"), start_time=1716100000)
    return NodeApi(cfg, Identity.from_secret(bytes(range(32))), stub)


def test_sampler_rates_and_counter_resets(tmp_path: Path) -> None:
    stub = StubBus()
    api = make_api(tmp_path, stub)
    stats = StatsCollector(None, str(tmp_path))
    sampler = Sampler(api, stats)
    peer = dict(stub("x", "list_peers")[0])

    def feed(rx: int, tx: int, data_rx: int, drops: int) -> None:
        peer.update(rxBytes=rx, txBytes=tx)
        stats.record(stats_msg("peerd-tcp", 1, 0.0, {"data_rx": data_rx, "data_queue_full": drops}), 0.0)

    stub_peers = [peer]
    api.peers_raw = lambda: [dict(p) for p in stub_peers]  # type: ignore[method-assign]
    feed(1000, 500, 10, 0)
    assert sampler.sample(100.0) == {"t": 100.0}  # the first sample has nothing to compare with
    feed(3000, 1500, 30, 4)
    point = sampler.sample(102.0)
    assert point["rxBytesPerSec"] == 1000 and point["txBytesPerSec"] == 500
    assert point["dataPacketsInPerSec"] == 10 and point["dropsPerSec"] == 2
    peers, when = sampler.latest_peers()
    assert when == 102.0 and peers[0]["rxRate"] == 1000 and peers[0]["txRate"] == 500
    feed(3100, 1500, 5, 0)  # peerd restarted: counters start again, rates never go negative
    point = sampler.sample(103.0)
    assert point["dataPacketsInPerSec"] == 5 and point["dropsPerSec"] == 0
    assert len(sampler.recent(10)) == 2


def test_metrics_families(tmp_path: Path) -> None:
    stub = StubBus()
    api = make_api(tmp_path, stub)
    stats = StatsCollector(None, str(tmp_path))
    sampler = Sampler(api, stats)
    stats.record(
        stats_msg(
            "peerd-tcp",
            5,
            10.0,
            {"data_rx": 9, "data_drop_no_route": 2, "stream_malformed": 1},
            send_queue=3,
            pending=4,
            fib_entries=7,
            links=2,
        ),
        11.0,
    )
    stats.record(stats_msg("tund", 6, 10.0, {"rx_decrypted": 8, "rx_decrypt_failed": 1}, pending=0), 11.0)
    stats.record(stats_msg("router", 7, 10.0, {"ctl_sent": 3}, routes=12, peers=2, note="text"), 11.0)
    stats.record(stats_msg("router", 8, 12.0, {"ctl_sent": 1}, routes=12, peers=2), 12.0)
    sampler.sample(20.0)
    text = generate_latest(_registry(NodeCollector(api, stats, sampler, SERVICES))).decode()
    for line in (
        'mycelium_peer_rx_bytes_total{endpoint="tcp://192.0.2.6:9651",type="static"} 20.0',
        'mycelium_peer_tx_bytes_total{endpoint="tcp://192.0.2.6:9651",type="static"} 10.0',
        'mycelium_peer_tx_packets_total{endpoint="tcp://192.0.2.6:9651",type="static"} 7.0',
        'mycelium_peer_connected{endpoint="tcp://192.0.2.6:9651",type="static"} 1.0',
        'mycelium_peers{state="alive"} 1.0',
        'mycelium_drops_total{reason="data_drop_no_route",service="peerd-tcp"} 2.0',
        'mycelium_drops_total{reason="stream_malformed",service="peerd-tcp"} 1.0',
        'mycelium_drops_total{reason="rx_decrypt_failed",service="tund"} 1.0',
        'mycelium_queue_depth{queue="send_queue",service="peerd-tcp"} 3.0',
        'mycelium_queue_depth{queue="pending",service="peerd-tcp"} 4.0',
        'mycelium_routes{kind="selected",service="router"} 12.0',
        'mycelium_routes{kind="fib",service="peerd-tcp"} 7.0',
        'mycelium_crypto_operations_total{operation="decrypt",result="ok",service="tund"} 8.0',
        'mycelium_crypto_operations_total{operation="decrypt",result="failed",service="tund"} 1.0',
        'mycelium_service_restarts_total{service="router"} 1.0',
        'mycelium_service_restarts_total{service="apid"} 0.0',
        'mycelium_service_counter_total{counter="data_rx",service="peerd-tcp"} 9.0',
        'mycelium_service_gauge{gauge="links",service="peerd-tcp"} 2.0',
        "mycelium_node_start_time_seconds 1.7161e+09",
    ):
        assert line in text, line
    assert "note" not in text  # non-numeric gauges are not exported


def test_router_neighbour_families(tmp_path: Path) -> None:
    api = make_api(tmp_path, StubBus())
    stats = StatsCollector(None, str(tmp_path))
    row = {"routes": 5, "queries": 1, "seqno_requests": 0, "routes_evicted": 3, "routes_refused": 9}
    stats.record(stats_msg("router", 7, 10.0, {}, routes=5, neighbours={"tcp-1-2": row, "bad": "x"}), 11.0)
    text = generate_latest(_registry(NodeCollector(api, stats, None, SERVICES))).decode()
    lines = set(text.splitlines())
    assert {
        'mycelium_router_neighbour_entries{peer="tcp-1-2",table="routes"} 5.0',
        'mycelium_router_neighbour_entries{peer="tcp-1-2",table="queries"} 1.0',
        'mycelium_router_neighbour_events_total{event="routes_evicted",peer="tcp-1-2"} 3.0',
        'mycelium_router_neighbour_events_total{event="routes_refused",peer="tcp-1-2"} 9.0',
    } <= lines
    assert 'peer="bad"' not in text


def _registry(collector: NodeCollector) -> Any:
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    return reg


def test_metrics_app_paths(tmp_path: Path) -> None:
    api = make_api(tmp_path, StubBus())
    stats = StatsCollector(None, str(tmp_path))
    app = create_metrics_app(NodeCollector(api, stats, None, SERVICES))
    statuses: list[str] = []

    def start(status: str, headers: list[tuple[str, str]]) -> None:
        statuses.append(status)

    body = b"".join(app({"PATH_INFO": "/metrics", "REQUEST_METHOD": "GET", "QUERY_STRING": ""}, start))
    assert statuses[-1].startswith("200") and b"mycelium_info" in body
    app({"PATH_INFO": "/", "REQUEST_METHOD": "GET"}, start)
    assert statuses[-1].startswith("404")
    app({"PATH_INFO": "/metrics", "REQUEST_METHOD": "POST"}, start)
    assert statuses[-1].startswith("405")


def test_counter_classification() -> None:
    for name in (
        "data_drop_no_route",
        "control_queue_full",
        "bus_full_tcp",
        "bus_timeout_router",
        "stream_malformed",
        "tx_no_route_dropped",
        "rx_spoofed_source",
        "tun_write_error",
        "rx_decrypt_failed",
    ):
        assert is_drop_counter(name), name
    for name in ("data_rx", "links_opened", "ctl_sent", "rx_decrypted", "rx_opened", "tx_sealed", "fib_snapshots"):
        assert not is_drop_counter(name), name
    assert crypto_operation("rx_decrypted") == ("decrypt", "ok")
    assert crypto_operation("tx_encrypted") == ("encrypt", "ok")
    assert crypto_operation("rx_decrypt_failed") == ("decrypt", "failed")
    assert crypto_operation("rx_opened") == ("decrypt", "ok")
    assert crypto_operation("tx_sealed") == ("encrypt", "ok")
    assert crypto_operation("rx_oob_undecryptable") == ("decrypt", "failed")
    assert crypto_operation("data_rx") is None


def test_client_formatting() -> None:
    assert format_bytes(0) == "0.00 B" and format_bytes(1536) == "1.50 KiB" and format_bytes(None) == "-"
    assert format_seconds(5) == "5s" and format_seconds(3725) == "1h 2m 5s" and format_seconds(90061) == "1d 1h 1m 1s"
    out = table(["A", "Bee"], [["x", 10], ["long value", None]], right=(1,))
    lines = out.splitlines()
    assert lines[0] == lines[2] == lines[-1] == "+------------+-----+"
    assert lines[1] == "| A          | Bee |" and lines[3] == "| x          |  10 |"
    assert table(["A"], []).count("\n") == 2


def parse(*args: str) -> argparse.Namespace:
    return build_parser().parse_args(["--no-tun", *args])


def test_no_dashboard_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    base = ["--run-dir", str(tmp_path / "run"), "-t", str(free_tcp_port())]
    base += ["--api-addr", f"127.0.0.1:{free_tcp_port()}", "--jsonrpc-addr", f"127.0.0.1:{free_tcp_port()}"]
    assert resolve(parse(*base), warn=print, check_ports=False).dashboard is True
    assert resolve(parse(*base, "--no-dashboard"), warn=print, check_ports=False).dashboard is False
    cfg_file = tmp_path / "m.toml"
    cfg_file.write_text("no_dashboard = true\n")
    assert resolve(parse(*base, "-c", str(cfg_file)), warn=print, check_ports=False).dashboard is False
    # node.json written before this field existed still loads, with the dashboard on
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "node.json").write_text(json.dumps({"run_dir": "x", "key_file": "y"}))
    assert NodeConfig.load(tmp_path / "old").dashboard is True


def test_listener_addresses_are_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    api, rpc, metrics = free_tcp_port(), free_tcp_port(), free_tcp_port()
    base = ["--run-dir", str(tmp_path / "run"), "-t", str(free_tcp_port()), "--api-addr", f"127.0.0.1:{api}"]
    cfg = resolve(
        parse(*base, "--jsonrpc-addr", f"127.0.0.1:{rpc}", "--metrics-api-address", f"127.0.0.1:{metrics}"), print
    )
    assert (cfg.jsonrpc_addr, cfg.metrics_api_address) == (f"127.0.0.1:{rpc}", f"127.0.0.1:{metrics}")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        with pytest.raises(OptionError, match=r"JSON-RPC address 127\.0\.0\.1:\d+ is not available"):
            resolve(parse(*base, "--jsonrpc-addr", f"127.0.0.1:{taken}"), print)
        with pytest.raises(OptionError, match=r"metrics address 127\.0\.0\.1:\d+ is not available"):
            resolve(
                parse(*base, "--jsonrpc-addr", f"127.0.0.1:{rpc}", "--metrics-api-address", f"127.0.0.1:{taken}"),
                print,
            )
    with pytest.raises(OptionError, match="JSON-RPC address and API address are both"):
        resolve(parse(*base, "--jsonrpc-addr", f"127.0.0.1:{api}"), print)
    with pytest.raises(OptionError, match="metrics address"):
        resolve(parse(*base, "--jsonrpc-addr", f"127.0.0.1:{rpc}", "--metrics-api-address", "nonsense"), print)


def test_sampler_slows_down_when_nobody_reads_and_wakes_on_a_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unread, from its start on, the sampler waits IDLE_SAMPLE_INTERVAL between samples (each
    one asks peerd for its peers); a read after that takes a sample at once
    and brings back 1 s sampling."""
    import services.apid.stats as stats_mod

    api = make_api(tmp_path, StubBus())
    calls: list[float] = []
    api.peers_raw = lambda: calls.append(time.monotonic()) or []  # type: ignore[method-assign,func-returns-value]
    sampler = Sampler(api, StatsCollector(None, str(tmp_path)), interval=0.05)
    monkeypatch.setattr(stats_mod, "IDLE_SAMPLE_INTERVAL", 30.0)
    monkeypatch.setattr(stats_mod, "WATCHED_FOR", 0.3)
    assert sampler.next_interval(time.monotonic()) == 30.0  # just started, nobody has read: unwatched
    sampler.start()
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (calls and time.monotonic() - sampler._last_read > 0.5):
            time.sleep(0.05)
        assert sampler.next_interval(time.monotonic()) == 30.0
        while time.monotonic() < deadline and time.monotonic() - calls[-1] < 0.3:
            time.sleep(0.05)  # a short wait begun while still watched ends in one more sample
        settled = len(calls)
        time.sleep(0.5)
        assert len(calls) == settled  # unread: no sample within half a second (the next is 30 s away)
        sampler.recent(5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(calls) < settled + 3:
            sampler.latest_peers()
            time.sleep(0.02)
        assert len(calls) >= settled + 3  # read: sampled at once, then at the short interval again
    finally:
        sampler.stop()
        sampler.thread.join(5)
    assert not sampler.thread.is_alive()
