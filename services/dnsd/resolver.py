"""The sans-IO part of the resolver: what to do with a query (answer it
here, from the cache, or forward it), how an upstream answer (or its
absence) becomes the reply, and which upstream to use.

The reference forwards every query to UDP 53 of the lowest-metric public
mycelium node it has a selected route to, else to 1.1.1.1, with a 5 s
timeout answered SERVFAIL (TRANSPORTS.md 3.4). We keep that and add:
``<64-hex key>.mycelium`` and a ``[names]`` table answered locally (other
``.mycelium`` names are NXDOMAIN, never forwarded), a cache, the upstream's
response code and sections (the reference passes on only the answers,
always as NOERROR), and a reply that fits the client's size (TC set).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from common.dnsnames import ZONE, lookup

# the reference's ten public nodes (dns.rs), used when the config names none
PUBLIC_DNS_NODES = (
    "54b:83ab:6cb5:7b38:44ae:cd14:53f3:a907",
    "40a:152c:b85b:9646:5b71:d03a:eb27:2462",
    "597:a4ef:806:b09:6650:cbbf:1b68:cc94",
    "549:8bce:fa45:e001:cbf8:f2e2:2da6:a67c",
    "410:2778:53bf:6f41:af28:1b60:d7c0:707a",
    "488:74ac:8a31:277b:9683:c8e:e14f:79a7",
    "4ab:a385:5a4e:ef8f:92e0:1605:7cb6:24b2",
    "4de:b695:3859:8234:d04c:5de6:8097:c27c",
    "5eb:c711:f9ab:eb24:ff26:e392:a115:1c0e",
    "445:465:fe81:1e2b:5420:a029:6b0:9f61",
)
FORWARD_TIMEOUT = 5.0  # seconds, then SERVFAIL (the reference's)
METRIC_CHECK_INTERVAL = 30.0  # seconds between upstream choices (the reference's)
LOCAL_TTL = 300  # seconds, for names answered here
NEGATIVE_TTL = 30  # an answer without records (NODATA/NXDOMAIN without SOA) is cached this long
MAX_TTL = 3600  # cached entries never outlive this
CACHE_SIZE = 4096  # entries (LRU)
UDP_DEFAULT_SIZE = 512  # a client without EDNS gets at most this (RFC 1035)
INFINITE_METRIC = 0xFFFF
_ZONE = dns.name.from_text(ZONE)

CacheKey = tuple[str, int, int]


@dataclass
class Reply:
    """Send these bytes back to the client."""

    wire: bytes
    source: str  # "local", "cache", "error", "forward"


@dataclass
class Forward:
    """Ask ``upstream`` with ``query``; hand the result to ``complete``."""

    request: dns.message.Message
    query: dns.message.Message
    key: CacheKey
    upstream: str


@dataclass
class _Entry:
    response: dns.message.Message
    stored: float
    expires: float


@dataclass
class DnsCore:
    names: dict[str, ipaddress.IPv6Address]
    resolvers: list[ipaddress.IPv6Address]
    fallback: str
    cache_size: int = CACHE_SIZE
    best: ipaddress.IPv6Address | None = None  # the chosen resolver node, None = fallback
    counters: dict[str, int] = field(default_factory=dict)
    _cache: OrderedDict[CacheKey, _Entry] = field(default_factory=OrderedDict)

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    @property
    def upstream(self) -> str:
        return str(self.best) if self.best is not None else self.fallback

    # --- upstream choice ---------------------------------------------------------

    def choose_upstream(self, selected_routes: Iterable[dict[str, Any]]) -> list[ipaddress.IPv6Address]:
        """Pick the resolver node with the lowest finite metric among the
        selected routes (router's ``routes_selected``); returns the resolver
        nodes with no route at all, to have their routes requested."""
        routes: list[tuple[ipaddress.IPv6Network, int]] = []
        for r in selected_routes:
            try:
                net = ipaddress.IPv6Network(str(r["subnet"]), strict=False)
                metric = r["metric"]
            except (KeyError, TypeError, ValueError):
                continue
            if isinstance(metric, int) and not isinstance(metric, bool) and metric < INFINITE_METRIC:
                routes.append((net, metric))
        best: tuple[int, ipaddress.IPv6Address] | None = None
        unknown = []
        for node in self.resolvers:
            metrics = [m for net, m in routes if node in net]
            if not metrics:
                unknown.append(node)
            elif best is None or min(metrics) < best[0]:
                best = (min(metrics), node)
        self.best = best[1] if best else None
        return unknown

    # --- queries -------------------------------------------------------------------

    def handle(self, wire: bytes, now: float, max_size: int | None = None) -> Reply | Forward | None:
        """A query from a client -> a reply, a forward, or None (drop: not even a header)."""
        try:
            request = dns.message.from_wire(wire)
        except dns.message.ShortHeader:
            self._count("query_malformed_dropped")
            return None
        except (dns.exception.DNSException, ValueError, IndexError, UnicodeError):
            self._count("query_malformed")
            return self._formerr(wire)
        if request.flags & dns.flags.QR:
            self._count("query_is_response_dropped")  # never answer answers (loops)
            return None
        size = max_size if max_size is not None else self.udp_size(request)
        if request.opcode() != dns.opcode.QUERY:
            self._count("query_not_implemented")
            return self._error(request, dns.rcode.NOTIMP, size)
        if len(request.question) != 1:
            self._count("query_malformed")
            return self._error(request, dns.rcode.FORMERR, size)
        q = request.question[0]
        key: CacheKey = (q.name.to_text().lower(), int(q.rdtype), int(q.rdclass))
        local = self._local(request, q, size)
        if local is not None:
            return local
        entry = self._cache.get(key)
        if entry is not None:
            if entry.expires > now:
                self._cache.move_to_end(key)
                self._count("answered_cache")
                return Reply(self._render(request, entry.response, size, int(now - entry.stored)), "cache")
            del self._cache[key]
        query = dns.message.make_query(q.name, q.rdtype, q.rdclass, use_edns=request.edns >= 0)
        query.flags |= dns.flags.RD
        self._count("forwarded")
        return Forward(request, query, key, self.upstream)

    def complete(
        self, fwd: Forward, response: dns.message.Message | None, now: float, max_size: int | None = None
    ) -> Reply:
        """The upstream's response (None: timeout, error, unusable) -> the reply."""
        size = max_size if max_size is not None else self.udp_size(fwd.request)
        if response is None or response.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            self._count("servfail" if response is None else "upstream_error")
            if response is None:
                return self._error(fwd.request, dns.rcode.SERVFAIL, size)
        elif not response.flags & dns.flags.TC:
            self._store(fwd.key, response, now)
        return Reply(self._render(fwd.request, response, size, 0), "forward")

    # --- helpers ------------------------------------------------------------------

    @staticmethod
    def udp_size(request: dns.message.Message) -> int:
        return max(UDP_DEFAULT_SIZE, min(request.payload, 4096)) if request.edns >= 0 else UDP_DEFAULT_SIZE

    def _local(self, request: dns.message.Message, q: dns.rrset.RRset, size: int) -> Reply | None:
        in_zone = q.name.is_subdomain(_ZONE)
        addr = lookup(self.names, q.name.to_text())
        if addr is None and not in_zone:
            return None
        response = dns.message.make_response(request, recursion_available=True)
        response.flags |= dns.flags.AA
        if addr is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            self._count("answered_local_nxdomain")
        else:
            self._count("answered_local")
            if q.rdclass == dns.rdataclass.IN and q.rdtype in (dns.rdatatype.AAAA, dns.rdatatype.ANY):
                response.answer.append(dns.rrset.from_text(q.name, LOCAL_TTL, "IN", "AAAA", str(addr)))
        return Reply(response.to_wire(max_size=size, prefer_truncation=True), "local")

    def _store(self, key: CacheKey, response: dns.message.Message, now: float) -> None:
        ttls = [rrset.ttl for section in (response.answer, response.authority) for rrset in section]
        ttl = min([MAX_TTL, *ttls]) if ttls else NEGATIVE_TTL
        if ttl <= 0 or self.cache_size <= 0:
            return
        self._cache[key] = _Entry(response, now, now + ttl)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _render(self, request: dns.message.Message, upstream: dns.message.Message, size: int, age: int) -> bytes:
        response = dns.message.make_response(request, recursion_available=True)
        response.set_rcode(upstream.rcode())
        for src, dst in (
            (upstream.answer, response.answer),
            (upstream.authority, response.authority),
            (upstream.additional, response.additional),
        ):
            for rrset in src:
                copy = rrset.copy()
                copy.ttl = max(0, rrset.ttl - age)
                dst.append(copy)
        return response.to_wire(max_size=size, prefer_truncation=True)

    def _error(self, request: dns.message.Message, rcode: dns.rcode.Rcode, size: int) -> Reply:
        response = dns.message.make_response(request, recursion_available=True)
        response.set_rcode(rcode)
        return Reply(response.to_wire(max_size=size, prefer_truncation=True), "error")

    def _formerr(self, wire: bytes) -> Reply:
        """FORMERR with the query's id, for bytes with a header but no valid message."""
        flags = dns.flags.QR | (int.from_bytes(wire[2:4], "big") & dns.flags.RD) | dns.flags.RA
        header = wire[:2] + (flags | dns.rcode.FORMERR).to_bytes(2, "big") + bytes(8)
        return Reply(header, "error")

    def cache_len(self) -> int:
        return len(self._cache)
