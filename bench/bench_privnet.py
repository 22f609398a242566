"""Private networks and discovery, short figures beside a baseline from the same run.

    sudo .venv/bin/python bench/bench_privnet.py [--seconds 5] [--handshakes 50]

(1) TLS-PSK handshake time on loopback: our ``handshake()`` (both sides in
    this process, the node's code) against a plain TCP connect+accept, and the
    handshake's CPU cost alone (two in-memory ``TlsSession``s); and the link
    alone: 64 KB batches of packets through one TLS link and one TCP link
    (the node's link classes, both ends in this process).
(2) Between two network namespaces joined by a veth pair (needs root,
    iperf3): time from starting two nodes to their first live link, with a
    static tcp:// peer (baseline), a static tls:// peer in a private
    network, and no peers at all (link-local discovery); and single-stream
    iperf3 throughput through the overlay over the TCP link and over the
    TLS link.

Prints markdown; docs/PERFORMANCE.md records one run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import socket
import statistics
import struct
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_dataplane import Result, machine, measure, warm  # noqa: E402

from common.endpoint import Endpoint  # noqa: E402
from common.nodeconfig import NodeConfig  # noqa: E402
from common.privnet import PrivateNetwork, TlsSession, client_context, server_context  # noqa: E402
from services.peerd.links.tcp import TcpFactory  # noqa: E402
from services.peerd.links.tls import TlsFactory, handshake  # noqa: E402
from tests.integration.netns import NODE_PORT, Topology, cleanup_stale, have_privileges, wait_for  # noqa: E402
from tests.integration.nodes import free_port  # noqa: E402

NET = PrivateNetwork("benchnet", os.urandom(32))


async def _pairs(n: int, tls: bool) -> list[float]:
    """``n`` connections on loopback, each timed from connect to ready (TLS: both handshakes done)."""
    loop = asyncio.get_running_loop()
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.setblocking(False)
    port = lsock.getsockname()[1]
    sctx, cctx = server_context(NET), client_context(NET)
    times = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            client = socket.socket()
            client.setblocking(False)
            connect = loop.create_task(loop.sock_connect(client, ("127.0.0.1", port)))
            conn, _ = await loop.sock_accept(lsock)
            await connect
            conn.setblocking(False)
            if tls:
                await asyncio.gather(handshake(conn, sctx, True, 5.0), handshake(client, cctx, False, 5.0))
            times.append(time.perf_counter() - t0)
            conn.close()
            client.close()
    finally:
        lsock.close()
    return times


def memory_handshake_cpu(n: int) -> float:
    """CPU seconds of one handshake (both sides), no sockets."""
    sctx, cctx = server_context(NET), client_context(NET)
    t0 = time.process_time()
    for _ in range(n):
        c, s = TlsSession(cctx, False), TlsSession(sctx, True)
        done_c = done_s = False
        while not (done_c and done_s):
            done_c = done_c or c.handshake()
            s.feed(c.pending_out())
            done_s = done_s or s.handshake()
            c.feed(s.pending_out())
    return (time.process_time() - t0) / n


def handshakes(n: int) -> str:
    tcp = asyncio.run(_pairs(n, tls=False))
    tls = asyncio.run(_pairs(n, tls=True))
    cpu = memory_handshake_cpu(n)
    med_tcp, med_tls = statistics.median(tcp) * 1e3, statistics.median(tls) * 1e3
    return "\n".join(
        [
            "| loopback, one process | median ms | p90 ms |",
            "|---|---|---|",
            f"| TCP connect + accept (baseline) | {med_tcp:.2f} | {sorted(tcp)[int(n * 0.9)] * 1e3:.2f} |",
            f"| TCP + TLS 1.3 PSK handshake (ours) | {med_tls:.2f} | {sorted(tls)[int(n * 0.9)] * 1e3:.2f} |",
            f"| handshake CPU, both sides, in memory | {cpu * 1e3:.2f} | |",
        ]
    )


class SinkHost:
    """A LinkHost that counts what arrives (for the link-only figure)."""

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()
        self.bytes = 0
        self.links: list[Any] = []

    def on_control(self, link: Any, packets: list[bytes]) -> None:
        pass

    def on_data(self, link: Any, buf: bytearray, offsets: list[int]) -> None:
        self.bytes += sum(40 + (buf[o + 5] << 8 | buf[o + 6]) for o in offsets)

    def on_closed(self, link: Any, reason: str) -> None:
        pass

    def accepted(self, link: Any) -> None:
        link.link_id = "in"
        self.links.append(link)
        link.start()

    def spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(coro, name=name)


async def _link_throughput(tls: bool, megabytes: int) -> float:
    """One process, loopback: batches of 1440-byte packets through one link; Gbit/s."""
    tmp = Path(f"/tmp/bench-privnet-link-{os.getpid()}.key")
    tmp.write_bytes(NET.key)
    cfg = NodeConfig(run_dir="/tmp", key_file="k", tcp_listen_port=free_port())
    if tls:
        cfg.network_name, cfg.network_key_file = NET.name, str(tmp)
    server_host, client_host = SinkHost(), SinkHost()
    server: TcpFactory = TlsFactory(cfg, server_host, NET) if tls else TcpFactory(cfg, server_host)
    client: TcpFactory = TlsFactory(cfg, client_host, NET) if tls else TcpFactory(cfg, client_host)
    await server.listen()
    link = await client.dial(Endpoint("tls" if tls else "tcp", "127.0.0.1", cfg.tcp_listen_port))
    link.link_id = "out"
    link.start()
    body = bytes(1400)
    batch = (struct.pack("!BBxxxHB", 1, 0, len(body), 64) + bytes(32) + body) * 44  # ~64 KB, as tund sends
    total = megabytes * 1_000_000
    t0 = time.perf_counter()
    sent = 0
    while sent < total:
        if link.send_data(batch, 44):
            sent += len(batch)
        else:
            await asyncio.sleep(0)
    while server_host.bytes < sent:
        await asyncio.sleep(0.001)
    took = time.perf_counter() - t0
    link.close("done")
    await server.close()
    tmp.unlink(missing_ok=True)
    return sent * 8 / took / 1e9


def link_throughput(megabytes: int) -> str:
    rows = ["| one link, one process, loopback | Gbit/s (best of 3) | x TCP |", "|---|---|---|"]
    tcp = max(asyncio.run(_link_throughput(False, megabytes)) for _ in range(3))
    tls = max(asyncio.run(_link_throughput(True, megabytes)) for _ in range(3))
    rows.append(f"| TCP link (baseline) | {tcp:.2f} | 1.00 |")
    rows.append(f"| TLS link (ChaCha20-Poly1305) | {tls:.2f} | {tls / tcp:.2f} |")
    return "\n".join(rows)


# --- nodes in namespaces ---------------------------------------------------------------------


def _stamp(line: str) -> float:
    return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def peerd_to_link(topo: Topology) -> float:
    """From the later of the two peerds' start (its listening line) to the
    first link up, from the nodes' logs: the protocol's part, without the
    node start-up that dominates the wall-clock figure on a loaded machine."""
    starts, ups = [], []
    for node in topo.nodes.values():
        lines = node.log_path.read_text(errors="replace").splitlines()
        starts += [_stamp(ln) for ln in lines if "INFO  peerd-tcp: peerd-tcp: " in ln][:1]
        ups += [_stamp(ln) for ln in lines if "INFO  peerd-tcp: link " in ln and " up: " in ln][:1]
    return min(ups) - max(starts)


def link_up_time(kind: str, key: Path) -> tuple[float, Topology]:
    """Start x and y (y peers x per ``kind``); seconds until both have a live link."""
    topo = Topology(["x", "y"])
    x_addr, _ = topo.connect("x", "y", 1)
    private = ["--network-name", NET.name, "--network-key-file", str(key)]
    if kind == "tcp":
        topo.add_node("x")
        topo.add_node("y", peers=[f"tcp://{x_addr}:{NODE_PORT}"])
    elif kind == "tls":
        topo.add_node("x", extra=private)
        topo.add_node("y", peers=[f"tls://{x_addr}:{NODE_PORT}"], extra=private)
    else:
        topo.add_node("x", tun=False, discovery=True)
        topo.add_node("y", tun=False, discovery=True)
    t0 = time.monotonic()
    for node in topo.nodes.values():
        node.start()

    def linked() -> bool:
        try:
            return all(
                any(p["connectionState"] == "alive" for p in n.rpc("peerd-tcp", "list_peers"))
                for n in topo.nodes.values()
            )
        except Exception:
            return False

    wait_for(f"{kind} link", linked, 90, interval=0.05)
    return time.monotonic() - t0, topo


def nodes_part(seconds: int, rounds: int) -> str:
    key = Path(f"/tmp/bench-privnet-{os.getpid()}.key")
    key.write_bytes(NET.key)
    key.chmod(0o644)
    rows = []
    try:
        results: dict[str, tuple[list[float], Result | None]] = {}
        protocol: dict[str, list[float]] = {}
        for rnd in range(rounds):
            for kind in ("tcp", "tls", "discovery"):
                print(f"round {rnd + 1}, {kind}: starting two nodes ...", flush=True)
                took, topo = link_up_time(kind, key)
                part = peerd_to_link(topo)
                protocol.setdefault(kind, []).append(part)
                print(f"    linked after {took:.1f} s ({part:.2f} s after the later peerd started)", flush=True)
                times, best = results.get(kind, ([], None))
                try:
                    if kind != "discovery":
                        y = topo.nodes["y"]
                        warm(topo, "x", y.address)
                        res: Result = measure(topo, "x", "y", y.address, seconds, Result(f"overlay over a {kind} link"))
                        print(f"    {res.gbit:.2f} Gbit/s", flush=True)
                        if best is None or res.gbit > best.gbit:
                            best = res
                finally:
                    topo.close()
                results[kind] = ([*times, took], best)
        rows = [
            "| two nodes in namespaces | start to live link, s (each round) | later peerd start to link, s "
            "| overlay iperf3 Gbit/s (best) | x TCP link |",
            "|---|---|---|---|---|",
        ]
        base = results["tcp"][1]
        for kind, label in (
            ("tcp", "static tcp:// peer (baseline)"),
            ("tls", "static tls:// peer, private network"),
            ("discovery", "no peers, link-local discovery"),
        ):
            times, shown = results[kind]
            gbit = f"{shown.gbit:.2f}" if shown else "-"
            ratio = f"{shown.gbit / base.gbit:.2f}" if shown and base and base.gbit else "-"
            parts = ", ".join(f"{t:.2f}" for t in protocol[kind])
            rows.append(f"| {label} | {', '.join(f'{t:.1f}' for t in times)} | {parts} | {gbit} | {ratio} |")
    finally:
        key.unlink(missing_ok=True)
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help="iperf3 duration (default 5)")
    parser.add_argument("--handshakes", type=int, default=50)
    parser.add_argument("--megabytes", type=int, default=200, help="per link-only run (default 200)")
    parser.add_argument("--rounds", type=int, default=2, help="node measurements in rotation (default 2)")
    parser.add_argument("--no-nodes", action="store_true", help="only the in-process handshake figures")
    args = parser.parse_args()
    print(f"machine: {machine()}", flush=True)
    print(handshakes(args.handshakes), flush=True)
    print(link_throughput(args.megabytes), flush=True)
    if args.no_nodes:
        return 0
    problem = have_privileges()
    if problem:
        print(f"bench_privnet: {problem}", file=sys.stderr)
        return 1
    cleanup_stale()
    print(nodes_part(args.seconds, args.rounds), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
