"""Inbound TUN firewall (docs/EXTENSIONS.md 6): which decrypted L3 packets
tund may write to the TUN. Sans-IO: ``load_rules`` parses the TOML text,
``Firewall.allow`` decides per packet.

Rule file (TOML)::

    default = "deny"              # or "allow" (the default: as without a file)
    tcp_established = true        # TCP segments other than a connection's
                                  # first SYN pass (replies to our connections)
    [[rule]]
    action = "allow"              # or "deny"; first matching rule wins
    source = "5a3:1234::/64"      # inner IPv6 source in this subnet, and/or
    public_key = "<64 hex>"       # sent by this node (its /64)
    protocol = "tcp"              # tcp, udp, icmpv6 or a number 0-255
    port = 22                     # destination port, or "8000-8100" (tcp/udp)

A rule without a field matches any value of it.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections import Counter
from dataclasses import dataclass
from typing import Any

from common.identity import address_of
from common.native import kernel
from common.wire.errors import CodecError

PROTOCOLS = {"tcp": 6, "udp": 17, "icmpv6": 58, "icmp": 58}
EXTENSION_HEADERS = (0, 43, 60)  # hop-by-hop, routing, destination options (fragment: 44)
MAX_RULES = 10_000
DECISION_CACHE = 65_536
RULE_KEYS = {"action", "source", "public_key", "protocol", "port"}


class FirewallError(CodecError):
    """A rule file that cannot be used; the message is one line."""


@dataclass(frozen=True, slots=True)
class Rule:
    allow: bool
    net: int  # source network as an integer, and its mask (0/0: any)
    mask: int
    protocol: int | None
    ports: tuple[int, int] | None
    text: dict[str, Any]  # as written, for the API


def _net(text: Any, where: str) -> ipaddress.IPv6Network:
    if not isinstance(text, str):
        raise FirewallError(f"{where}: source must be a string like '5a3:1234::/64'")
    try:
        return ipaddress.IPv6Network(text, strict=False)
    except ValueError as exc:
        raise FirewallError(f"{where}: source {text!r} is not an IPv6 subnet") from exc


def _rule(raw: Any, i: int) -> Rule:
    where = f"rule {i + 1}"
    if not isinstance(raw, dict):
        raise FirewallError(f"{where}: must be a table")
    unknown = set(raw) - RULE_KEYS
    if unknown:
        raise FirewallError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    action = raw.get("action", "allow")
    if action not in ("allow", "deny"):
        raise FirewallError(f"{where}: action must be 'allow' or 'deny', got {action!r}")
    if "source" in raw and "public_key" in raw:
        raise FirewallError(f"{where}: give source or public_key, not both")
    net = ipaddress.IPv6Network("::/0")
    if "source" in raw:
        net = _net(raw["source"], where)
    elif "public_key" in raw:
        pk = raw["public_key"]
        try:
            key = bytes.fromhex(pk) if isinstance(pk, str) else b""
        except ValueError:
            key = b""
        if len(key) != 32:
            raise FirewallError(f"{where}: public_key must be 64 hex characters")
        net = ipaddress.IPv6Network((address_of(key).packed[:8] + bytes(8), 64))
    proto: int | None = None
    if "protocol" in raw:
        p = raw["protocol"]
        if isinstance(p, str) and p.lower() in PROTOCOLS:
            proto = PROTOCOLS[p.lower()]
        elif isinstance(p, int) and not isinstance(p, bool) and 0 <= p <= 255:
            proto = p
        else:
            raise FirewallError(f"{where}: protocol must be tcp, udp, icmpv6 or 0-255, got {p!r}")
    ports: tuple[int, int] | None = None
    if "port" in raw:
        ports = _ports(raw["port"], where)
        if proto not in (6, 17):
            raise FirewallError(f"{where}: port needs protocol tcp or udp")
    mask = ((1 << 128) - 1) ^ ((1 << (128 - net.prefixlen)) - 1)
    return Rule(action == "allow", int(net.network_address), mask, proto, ports, dict(raw))


def _ports(v: Any, where: str) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        lo = hi = v
    elif isinstance(v, str) and "-" in v:
        a, _, b = v.partition("-")
        try:
            lo, hi = int(a), int(b)
        except ValueError as exc:
            raise FirewallError(f"{where}: port range {v!r} must be like '8000-8100'") from exc
    else:
        raise FirewallError(f"{where}: port must be a number or a range like '8000-8100', got {v!r}")
    if not 0 <= lo <= hi <= 0xFFFF:
        raise FirewallError(f"{where}: port {v!r} out of range")
    return lo, hi


@dataclass(frozen=True, slots=True)
class RuleSet:
    default_allow: bool
    tcp_established: bool
    rules: tuple[Rule, ...]

    def describe(self) -> dict[str, Any]:
        return {
            "default": "allow" if self.default_allow else "deny",
            "tcpEstablished": self.tcp_established,
            "rules": [r.text for r in self.rules],
        }


ALLOW_ALL = RuleSet(True, True, ())


def load_rules(text: str) -> RuleSet:
    """Parse and check a rule file; raises FirewallError (one line)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise FirewallError(f"not valid TOML: {exc}") from exc
    unknown = set(data) - {"default", "tcp_established", "rule"}
    if unknown:
        raise FirewallError(f"unknown key {sorted(unknown)[0]!r} (expected default, tcp_established, [[rule]])")
    default = data.get("default", "allow")
    if default not in ("allow", "deny"):
        raise FirewallError(f"default must be 'allow' or 'deny', got {default!r}")
    est = data.get("tcp_established", True)
    if not isinstance(est, bool):
        raise FirewallError("tcp_established must be true or false")
    raw_rules = data.get("rule", [])
    if not isinstance(raw_rules, list):
        raise FirewallError("rules are written as [[rule]] tables")
    if len(raw_rules) > MAX_RULES:
        raise FirewallError(f"{len(raw_rules)} rules; at most {MAX_RULES}")
    return RuleSet(default == "allow", est, tuple(_rule(r, i) for i, r in enumerate(raw_rules)))


