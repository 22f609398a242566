"""peerd's shell without root or a running node: a PeerdService on a
temporary run directory with an in-memory link (the LinkHost side), the
router's inbox as a plain PULL socket. Checks what the service does with
link events and with batches for next hops of this family, another
family, or none."""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import msgpack
import pytest
import zmq

from common import bus
from common.endpoint import Endpoint
from common.nodeconfig import NodeConfig
from common.shmring import remove_rings
from services.peerd.links.base import Link, LinkStats
from services.peerd.service import PeerdService


class MemoryLink(Link):
    """A link whose wire is a list (conn/bindtest style)."""

    link_type = "tcp"

    def __init__(self, host: PeerdService, n: int) -> None:
        super().__init__(host, Endpoint("tcp", "192.0.2.1", 1000 + n), f"MEM {n}", 10, inbound=False)
        self.sent: list[bytes] = []
        self.started = False

    def start(self) -> None:
        self.started = True

    def send_control(self, packets: Sequence[bytes]) -> None:
        self.sent += [bytes(p) for p in packets]

    def send_data(self, frame: bytes | bytearray | memoryview, packets: int = 1, borrowed: bool = False) -> bool:
        self.sent.append(bytes(frame))
        return True

    def close(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.host.on_closed(self, reason)

    def stats(self) -> LinkStats:
        return LinkStats(tx_bytes=sum(map(len, self.sent)))


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[PeerdService, zmq.Socket]]:
    run = tmp_path / "r"
    run.mkdir()
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    cfg = NodeConfig(run_dir=str(run), key_file=str(key), peerd_families={"tcp": ["tcp"], "quic": ["quic"]})
    ctx = zmq.Context()
    router = bus.bind(ctx, zmq.PULL, str(run), "router.in")
    svc = PeerdService(cfg, "tcp")
    yield svc, router
    svc.ctx.destroy(linger=0)
    svc.sync_ctx.destroy(linger=0)
    ctx.destroy(linger=0)
    remove_rings(str(run))


def router_messages(sock: zmq.Socket) -> list[tuple[str, dict[str, object]]]:
    out = []
    while sock.poll(200):
        frames = sock.recv_multipart()
        header = msgpack.unpackb(frames[0], raw=False)
        out.append((header.pop("k"), header))
    return out


def packet(dst: bytes, hop: int = 64) -> bytes:
    body = b"b" * 32
    return struct.pack("!BBxxxHB", 1, 0, len(body), hop) + bytes(16) + dst + body


def route(svc: PeerdService, net: bytes, next_hop: str) -> None:
    svc.fib.load_snapshot({"epoch": 1, "seq": 0, "entries": [[net + bytes(8), 64, next_hop, b"k" * 32]]})
    svc.forwarder.fib_changed()


NET = bytes.fromhex("05bb00000000000c")
DST = NET + bytes(7) + b"\x01"


def test_link_up_and_down_reach_the_router_and_the_peer_table(service: tuple[PeerdService, zmq.Socket]) -> None:
    svc, router = service
    entry = svc.table.add_static(Endpoint.parse("tcp://192.0.2.1:1001"), 0.0)
    link = MemoryLink(svc, 1)
    svc.register(link, entry)
    assert link.started and link.link_id.startswith(f"tcp-{svc.epoch}-") and entry.state == "alive"
    link.send_control([b"c"])
    link.close("test")
    link.close("again")
    msgs = router_messages(router)
    assert [k for k, _ in msgs] == ["peer_up", "peer_down"]
    assert msgs[0][1]["static_cost"] == 10 and msgs[0][1]["link_name"] == "MEM 1"
    assert entry.state == "dead" and entry.tx_bytes == 1 and not svc.links


def test_a_newer_inbound_link_from_the_same_address_replaces_the_old(service: tuple[PeerdService, zmq.Socket]) -> None:
    svc, _ = service
    first, second = MemoryLink(svc, 1), MemoryLink(svc, 1)
    first.inbound = second.inbound = True
    svc.accepted(first)
    svc.accepted(second)
    assert first.closed and not second.closed and list(svc.links) == [second.link_id]
    assert svc.table.entries[str(second.endpoint)].link_id == second.link_id


def test_batches_go_to_our_link_a_sibling_family_or_are_dropped(service: tuple[PeerdService, zmq.Socket]) -> None:
    svc, _ = service
    entry = svc.table.add_static(Endpoint.parse("tcp://192.0.2.1:1001"), 0.0)
    link = MemoryLink(svc, 1)
    svc.register(link, entry)
    # tund's batch for our link
    svc.data_batch(link.link_id, packet(DST), sibling=False, borrowed=True)
    assert link.sent == [packet(DST)]
    # for a link that is gone: through the FIB, whose next hop is peerd-quic's link
    route(svc, NET, "quic-abc-1")
    svc.data_batch("tcp-gone-1", packet(DST), sibling=False, borrowed=False)
    counters = svc.counters
    assert counters["data_to_sibling"] + counters["data_to_sibling_via_bus"] == 1
    # from a sibling, for a link of ours that is gone: dropped, never sent back
    svc.data_batch("tcp-gone-2", packet(DST), sibling=True, borrowed=True)
    assert counters["data_from_sibling_link_gone"] == 1
    # a next hop no family of this node owns
    route(svc, NET, "tls9-x-1")
    svc.data_batch("tcp-gone-3", packet(DST), sibling=False, borrowed=False)
    assert counters["data_drop_next_hop_gone"] == 1
    svc.data_batch(link.link_id, b"short", sibling=False, borrowed=False)
    assert counters["data_out_malformed"] == 1


def test_received_transit_packets_leave_on_the_next_hops_link(service: tuple[PeerdService, zmq.Socket]) -> None:
    svc, _ = service
    a, b = MemoryLink(svc, 1), MemoryLink(svc, 2)
    for link in (a, b):
        svc.register(link, svc.table.add_static(link.endpoint, 0.0))
    route(svc, NET, b.link_id)
    buf = bytearray(packet(DST) + packet(DST))
    svc.on_data(a, buf, [0, len(buf) // 2])
    buf[:] = bytes(len(buf))  # the link reuses its read buffer: what was sent must be a copy
    assert b.sent == [packet(DST, 63) + packet(DST, 63)]
    assert svc.counters["data_forwarded"] == 2


def test_debug_fail_is_ignored_without_the_env_and_raises_with_it(
    service: tuple[PeerdService, zmq.Socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    svc, _ = service
    monkeypatch.delenv("MYCELIUM_DEBUG_FAULTS", raising=False)
    svc.handle_inbox(bus.Message("debug_fail", {}))
    assert svc.counters["bus_unknown_kind"] == 1
    monkeypatch.setenv("MYCELIUM_DEBUG_FAULTS", "1")
    with pytest.raises(RuntimeError, match="debug_fail"):
        svc.handle_inbox(bus.Message("debug_fail", {}))


def test_a_failing_loop_callback_ends_run_with_the_error(service: tuple[PeerdService, zmq.Socket]) -> None:
    svc, _ = service

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(svc.exception_handler)

        def broken() -> None:
            raise ValueError("bug in a reader callback")

        loop.call_soon(broken)
        await svc.watch_stop()

    with pytest.raises(RuntimeError, match="callback failed") as info:
        asyncio.run(scenario())
    assert isinstance(info.value.__cause__, ValueError)
