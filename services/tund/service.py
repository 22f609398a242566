"""tund: the node's TUN device and all end-to-end crypto.

Start-up (as root, or with CAP_NET_ADMIN): create the TUN (one queue per
crypto worker), give it MTU 1400 and the node address on /7, then drop
every privilege but CAP_NET_ADMIN (and, when the launcher names a
service user, become that user) before any socket is bound. With
``--workers N`` the process forks N-1 more workers; each owns one TUN
queue (the kernel spreads flows over queues by hash) and one bus inbox
(peerd spreads received packets over inboxes by source /64), so a flow
stays on one worker and in order. Worker 0 also answers ``tund.rpc``.

Each worker is a single-threaded loop over a zmq.Poller: the TUN fd, its
inbox, its data path sockets, the FIB deltas, the stop signal. It reads
up to READ_BATCH packets (TCP super packets, cut by gso.py) per wake-up,
encrypts them and hands peerd one batch per next hop through the
shared-memory data path (common/datapath.py; the bus's ``data_out`` when
peerd is away); batches peerd hands back are decrypted, coalesced
(gro.py) and written with one writev per (super) packet. In ``--no-tun`` mode the same
loop runs without the TUN: messages still work, L3 packets are counted.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from typing import Any

import msgpack
import zmq

from common import bus, native
from common.datapath import DataIn, DataOut, hand_over
from common.epoller import Epoller
from common.fib import FibReplica, is_head
from common.identity import Identity, load_key_file
from common.lifecycle import StopSignal, die_with_parent, start_service
from common.logs import setup as setup_logs
from common.nodeconfig import NodeConfig
from common.spinpoll import SpinPolicy, window_from_env
from common.wire.rules import split_batch

from . import privs
from . import tun as tunmod
from .dataplane import DataPlane, KeyCache
from .security import SecurityShell

log = logging.getLogger("tund")
MAX_WAIT = 1.0
READ_BATCH = 256  # packets read from the TUN per wake-up ...
READ_BUDGET = 384 * 1024  # ... or this many bytes (TCP super packets are up to 64 KiB)
READ_SIZE = 65536 + 128  # a super packet: 64 KiB of IPv6 payload, its header and the virtio-net header
INBOX_BATCH = 64  # bus messages handled per wake-up
# bytes of packets per hand-over to peerd: a ring refuses a record over half
# its size (common/shmring.py), and msgbus may hand over a whole window of
# retransmits for one destination at once (megabytes), which then never fit
MAX_BATCH = 1 << 20
MSGBUS_HWM = 1000
# "0": no virtio-net header (no offloads); "gro": coalesced writes but one
# packet per read (no TSO); anything else: both (the default)
OFFLOAD_ENV = "MYCELIUM_TUN_OFFLOAD"
M_TRIM_THRESHOLD = -1  # mallopt parameters (glibc malloc.h)
M_MMAP_THRESHOLD = -3


def tune_malloc() -> None:
    """Keep the data path's batch buffers (100-500 KB, one or two per batch)
    on the heap: by default glibc maps each with mmap and unmaps it on free,
    so every batch pays a page fault per 4 KiB (a quarter of a fault per
    packet, measured: about a fifth of the CPU time per packet)."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 8 * 1024 * 1024)
        libc.mallopt(M_TRIM_THRESHOLD, 32 * 1024 * 1024)
    except (OSError, AttributeError):
        pass


def worker_name(index: int) -> str:
    return "tund" if index == 0 else f"tund-{index}"


def inbox_name(index: int) -> str:
    return f"{worker_name(index)}.in"


def _unpack_header(frame: Any) -> dict[str, Any]:
    header = msgpack.unpackb(frame, raw=False)
    if not isinstance(header, dict) or not isinstance(header.get("k"), str):
        raise bus.BusError("bus header without a kind")
    return header


