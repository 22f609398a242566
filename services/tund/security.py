"""tund's shell around the security extensions (docs/EXTENSIONS.md): builds
the session engine and the firewall from node.json, reloads the firewall
on SIGHUP or an RPC (a bad file keeps the old rules: one log line, the
error shown in the API), answers the ``firewall``, ``firewall_reload`` and
``sessions`` RPCs, and logs what the engine reports."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Any

from common.firewall import ALLOW_ALL, Firewall, FirewallError, load_rules
from common.identity import Identity
from common.nodeconfig import NodeConfig

from .dataplane import DataPlane, KeyCache
from .sessions import SessionConfig, SessionEngine

log = logging.getLogger("tund")


class SecurityShell:
    RPC_METHODS = frozenset({"firewall", "firewall_reload", "sessions"})

    def __init__(self, cfg: NodeConfig, identity: Identity, keys: KeyCache, workers: int) -> None:
        self.sessions: SessionEngine | None = None
        if cfg.session_keys and workers == 1:
            conf = SessionConfig(
                rekey_after=cfg.session_rekey_seconds,
                rekey_packets=cfg.session_rekey_packets,
                keep_old=min(10.0, cfg.session_rekey_seconds),
            )
            self.sessions = SessionEngine(identity, keys.get, conf, native=keys.native)
        elif cfg.session_keys:
            # one peer's packets may reach any worker's TUN queue, but its answers only one worker
            log.warning("session keys need a single crypto worker; %d workers use static keys only", workers)
        self.firewall = Firewall(source=cfg.firewall_file)
        self.reload_requested = False
        self.children: list[int] = []  # worker 0 passes a reload on to the other crypto workers
        if cfg.firewall_file:
            error = self._load(0.0)
            if error:  # the launcher checked it; it changed since: refuse to run without the rules asked for
                raise SystemExit(f"tund: firewall rules {cfg.firewall_file}: {error}")
        signal.signal(signal.SIGHUP, self._on_hup)  # reload (without a file: nothing to do, never exit)

    def _on_hup(self, signum: int, frame: Any) -> None:
        self.reload_requested = True  # the loop wakes at least once a second

    def active_firewall(self) -> Firewall | None:
        return None if self.firewall.passthrough else self.firewall

    def _load(self, now: float) -> str | None:
        path = self.firewall.source
        if path is None:
            self.firewall.replace(ALLOW_ALL, now)
            return None
        try:
            rules = load_rules(Path(path).read_text())
        except OSError as exc:
            error = f"cannot read {path}: {exc.strerror}"
        except FirewallError as exc:
            error = str(exc)
        else:
            self.firewall.replace(rules, now)
            log.info(
                "firewall rules from %s: default %s, %d rule(s)", path, rules.describe()["default"], len(rules.rules)
            )
            return None
        self.firewall.last_error = error
        log.error("firewall rules %s not loaded, old rules kept: %s", path, error)
        return error

    def reload(self, dp: DataPlane, now: float) -> str | None:
        self.reload_requested = False
        error = self._load(now)
        dp.firewall = self.active_firewall()
        for pid in self.children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGHUP)
        return error

    def tick(self, dp: DataPlane) -> None:
        engine = self.sessions
        if engine is not None and engine.log:
            lines, engine.log = engine.log, []
            for line in lines:
                (log.warning if "blocked" in line else log.info)("%s", line)

    def rpc(self, kind: str, dp: DataPlane, now: float) -> Any:
        if kind == "firewall":
            return self.firewall.describe() | {"dropped": dp.counters.get("rx_firewall_dropped", 0)}
        if kind == "firewall_reload":
            if self.firewall.source is None:
                return {"ok": False, "error": "no firewall file configured (--firewall PATH)"}
            error = self.reload(dp, now)
            return {"ok": error is None, "error": error, "firewall": self.firewall.describe()}
        engine = self.sessions
        return [] if engine is None else engine.snapshot(now)
