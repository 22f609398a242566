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
    __slots__ = ("_network", "address", "prefix_len")

    def __init__(self, address: IPAddress, prefix_len: int) -> None:
        if not 0 <= prefix_len <= address.max_prefixlen:
            raise CodecError(f"prefix length {prefix_len} out of range for {address}")
        self.address = address
        self.prefix_len = prefix_len
        self._network = ipaddress.ip_network((address, prefix_len), strict=False)

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
    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return self._network

    @property
    def is_ipv6(self) -> bool:
        return self.address.version == 6

    def contains_address(self, addr: IPAddress) -> bool:
        return addr in self._network

    def contains(self, other: Subnet) -> bool:
        """True when ``other`` lies entirely inside this subnet."""
        if other._network.version != self._network.version:
            return False
        return other.prefix_len >= self.prefix_len and other._network.subnet_of(self._network)  # type: ignore[arg-type]  # same IP version, checked above

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Subnet):
            return NotImplemented
        return self._network == other._network

    def __hash__(self) -> int:
        return hash(self._network)

    def __str__(self) -> str:
        return str(self._network)

    def __repr__(self) -> str:
        return f"Subnet({self.address}/{self.prefix_len})"