class TundWorker:
    def __init__(self, cfg: NodeConfig, index: int, device: tunmod.TunDevice | None, workers: int) -> None:
        self.cfg = cfg
        self.index = index
        self.device = device
        self.workers = workers
        self.identity = Identity.from_secret(load_key_file(cfg.key_file))
        self.fib = FibReplica()
        self.keys = KeyCache(self.identity.private_key)
        vnet = device is not None and device.vnet
        self.security = SecurityShell(cfg, self.identity, self.keys, workers)
        self.dp = DataPlane(
            self.identity,
            self.fib,
            self.keys,
            tun=device is not None,
            vnet=vnet,
            sessions=self.security.sessions,
            firewall=self.security.active_firewall(),
        )
        self.counters = self.dp.counters
        self.ctx = zmq.Context()
        run = cfg.run_dir
        self.inbox = bus.bind(self.ctx, zmq.PULL, run, inbox_name(index), hwm=bus.DATA_HWM)
        self.rpc = bus.bind(self.ctx, zmq.ROUTER, run, "tund.rpc") if index == 0 else None
        # one peerd per transport family; a next hop's link id starts with its family
        self.peerds: dict[str, tuple[zmq.Socket, DataOut | None]] = {}
        # batches both ways go through shared memory (common/datapath.py);
        # without it (no /dev/shm, run directory path too long) as ZeroMQ frames
        self.poller = Epoller()  # one epoll_wait per wake-up (common/epoller.py)
        self.data_fds: set[int] = set()
        self.data_in: DataIn | None = None
        me = worker_name(index)
        for family in cfg.peerd_families:
            peerd = bus.peerd_name(family)
            sock = bus.connect(self.ctx, zmq.PUSH, run, f"{peerd}.in", hwm=bus.DATA_HWM)
            try:
                data_out: DataOut | None = DataOut(run, f"{me}-to-{peerd}", peerd)
            except OSError as exc:
                log.warning("no shared-memory data path to %s (%s); batches go as ZeroMQ frames", peerd, exc)
                data_out = None
            self.peerds[family] = (sock, data_out)
        self.rings = {family: out for family, (_sock, out) in self.peerds.items() if out is not None}
        try:
            self.data_in = DataIn(run, me, f"-to-{me}", self._watch, self.counters)
        except OSError as exc:
            log.warning("no shared-memory data path (%s); batches go as ZeroMQ frames", exc)
        self.router = bus.connect(self.ctx, zmq.PUSH, run, "router.in")
        self.msgbus = self.ctx.socket(zmq.PUSH)
        self.msgbus.setsockopt(zmq.LINGER, 0)
        self.msgbus.setsockopt(zmq.SNDHWM, MSGBUS_HWM)
        self.msgbus.setsockopt(zmq.IMMEDIATE, 1)  # msgbus absent: drop and count, never queue
        self.msgbus.connect(bus.endpoint(run, "msgbus.in"))
        self.fib_sub = bus.connect(self.ctx, zmq.SUB, run, "router.fib")
        self.fib_sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.stats = bus.StatsPublisher(self.ctx, run, "tund" if index == 0 else f"tund-{index}")
        self.fib_synced = False
        self.stop = StopSignal()
        self.children: list[int] = []
        self.failed = False  # a crypto worker died: exit non-zero so supervisord restarts the group
        self.next_tick = 0.0
        self.spin = SpinPolicy(window_from_env())  # short polling after traffic (common/spinpoll.py)
        # the reads that start a wake-up and the writes that end it in one C call each when the kernel is built
        self.read_packets = native.kernel.read_tun if native.kernel is not None else tunmod.read_packets
        self.write_packets = native.kernel.write_tun if native.kernel is not None else tunmod.write_packets

    # --- bus --------------------------------------------------------------------

    def fib_resync(self) -> None:
        try:  # only the router's answer is outside input; the data plane's reaction is not
            snap = bus.rpc_call(self.ctx, self.cfg.run_dir, "router", "fib_snapshot", timeout_ms=500)
            self.fib.load_snapshot(snap)
        except (bus.BusError, KeyError, TypeError, ValueError):
            self.fib_synced = False
            return
        self.fib_synced = True
        self.dp.fib_changed(time.monotonic())

    def read_fib(self, now: float) -> None:
        changed = False
        while True:
            try:
                msg = bus.unpack(self.fib_sub.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
            except bus.BusError:
                continue
            try:
                applied = self.fib.apply_delta(msg.fields)
            except (KeyError, TypeError, ValueError):
                self.counters["fib_delta_malformed"] += 1
                continue
            if not applied:
                self.fib_resync()
            elif not is_head(msg.fields):
                changed = True
        if changed:
            self.dp.fib_changed(now)

    def read_inbox(self, now: float) -> None:
        dp = self.dp
        for _ in range(INBOX_BATCH):
            try:
                frames = self.inbox.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                header = _unpack_header(frames[0])
            except (bus.BusError, ValueError, msgpack.UnpackException):
                self.counters["bus_malformed"] += 1
                continue
            kind = header["k"]
            if kind == "local":
                for frame in frames[1:]:
                    dp.from_peer(frame, now)
            elif kind == "oob_icmp":
                try:
                    icmp_type, code = int(header["type"]), int(header["code"])
                except (KeyError, TypeError, ValueError):
                    self.counters["bus_malformed"] += 1
                    continue
                for frame in frames[1:]:
                    dp.oob_icmp(frame, icmp_type, code, now)
            elif kind == "send_message":
                dst = header.get("dst")
                if not isinstance(dst, bytes):
                    self.counters["bus_malformed"] += 1
                    continue
                for frame in frames[1:]:
                    dp.send_message(dst, frame, now)
            else:
                self.counters["bus_unknown_kind"] += 1

    def _watch(self, fd: int, add: bool) -> None:
        if add:
            self.poller.register(fd)
            self.data_fds.add(fd)
        else:
            self.poller.unregister(fd)
            self.data_fds.discard(fd)

    def read_data(self, fd: int, now: float) -> None:
        """Batches peerd left in our ring, each released once handled (the
        kernel copies what it keeps; the Python data path keys dicts by
        slices of a batch, so it gets a copy)."""
        assert self.data_in is not None
        dp = self.dp
        if dp.kernel is not None:
            self.data_in.drain(fd, lambda _tag, view: dp.from_peer(view, now))
        else:
            self.data_in.drain(fd, lambda _tag, view: dp.from_peer(bytes(view), now))

    def read_tun(self, now: float) -> None:
        assert self.device is not None
        pkts, err = self.read_packets(self.device.fd, READ_BATCH, READ_BUDGET, READ_SIZE)
        if err:
            self.tun_read_failed(err)
        if pkts:
            self.dp.from_tun(pkts, now)

    def tun_read_failed(self, err: int) -> None:
        self.counters["tun_read_error"] += 1
        log.warning("TUN read failed: %s", os.strerror(err))

    def fast_wait(self) -> Any:
        """The kernel's tund_wait (common/_kernel.c), which waits and runs
        the wake-ups of an idle ping (the TUN, a ring record from peerd)
        without a Python step, or None where this loop must do it all:
        the pure-Python kernel, or the short poll (``MYCELIUM_SPIN_US``)."""
        if native.kernel is None or self.dp.kernel is None or self.spin.window > 0:
            return None
        return getattr(native.kernel, "tund_wait", None)

    def flush(self) -> None:
        dp = self.dp
        if dp.out or (dp.sessions is not None and dp.sessions.outbox):
            engine = dp.sessions
            if engine is not None and (engine.changed or engine.outbox):
                dp.sync_sessions()  # negotiation packets join the batches
            if dp.out:  # each next hop's batch straight into its peerd's ring (C: no join, no Python per hop)
                hand_over(dp.out, self.rings, MAX_BATCH)
        if dp.out:  # what could not go at once: cut, retried, counted, or sent over the bus
            peerds = self.peerds
            for next_hop, joined in dp.take_out().items():
                peerd = peerds.get(next_hop.split("-", 1)[0])
                if peerd is None:
                    self.counters["to_peerd_unknown_family"] += 1
                    continue
                peerd_sock, data_out = peerd
                pieces = (joined,) if len(joined) <= MAX_BATCH else split_batch(joined, MAX_BATCH)
                for blob in pieces:  # one piece unless msgbus queued a burst
                    if data_out is not None:
                        why = data_out.send(blob, next_hop.encode())
                        if why is None:
                            continue
                        if why != "unreachable":  # peerd restarting: the bus queues it
                            self.counters[f"to_peerd_dropped_{why}"] += 1
                            continue
                        self.counters["to_peerd_via_bus"] += 1
                    try:
                        peerd_sock.send_multipart(bus.pack("data_out", {"peer": next_hop}, [blob]), flags=zmq.NOBLOCK)
                    except zmq.Again:
                        self.counters["bus_full_peerd"] += 1
        writes = dp.gro.flush()
        if writes:
            written, failed, err = self.write_packets(self.device.fd if self.device is not None else -1, writes)
            self.counters["tun_tx"] += written
            if failed:
                self.counters["tun_write_error"] += failed
                log.debug("%d TUN write(s) failed: %s", failed, os.strerror(err))
        if dp.messages:
            msgs, dp.messages = dp.messages, []
            for src, dst, plaintext in msgs:
                try:
                    self.msgbus.send_multipart(bus.pack("message", {"src": src, "dst": dst}, [plaintext]), zmq.NOBLOCK)
                    self.counters["rx_message_to_msgbus"] += 1
                except zmq.Again:
                    self.counters["rx_message_msgbus_unavailable"] += 1
        if dp.need:
            need, dp.need = dp.need, set()
            for addr in need:
                try:
                    self.router.send_multipart(bus.pack("need_route", {"addr": addr}), zmq.NOBLOCK)
                    self.counters["need_route_sent"] += 1
                except zmq.Again:
                    self.counters["bus_full_router"] += 1

    def answer_rpc(self) -> None:
        assert self.rpc is not None
        for _ in range(10):
            try:
                request = bus.parse_request(self.rpc.recv_multipart(zmq.NOBLOCK), self.counters)
            except zmq.Again:
                return
            if request is None:
                continue
            envelope, msg = request
            if msg.kind in self.security.RPC_METHODS:
                bus.rpc_reply(self.rpc, envelope, self.security.rpc(msg.kind, self.dp, time.monotonic()))
                continue
            result: dict[str, Any] = {"counters": dict(self.dp.all_counters()), "gauges": self.gauges()}
            if msg.kind == "info":
                result["tun"] = self.device.name if self.device else None
                result["workers"] = self.workers
                result["kernel"] = native.NAME if self.dp.kernel is not None else "python"
            bus.rpc_reply(self.rpc, envelope, result)

    def gauges(self) -> dict[str, Any]:
        g = self.dp.gauges()
        g["fib_entries"] = len(self.fib)
        g["worker"] = self.index
        # wake-ups the kernel's wait ran without a Python step (fast_wait): an idle ping's all go there
        kernel = native.kernel
        g["wakeups_in_c"] = kernel.tund_handled() if kernel is not None and self.fast_wait() is not None else 0
        return g

    # --- loop -------------------------------------------------------------------------

    def check_children(self) -> None:
        for pid in list(self.children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                self.children.remove(pid)
                log.error("crypto worker %d exited (status %d); restarting tund", pid, status)
                self.failed = True
                self.stop.stopped = True

    def periodic(self, now: float) -> float:
        """Stats, a requested reload, the 1 s tick; when to look again."""
        dp = self.dp
        if self.stats.due(now):
            self.stats.maybe_publish(now, dp.all_counters(), self.gauges())
        if self.security.reload_requested:
            self.security.reload(dp, now)
        if now >= self.next_tick:
            self.next_tick = now + 1.0
            self.security.tick(dp)
            if not self.fib_synced:
                self.fib_resync()
            dp.tick(now)
            self.check_children()
        return min(self.next_tick, now + self.stats.seconds_until_due(now))

    def run(self) -> None:
        poller = self.poller
        if self.device is not None:
            poller.register(self.device.fd)
        for sock in (self.inbox, self.fib_sub):
            poller.register(sock)
        poller.register(self.stop.fileno())
        if self.rpc is not None:
            poller.register(self.rpc)
        self.fib_resync()
        tun_fd = self.device.fd if self.device is not None else None
        fast = self.fast_wait()
        epfd = poller.ep.fileno()
        data_in = self.data_in
        conns = data_in.conns if data_in is not None else {}
        readers = data_in.readers if data_in is not None else {}
        fast_tun = tun_fd if tun_fd is not None else -1
        spin = self.spin
        spinning = spin.window > 0
        monotonic = time.monotonic
        periodic = 0.0  # when stats, a reload or the 1 s tick may next be due
        # an idle ping wakes this loop cold (issue 13b): the common wake-up runs
        # as few Python steps as it can, the rest only when due
        while not self.stop.stopped:
            if fast is not None and not poller.recheck:  # ZeroMQ sockets to re-check first: the Python wait
                wait = min(MAX_WAIT, max(0.0, periodic - monotonic()))
                fds, _dirty, err = fast(
                    epfd, wait, fast_tun, fast_tun, conns, readers, data_in, self.dp, self.rings,
                    MAX_BATCH, READ_BATCH, READ_BUDGET, READ_SIZE,
                )  # fmt: skip
                if err:
                    self.tun_read_failed(err)
                events = poller.ready_from(fds)
            elif spinning:
                now = monotonic()
                if spin.timeout(now, MAX_WAIT) == 0:
                    events = poller.poll(0)
                    if not events:  # nothing yet: give the CPU to whoever answers us, then look again
                        os.sched_yield()
                        spin.spun(now, monotonic())
                        continue
                else:
                    events = poller.poll(MAX_WAIT)
            else:
                events = poller.poll(MAX_WAIT)
            now = monotonic()
            if events:
                if spinning:
                    spin.traffic(now)
                if self.fib_sub in events:
                    self.read_fib(now)
                if tun_fd is not None and tun_fd in events:
                    self.read_tun(now)
                if self.inbox in events:
                    self.read_inbox(now)
                if self.data_fds:
                    for fd in [fd for fd in self.data_fds if fd in events]:
                        self.read_data(fd, now)
                if self.rpc is not None and self.rpc in events:
                    self.answer_rpc()
            if now >= periodic:
                periodic = self.periodic(now)
            self.flush()
        for pid in self.children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        for _sock, data_out in self.peerds.values():
            if data_out is not None:
                data_out.close()
        if self.data_in is not None:
            self.data_in.close()
        self.poller.close()
        self.ctx.destroy(linger=0)


def _start_children(cfg: NodeConfig, devices: list[tunmod.TunDevice | None]) -> list[int]:
    """Fork workers 1..N-1 (before any ZeroMQ context exists)."""
    pids = []
    for index in range(1, len(devices)):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                die_with_parent()
                for i, dev in enumerate(devices):
                    if i != index and dev is not None:
                        os.close(dev.fd)
                setup_logs(f"tund-{index}", cfg.log_level)
                TundWorker(cfg, index, devices[index], len(devices)).run()
            except BaseException:  # a worker must never fall back into the parent's code
                logging.getLogger("tund").exception("crypto worker %d failed", index)
                code = 1
            finally:
                os._exit(code)
        pids.append(pid)
    return pids


def main(argv: list[str] | None = None) -> int:
    def add_args(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--workers", type=int, default=1, help="crypto workers (TUN queues)")
        parser.add_argument("--user", default="", help="when started as root: become this user after creating the TUN")

    cfg, args = start_service("tund", argv, add_args)
    log.info("%s", native.describe())
    tune_malloc()
    workers = max(1, min(64, args.workers))
    identity = Identity.from_secret(load_key_file(cfg.key_file))
    devices: list[tunmod.TunDevice | None] = [None] * workers
    if not cfg.no_tun:
        offload = os.environ.get(OFFLOAD_ENV, "1")
        vnet = offload != "0"
        try:
            devices = list(
                tunmod.create(cfg.tun_name, identity.address, queues=workers, vnet=vnet, tso=offload != "gro")
            )
        except tunmod.TunError as exc:
            print(f"tund: {exc}", file=sys.stderr, flush=True)
            return 1
        log.info(
            "TUN %s up: %s/%d, MTU %d, %d queue(s)%s",
            devices[0].name if devices[0] is not None else "?",
            identity.address,
            tunmod.OVERLAY_PREFIX_LEN,
            tunmod.MTU,
            workers,
            (", TSO on read, GRO on write" if offload != "gro" else ", GRO on write") if vnet else "",
        )
    try:
        who = privs.drop_to_net_admin(args.user or None)
        log.info("running as %s", who)
    except (OSError, KeyError) as exc:
        print(f"tund: cannot drop privileges: {exc}", file=sys.stderr, flush=True)
        return 1
    die_with_parent()  # a credential change clears the parent-death signal: set it again
    children = _start_children(cfg, devices)
    worker = TundWorker(cfg, 0, devices[0], workers)
    worker.children = children
    worker.security.children = children
    worker.run()
    for dev in devices:
        if dev is not None:
            dev.close()
    return 1 if worker.failed else 0