def _l4(pt: bytes) -> tuple[int, int, int]:
    """(protocol, destination port or -1, TCP flags or -1) of the IPv6
    packet after the 4-byte inner header; walks a few extension headers."""
    nh = pt[10]
    off = 44
    for _ in range(4):
        if nh in EXTENSION_HEADERS and off + 8 <= len(pt):
            nh, off = pt[off], off + (pt[off + 1] + 1) * 8
        elif nh == 44 and off + 8 <= len(pt):  # fragment: ports only in the first one
            if (pt[off + 2] << 8 | pt[off + 3]) & 0xFFF8:
                return pt[off], -1, -1
            nh, off = pt[off], off + 8
        else:
            break
    if nh in (6, 17) and off + 4 <= len(pt):
        flags = pt[off + 13] if nh == 6 and off + 14 <= len(pt) else -1
        return nh, pt[off + 2] << 8 | pt[off + 3], flags
    return nh, -1, -1


def compile_native(rules: RuleSet) -> Any:
    """The rule set for the C kernel's from_peer (``common._kernel.FirewallRules``:
    the same first-match walk as ``Firewall._decide`` and ``_l4``, held to
    the same answers by tests/unit/test_native_sessions.py); None without it."""
    if kernel is None:
        return None
    table = [
        (
            r.allow,
            r.net.to_bytes(16, "big"),
            r.mask.to_bytes(16, "big"),
            -1 if r.protocol is None else r.protocol,
            -1 if r.ports is None else r.ports[0],
            -1 if r.ports is None else r.ports[1],
        )
        for r in rules.rules
    ]
    return kernel.FirewallRules(rules.default_allow, rules.tcp_established, table)


class Firewall:
    """The current rule set and its counters; ``replace`` swaps rules atomically."""

    def __init__(self, rules: RuleSet = ALLOW_ALL, source: str | None = None) -> None:
        self.rules = rules
        self.native = compile_native(rules)  # what the C kernel decides with (None: not built)
        self.source = source  # the file it came from
        self.counters: Counter[str] = Counter()
        self._cache: dict[tuple[bytes, int, int, bool], bool] = {}
        self.loaded_at = 0.0
        self.last_error: str | None = None

    @property
    def passthrough(self) -> bool:
        """No rules and default allow: the data plane need not ask."""
        return self.rules.default_allow and not self.rules.rules

    def replace(self, rules: RuleSet, now: float) -> None:
        self.rules = rules
        self.native = compile_native(rules)
        self._cache = {}
        self.loaded_at = now
        self.last_error = None

    def allow(self, pt: bytes) -> bool:
        """Decide for a decrypted L3 plaintext (inner header + IPv6 packet)."""
        proto, port, flags = _l4(pt)
        rs = self.rules
        if proto == 6 and rs.tcp_established and flags >= 0 and flags & 0x12 != 0x02:
            self.counters["fw_allowed_established"] += 1
            return True
        key = (pt[12:28], proto, port, flags & 0x12 == 0x02)
        ok = self._cache.get(key)
        if ok is None:
            ok = self._decide(int.from_bytes(pt[12:28], "big"), proto, port)
            if len(self._cache) >= DECISION_CACHE:
                self._cache.clear()
            self._cache[key] = ok
        self.counters["fw_allowed" if ok else "fw_denied"] += 1
        return ok

    def _decide(self, src: int, proto: int, port: int) -> bool:
        for r in self.rules.rules:
            if src & r.mask != r.net:
                continue
            if r.protocol is not None and r.protocol != proto:
                continue
            if r.ports is not None and not r.ports[0] <= port <= r.ports[1]:
                continue
            return r.allow
        return self.rules.default_allow

    def describe(self) -> dict[str, Any]:
        d = self.rules.describe()
        d.update(file=self.source, lastError=self.last_error, counters=dict(self.counters))
        return d
