"""What apid knows about the node without asking: every service's latest
stats message (the ``stats`` SUB socket), process restarts derived from
them, and a one-second sampler that keeps short time series for the
dashboard and the per-peer counters for the metrics.

Restarts: a service's stats carry its pid and start time; a new pair for a
known service is one restart. The pairs and counts are kept in
``<run_dir>/apid-state.json`` so an apid restart neither forgets nor double
counts, and apid counts its own restarts from the pid it finds there. The
file is ignored when it belongs to an earlier run of the node.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any, TypeGuard

import msgpack
import zmq

from common import bus
from common.programs import ON_DEMAND
from common.wake import wake_path

from .core import NodeApi, Unavailable

log = logging.getLogger("apid.stats")

STATE_FILE = "apid-state.json"
SAMPLE_INTERVAL = 1.0
# Nobody reading the dashboard's series or the metrics: sample this rarely
# instead (each sample asks peerd for its peers and wakes apid; once a second
# that was most of an idle node's CPU). The first read after a quiet spell
# takes a fresh sample at once, and 1 s sampling resumes for WATCHED_FOR s.
IDLE_SAMPLE_INTERVAL = 10.0
WATCHED_FOR = 60.0
SERIES_LENGTH = 600  # samples kept (10 minutes at 1 s)
UP_AGE = 3.5  # services publish every second
STALE_AGE = 15.0
STARTUP_GRACE = 10.0
MAX_SERVICES = 64  # distinct service names kept (the bus is local, but stay bounded)

# counters that count something lost, refused or thrown away (names as the
# services publish them; see each service's ``counters``)
DROP_PATTERN = re.compile(
    r"(^|_)drop|dropped|_full|bus_timeout|malformed|truncated|decrypt_failed|undecryptable|expired|no_tun|"
    r"no_msgbus|to_gone_peer|from_unknown_peer|spoofed|unusable_key|no_key|hop_limit|rate_limited|unavailable|"
    r"not_overlay|_error$"
)
# end-to-end crypto: tund seals (encrypts) what leaves and opens (decrypts) what arrives
ENCRYPT_PATTERN = re.compile(r"encrypt|seal")
DECRYPT_PATTERN = re.compile(r"decrypt|opened")
DELIVERED_COUNTERS = ("rx_opened", "rx_decrypted")
QUEUE_GAUGES = ("pending", "send_queue")


def is_drop_counter(name: str) -> bool:
    return DROP_PATTERN.search(name) is not None


def crypto_operation(name: str) -> tuple[str, str] | None:
    """(operation, result) for a crypto counter such as ``rx_opened`` or ``tx_sealed``."""
    if DECRYPT_PATTERN.search(name):
        operation = "decrypt"
    elif ENCRYPT_PATTERN.search(name):
        operation = "encrypt"
    else:
        return None
    return operation, ("failed" if "fail" in name or "undecryptable" in name else "ok")


def numeric(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


class StatsCollector:
    """Latest stats message of every service and restart counts, fed by a
    SUB socket thread."""

    def __init__(self, ctx: zmq.Context | None, run_dir: str, node_start_time: int = 0) -> None:
        self.run_dir = run_dir
        self.node_start_time = node_start_time
        self.started = time.time()
        self.latest: dict[str, dict[str, Any]] = {}
        self.restarts: Counter[str] = Counter()
        self.seen: dict[str, list[Any]] = {}  # service -> [pid, started]
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self.state_path = Path(run_dir) / STATE_FILE
        self._load_state()
        self.sock: zmq.Socket | None = None
        if ctx is not None:
            self.sock = bus.bind(ctx, zmq.SUB, run_dir, "stats", hwm=1000)
            self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.thread = threading.Thread(target=self._run, name="stats", daemon=True)

    # --- persistence -------------------------------------------------------

    def _load_state(self) -> None:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            state = None
        if isinstance(state, dict) and state.get("node_start_time") == self.node_start_time:
            restarts = state.get("restarts")
            seen = state.get("seen")
            if isinstance(restarts, dict):
                self.restarts.update({k: int(v) for k, v in restarts.items() if isinstance(v, int)})
            if isinstance(seen, dict):
                self.seen = {k: v for k, v in seen.items() if isinstance(v, list) and len(v) == 2}
            if state.get("apid_pid") not in (None, os.getpid()):
                self.restarts["apid"] += 1
        self._save_state()

    def _save_state(self) -> None:
        state = {
            "node_start_time": self.node_start_time,
            "apid_pid": os.getpid(),
            "restarts": dict(self.restarts),
            "seen": self.seen,
        }
        try:
            tmp = self.state_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(state))
            os.replace(tmp, self.state_path)
        except OSError as exc:
            log.debug("cannot save %s: %s", self.state_path, exc)

    # --- input ---------------------------------------------------------------

    def start(self) -> None:
        if self.sock is not None:
            self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join(2.0)

    def _run(self) -> None:
        sock = self.sock
        assert sock is not None
        try:
            while not self._stop.is_set():
                if not sock.poll(250):
                    continue
                try:
                    msg = bus.unpack(sock.recv_multipart(zmq.NOBLOCK))
                except (bus.BusError, msgpack.UnpackException, ValueError, zmq.Again):
                    continue
                self.record(msg.fields, time.time())
        except zmq.ZMQError:
            pass
        finally:
            sock.close(linger=0)

    def record(self, fields: dict[str, Any], now: float) -> None:
        service = fields.get("service")
        if not isinstance(service, str) or not isinstance(fields.get("counters", {}), dict):
            return
        fields["received"] = now
        ident = [fields.get("pid"), fields.get("started")]
        with self.lock:
            if service not in self.latest and len(self.latest) >= MAX_SERVICES:
                return
            self.latest[service] = fields
            previous = self.seen.get(service)
            if previous == ident:
                return
            if previous is not None:
                self.restarts[service] += 1
                log.info("%s restarted (pid %s -> %s)", service, previous[0], ident[0])
            self.seen[service] = ident
            self._save_state()

    # --- views ---------------------------------------------------------------

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            return {k: dict(v) for k, v in self.latest.items()}

    def restart_counts(self) -> dict[str, int]:
        with self.lock:
            return dict(self.restarts)

    def services(self, expected: tuple[str, ...], now: float | None = None) -> list[dict[str, Any]]:
        """Health, pid, uptime and restart count of every service; apid itself
        included. Health: up, stale, down, starting, or idle (an on-demand
        program before its first request)."""
        now = time.time() if now is None else now
        snap = self.snapshot()
        restarts = self.restart_counts()
        names = list(expected) + sorted(n for n in snap if n not in expected)
        # on-demand programs never seen wait for a first request while supervisord listens for it
        waiting = ON_DEMAND if os.path.exists(wake_path(self.run_dir)) else ()
        out = []
        for name in names:
            if name == "apid":
                out.append(
                    {
                        "name": "apid",
                        "health": "up",
                        "pid": os.getpid(),
                        "started": self.started,
                        "uptime": round(now - self.started, 1),
                        "restarts": restarts.get("apid", 0),
                        "lastSeen": 0.0,
                    }
                )
                continue
            fields = snap.get(name)
            if fields is None:
                # idle: not started yet, it starts on the first request for it
                health = "idle" if name in waiting else "starting" if now - self.started < STARTUP_GRACE else "down"
                out.append(
                    {
                        "name": name,
                        "health": health,
                        "pid": None,
                        "started": None,
                        "uptime": None,
                        "restarts": restarts.get(name, 0),
                        "lastSeen": None,
                    }
                )
                continue
            age = now - float(fields.get("received", 0))
            started = fields.get("started")
            health = "up" if age <= UP_AGE else "stale" if age <= STALE_AGE else "down"
            out.append(
                {
                    "name": name,
                    "health": health,
                    "pid": fields.get("pid"),
                    "started": started,
                    "uptime": round(now - started, 1) if numeric(started) and health != "down" else None,
                    "restarts": restarts.get(name, 0),
                    "lastSeen": round(age, 1),
                }
            )
        return out


def peer_key(peer: dict[str, Any]) -> str:
    ep = peer.get("endpoint") or {}
    addr = ep.get("addr") or {}
    sock = addr.get("socket")
    if sock is None and isinstance(addr.get("vsock"), dict):
        sock = f"{addr['vsock'].get('cid')}:{addr['vsock'].get('port')}"
    return f"{ep.get('proto')}://{sock}"


def _delta(new: float, old: float) -> float:
    """A counter's increase; a smaller value means its process restarted."""
    return new - old if new >= old else new


