"""Prometheus ``/metrics`` on ``--metrics-api-address``, built at scrape
time from what apid already holds (stats.py): the services' published
counters and gauges, the sampler's latest peer list and the restart
counts. A scrape never waits on another service.

Families (all prefixed ``mycelium_``):

- ``peer_rx_bytes_total`` / ``peer_tx_bytes_total`` {endpoint, type}: bytes
  read from / written to each peer's link; ``peer_rx_packets_total`` /
  ``peer_tx_packets_total`` when the peerd reports per-peer packet counts
  (``rxPackets`` / ``txPackets`` in its peer list); ``peer_connected``.
- ``drops_total`` {service, reason}: every counter of something lost.
- ``queue_depth`` {service, queue}: pending-route queues and link send queues.
- ``routes`` {kind}: selected routes (router), FIB entries per data-path service.
- ``crypto_operations_total`` {service, operation, result}.
- ``service_restarts_total``, ``service_up``, ``service_start_time_seconds`` {service}.
- ``router_neighbour_entries`` {peer, table}: routes, forwarded queries and
  seqno requests the router holds for each neighbour;
  ``router_neighbour_events_total`` {peer, event}: its fairness counters
  (routes evicted / refused, requests refused).
- ``service_counter_total`` {service, counter} and ``service_gauge``
  {service, gauge}: everything the services publish, unfiltered.
- ``info`` {node_ip, node_subnet, public_key} and ``node_start_time_seconds``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .core import NodeApi
from .stats import QUEUE_GAUGES, Sampler, StatsCollector, crypto_operation, is_drop_counter, numeric, peer_key


class NodeCollector(Collector):
    def __init__(self, api: NodeApi, stats: StatsCollector, sampler: Sampler | None, expected: tuple[str, ...]) -> None:
        self.api = api
        self.stats = stats
        self.sampler = sampler
        self.expected = expected

    def collect(self) -> Iterable[Metric]:
        info = self.api.info()
        node = GaugeMetricFamily("mycelium_info", "This node", labels=["node_ip", "node_subnet", "public_key"])
        node.add_metric([info["nodeIp"], info["nodeSubnet"], info["nodePubkey"]], 1)
        yield node
        yield GaugeMetricFamily(
            "mycelium_node_start_time_seconds", "Node start, seconds since the Unix epoch", value=info["nodeStartTime"]
        )
        yield from self._peers()
        yield from self._services()

    def _peers(self) -> Iterator[Metric]:
        peers = self.sampler.latest_peers()[0] if self.sampler is not None else []
        labels = ["endpoint", "type"]
        rx = CounterMetricFamily("mycelium_peer_rx_bytes", "Bytes read from a peer's link", labels=labels)
        tx = CounterMetricFamily("mycelium_peer_tx_bytes", "Bytes written to a peer's link", labels=labels)
        rxp = CounterMetricFamily("mycelium_peer_rx_packets", "Packets read from a peer's link", labels=labels)
        txp = CounterMetricFamily("mycelium_peer_tx_packets", "Packets written to a peer's link", labels=labels)
        up = GaugeMetricFamily("mycelium_peer_connected", "1 if the peer's link is alive", labels=labels)
        states = GaugeMetricFamily("mycelium_peers", "Known peers by connection state", labels=["state"])
        by_state = {"alive": 0, "connecting": 0, "dead": 0}
        for p in peers:
            lv = [peer_key(p), str(p.get("type"))]
            rx.add_metric(lv, float(p.get("rxBytes") or 0))
            tx.add_metric(lv, float(p.get("txBytes") or 0))
            if numeric(p.get("rxPackets")):
                rxp.add_metric(lv, float(p["rxPackets"]))
            if numeric(p.get("txPackets")):
                txp.add_metric(lv, float(p["txPackets"]))
            state = str(p.get("connectionState"))
            up.add_metric(lv, 1 if state == "alive" else 0)
            by_state[state] = by_state.get(state, 0) + 1
        for state, n in by_state.items():
            states.add_metric([state], n)
        yield from (rx, tx, rxp, txp, up, states)

    def _neighbours(self, gauges: dict[str, Any]) -> Iterator[Metric]:
        held = GaugeMetricFamily(
            "mycelium_router_neighbour_entries", "Router state held per neighbour", labels=["peer", "table"]
        )
        events = CounterMetricFamily(
            "mycelium_router_neighbour_events", "Router fairness events per neighbour", labels=["peer", "event"]
        )
        rows = gauges.get("neighbours")
        for peer, row in sorted(rows.items()) if isinstance(rows, dict) else ():
            if not isinstance(row, dict):
                continue
            for name, value in sorted(row.items()):
                if not numeric(value):
                    continue
                if name in ("routes", "queries", "seqno_requests", "ctl_backlog"):
                    held.add_metric([str(peer), name], value)
                else:
                    events.add_metric([str(peer), name], value)
        yield from (held, events)

    def _services(self) -> Iterator[Metric]:
        snapshot = self.stats.snapshot()
        drops = CounterMetricFamily(
            "mycelium_drops", "Packets or messages dropped, by reason", labels=["service", "reason"]
        )
        queues = GaugeMetricFamily("mycelium_queue_depth", "Items waiting in a queue", labels=["service", "queue"])
        routes = GaugeMetricFamily("mycelium_routes", "Routing table and FIB sizes", labels=["kind", "service"])
        crypto = CounterMetricFamily(
            "mycelium_crypto_operations", "End-to-end crypto operations", labels=["service", "operation", "result"]
        )
        counters = CounterMetricFamily(
            "mycelium_service_counter", "Every counter a service publishes", labels=["service", "counter"]
        )
        gauges = GaugeMetricFamily(
            "mycelium_service_gauge", "Every gauge a service publishes", labels=["service", "gauge"]
        )
        for service, fields in sorted(snapshot.items()):
            for name, value in sorted((fields.get("counters") or {}).items()):
                if not numeric(value):
                    continue
                counters.add_metric([service, name], value)
                if is_drop_counter(name):
                    drops.add_metric([service, name], value)
                op = crypto_operation(name)
                if op is not None:
                    crypto.add_metric([service, *op], value)
            for name, value in sorted((fields.get("gauges") or {}).items()):
                if not numeric(value):
                    continue
                gauges.add_metric([service, name], value)
                if name in QUEUE_GAUGES or name.endswith("_queue"):
                    queues.add_metric([service, name], value)
                if service == "router" and name == "routes":
                    routes.add_metric(["selected", service], value)
                elif name == "fib_entries":
                    routes.add_metric(["fib", service], value)
        yield from (drops, queues, routes, crypto, counters, gauges)
        yield from self._neighbours((snapshot.get("router") or {}).get("gauges") or {})

        restarts = CounterMetricFamily("mycelium_service_restarts", "Process restarts seen", labels=["service"])
        up = GaugeMetricFamily(
            "mycelium_service_up",
            "1 if the service reports in or waits for its first use (on demand)",
            labels=["service"],
        )
        started = GaugeMetricFamily(
            "mycelium_service_start_time_seconds", "Process start, seconds since the Unix epoch", labels=["service"]
        )
        for s in self.stats.services(self.expected):
            restarts.add_metric([s["name"]], s["restarts"])
            up.add_metric([s["name"]], 1 if s["health"] in ("up", "idle") else 0)  # idle: waiting for its first use
            if numeric(s["started"]):
                started.add_metric([s["name"]], s["started"])
        yield from (restarts, up, started)


def create_metrics_app(collector: NodeCollector) -> Callable[..., Any]:
    """A WSGI app answering ``GET /metrics`` only."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"Not found; metrics are at /metrics\n"]
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Content-Type", "text/plain"), ("Allow", "GET, HEAD")])
            return [b"Method not allowed\n"]
        return metrics(environ, start_response)

    return app
