"""SOCKS5 proxy throughput: a download through the overlay via the proxy
against the same download without it, in one run.

    sudo .venv/bin/python bench/bench_proxy.py [--mib 32] [--repeat 2]

Two namespaces A and B joined by one veth pair, a node in each. In B: an
HTTP server with a file of --mib MiB, and the SOCKS5 server of the tests
(tests/integration/socks_server.py) on B's overlay address, port 1080. A's
node is connected to it (`POST /api/v1/admin/proxy`). curl in A fetches
the file three ways:

  (a) direct over the veth (the baseline),
  (b) direct over the overlay (B's overlay address: TUN, crypto, TCP link),
  (c) through the proxy: curl -> A's proxyd [::]:1080 -> overlay -> B's
      SOCKS5 server -> B's HTTP server on 127.0.0.1.

Best of --repeat runs each. Prints a markdown table (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.netns import NODE_PORT, Topology, cleanup_stale, have_privileges, in_netns, wait_for  # noqa: E402

HTTP_PORT = 8080


def fetch(topo: Topology, url: str, socks: bool) -> float:
    """Mbit/s of one download (curl's average speed)."""
    cmd = ["curl", "-sS", "-o", "/dev/null", "--max-time", "120", "-w", "%{speed_download} %{size_download}"]
    if socks:
        cmd += ["--socks5", "[::1]:1080"]
    out = topo.exec("a", [*cmd, url], timeout=130)
    if out.returncode != 0:
        raise SystemExit(f"curl {url} failed: {out.stderr.strip()}")
    speed, _size = out.stdout.split()
    return float(speed) * 8 / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    missing = have_privileges()
    if missing:
        raise SystemExit(f"bench_proxy {missing}")
    cleanup_stale()
    topo = Topology(["a", "b"])
    helpers: list[subprocess.Popen[str]] = []
    try:
        a_ab, b_ab = topo.connect("a", "b", 1)
        topo.add_node("a")
        b = topo.add_node("b", peers=[f"tcp://{a_ab}:{NODE_PORT}"])
        topo.start_all()
        www = topo.base / "www"
        www.mkdir()
        (www / "blob").write_bytes(bytes(args.mib * 1024 * 1024))
        http = topo.popen(
            "b", [sys.executable, "-m", "http.server", "-b", "::", "-d", str(www), str(HTTP_PORT)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        helpers.append(http)
        socks = topo.popen(
            "b", [sys.executable, str(REPO / "tests/integration/socks_server.py"), b.address, "1080", "valid"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        helpers.append(socks)
        assert socks.stdout is not None and socks.stdout.readline().strip() == "ready"

        def connect() -> bool:
            body = json.dumps({"remote": f"[{b.address}]:1080"}).encode()
            req = urllib.request.Request("http://127.0.0.1:8989/api/v1/admin/proxy", body, method="POST")
            req.add_header("Content-Type", "application/json")
            with urllib.request.urlopen(req, timeout=20) as resp:
                return resp.status == 200

        wait_for("A's proxy to connect", lambda: in_netns(topo.ns("a"), connect), 30)
        urls = {
            "(a) direct, veth": (f"http://{b_ab}:{HTTP_PORT}/blob", False),
            "(b) direct, overlay": (f"http://[{b.address}]:{HTTP_PORT}/blob", False),
            "(c) SOCKS5 proxy over the overlay": (f"http://127.0.0.1:{HTTP_PORT}/blob", True),
        }
        wait_for("the overlay path to B", lambda: fetch(topo, urls["(b) direct, overlay"][0], False) > 0, 30)
        print(f"| path ({args.mib} MiB download, curl, best of {args.repeat}) | Mbit/s |")
        print("|---|---:|")
        for name, (url, via_socks) in urls.items():
            best = max(fetch(topo, url, via_socks) for _ in range(args.repeat))
            print(f"| {name} | {best:,.0f} |", flush=True)
    finally:
        for proc in helpers:
            proc.kill()
        topo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