class Sampler:
    """Once a second while someone reads them (every IDLE_SAMPLE_INTERVAL s
    otherwise): the peers' byte counters and the services' counters, turned
    into rates. Keeps the last ``SERIES_LENGTH`` samples."""

    def __init__(self, api: NodeApi, stats: StatsCollector, interval: float = SAMPLE_INTERVAL) -> None:
        self.api = api
        self.stats = stats
        self.interval = interval
        self.lock = threading.Lock()
        self.series: deque[dict[str, Any]] = deque(maxlen=SERIES_LENGTH)
        self.peers: list[dict[str, Any]] = []  # latest raw list, with per-peer rates
        self.peers_time = 0.0
        self._prev: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        # unread until someone reads: a node just started idles like any other
        # (its first minute at 1 s was a third of an idle node's CPU in that minute)
        self._last_read = -math.inf
        self.thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def watched(self, now: float) -> bool:
        return now - self._last_read <= WATCHED_FOR

    def next_interval(self, now: float) -> float:
        return self.interval if self.watched(now) else max(self.interval, IDLE_SAMPLE_INTERVAL)

    def _note_read(self) -> None:
        now = time.monotonic()
        if not self.watched(now):
            self._wake.set()  # the sampler is in a long wait: sample now
        self._last_read = now

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                self.sample(time.time())
            except (KeyError, TypeError, ValueError, ArithmeticError):
                # malformed statistics from a service; anything else is a bug and
                # ends the process (common/lifecycle.exit_on_crash)
                log.exception("sampling failed")
            now = time.monotonic()
            self._wake.wait(max(0.05, self.next_interval(now) - (now - t0)))
            self._wake.clear()

    @staticmethod
    def totals(snapshot: dict[str, dict[str, Any]]) -> dict[str, float]:
        out = {"data_in": 0.0, "control_in": 0.0, "forwarded": 0.0, "delivered": 0.0, "drops": 0.0}
        for service, fields in snapshot.items():
            counters = fields.get("counters") or {}
            for name, value in counters.items():
                if not numeric(value):
                    continue
                if is_drop_counter(name):
                    out["drops"] += value
                if service.startswith("peerd"):
                    if name == "data_rx":
                        out["data_in"] += value
                    elif name == "control_rx":
                        out["control_in"] += value
                    elif name == "data_forwarded":
                        out["forwarded"] += value
                elif service.startswith("tund") and name in DELIVERED_COUNTERS:
                    out["delivered"] += value
        return out

    def sample(self, now: float) -> dict[str, Any]:
        snapshot = self.stats.snapshot()
        try:
            peers = self.api.peers_raw()
        except Unavailable:
            peers = None
        totals = self.totals(snapshot)
        by_peer = {}
        for p in peers or []:
            by_peer[peer_key(p)] = {
                "rx": float(p.get("rxBytes") or 0),
                "tx": float(p.get("txBytes") or 0),
            }
        prev = self._prev
        point: dict[str, Any] = {"t": round(now, 3)}
        rates: dict[str, dict[str, float]] = {}
        if prev is not None and now > prev["t"]:
            dt = now - prev["t"]
            for key, cur in by_peer.items():
                old = prev["by_peer"].get(key)
                if old is not None:
                    rates[key] = {
                        "rx": _delta(cur["rx"], old["rx"]) / dt,
                        "tx": _delta(cur["tx"], old["tx"]) / dt,
                    }
            point["rxBytesPerSec"] = round(sum(r["rx"] for r in rates.values()), 1)
            point["txBytesPerSec"] = round(sum(r["tx"] for r in rates.values()), 1)
            for name, label in (
                ("data_in", "dataPacketsInPerSec"),
                ("control_in", "controlPacketsInPerSec"),
                ("forwarded", "forwardedPerSec"),
                ("delivered", "deliveredPerSec"),
                ("drops", "dropsPerSec"),
            ):
                point[label] = round(_delta(totals[name], prev["totals"][name]) / dt, 2)
        self._prev = {
            "t": now,
            "by_peer": by_peer if peers is not None else prev["by_peer"] if prev else {},
            "totals": totals,
        }
        with self.lock:
            if peers is not None:
                rows = []
                for p in peers:
                    r = rates.get(peer_key(p), {"rx": 0.0, "tx": 0.0})
                    rows.append({**p, "rxRate": round(r["rx"], 1), "txRate": round(r["tx"], 1)})
                self.peers = rows
                self.peers_time = now
            if len(point) > 1:
                self.series.append(point)
        return point

    def latest_peers(self) -> tuple[list[dict[str, Any]], float]:
        self._note_read()
        with self.lock:
            return [dict(p) for p in self.peers], self.peers_time

    def recent(self, count: int) -> list[dict[str, Any]]:
        self._note_read()
        with self.lock:
            items = list(self.series)
        return items[-count:]
