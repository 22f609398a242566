from __future__ import annotations

import ipaddress

from services.peerd.packet_stats import PacketStats


def ip(n: int) -> bytes:
    return ipaddress.IPv6Address(f"400::{n:x}").packed


def test_counts_by_source_and_destination_in_reference_shape() -> None:
    stats = PacketStats()
    stats.add(ip(1), ip(2), 1, 100)
    stats.add(ip(1), ip(3), 1, 50)
    doc = stats.to_json()
    assert doc["bySource"] == [{"ip": "400::1", "packetCount": 2, "byteCount": 150}]
    assert {d["ip"]: d["packetCount"] for d in doc["byDestination"]} == {"400::2": 1, "400::3": 1}


def test_tables_are_bounded_and_forget_the_least_recent() -> None:
    stats = PacketStats(limit=3)
    for n in range(10):
        stats.add(ip(n), ip(0), 1, 1)
    stats.add(ip(7), ip(0), 1, 1)  # refreshes 7
    stats.add(ip(100), ip(0), 1, 1)
    sources = [d["ip"] for d in stats.to_json()["bySource"]]
    assert len(sources) == 3 and "400::7" in sources and "400::8" not in sources
    assert stats.by_source.evicted == 8
