"""IP subnets as the routing protocol sees them.

The reference keeps host bits in its subnet objects and sends them on the
wire unmasked, yet compares subnets by network only. ``Subnet`` keeps the
address as given (for byte-exact encoding) and hashes/compares by
(prefix length, masked network).
"""

from __future__ import annotations

import ipaddress

from .errors import CodecError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Subnet:
    """Compact: one int ``key`` (masked network, prefix length, family) that
    hashing and comparison use, plus the address as given only when it has
    host bits set. No ``ipaddress`` network object is kept: the router holds
    a Subnet per route, and a network object costs several hundred bytes
    and a slow hash."""

    __slots__ = ("_raw", "key", "prefix_len")

    def __init__(self, address: IPAddress, prefix_len: int) -> None:
        bits = address.max_prefixlen
        if not 0 <= prefix_len <= bits:
            raise CodecError(f"prefix length {prefix_len} out of range for {address}")
        self.prefix_len = prefix_len
        shift = bits - prefix_len
        value = int(address)
        masked = (value >> shift) << shift
        self.key = ((masked << 8) | prefix_len) << 1 | (address.version == 6)
        self._raw: IPAddress | None = address if masked != value else None

    @property
    def address(self) -> IPAddress:
        """As given (host bits kept, for byte-exact encoding)."""
        if self._raw is not None:
            return self._raw
        return ipaddress.IPv6Address(self.key >> 9) if self.key & 1 else ipaddress.IPv4Address(self.key >> 9)

    @classmethod
    def parse(cls, text: str) -> Subnet:
        """CIDR text, or a bare IP (a /32 or /128), as the API accepts."""
        try:
            if "%" in text:
                raise ValueError("scoped addresses are not subnets")
            if "/" in text:
                addr_text, plen_text = text.split("/", 1)
                if not (plen_text.isascii() and plen_text.isdigit()):
                    raise ValueError(plen_text)
                return cls(ipaddress.ip_address(addr_text), int(plen_text))
            addr = ipaddress.ip_address(text)
        except ValueError as exc:
            raise CodecError(f"invalid subnet {text!r}") from exc
        return cls(addr, addr.max_prefixlen)

    @property
    def _masked(self) -> int:
        return self.key >> 9

    @property
    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        """Built on demand (not kept, see the class docstring)."""
        cls = ipaddress.IPv6Network if self.is_ipv6 else ipaddress.IPv4Network
        return cls((self._masked, self.prefix_len))

    @property
    def is_ipv6(self) -> bool:
        return bool(self.key & 1)

    @property
    def same_address(self) -> object:
        """Identity of the address as given: equal for Subnets that encode alike."""
        return self.key if self._raw is None else (self.key, self._raw)

    def contains_address(self, addr: IPAddress) -> bool:
        if (addr.version == 6) != (self.key & 1):
            return False
        shift = addr.max_prefixlen - self.prefix_len
        return int(addr) >> shift == self.key >> (9 + shift)

    def contains_int6(self, value: int) -> bool:
        """``contains_address`` for an IPv6 address given as an int."""
        if not self.key & 1:
            return False
        shift = 128 - self.prefix_len
        return value >> shift == self.key >> (9 + shift)

    def contains(self, other: Subnet) -> bool:
        """True when ``other`` lies entirely inside this subnet."""
        if (other.key ^ self.key) & 1 or other.prefix_len < self.prefix_len:
            return False
        shift = (128 if self.key & 1 else 32) - self.prefix_len
        return other.key >> (9 + shift) == self.key >> (9 + shift)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Subnet):
            return NotImplemented
        return self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    @property
    def network_packed(self) -> bytes:
        """The masked network address in network byte order (16 or 4 bytes)."""
        return (self.key >> 9).to_bytes(16 if self.key & 1 else 4)

    def __str__(self) -> str:
        masked = self.key >> 9
        if self.prefix_len == 64 and self.key & 1 and masked >> 112:
            # Fast path for the overlay's /64s (the API lists every route):
            # the last four hextets are zero and form the longest zero run,
            # together with any zero hextets just before them.
            head = masked >> 64
            groups = [(head >> 48) & 0xFFFF, (head >> 32) & 0xFFFF, (head >> 16) & 0xFFFF, head & 0xFFFF]
            while groups[-1] == 0:
                groups.pop()
            return ":".join([f"{g:x}" for g in groups]) + "::/64"
        cls = ipaddress.IPv6Address if self.key & 1 else ipaddress.IPv4Address
        return f"{cls(masked)}/{self.prefix_len}"

    def __repr__(self) -> str:
        return f"Subnet({self.address}/{self.prefix_len})"
