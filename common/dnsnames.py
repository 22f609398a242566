"""Overlay names for the DNS resolver: a public key's name and the
config's ``[names]`` table (short name -> key or address). Shared by the
option checks (a bad table is a start-up error) and dnsd.

A DNS label holds at most 63 characters, so the 64 hex digits of a key
cannot be one label: the key's name is its hex digits cut into labels
anywhere, normally two halves, ``<32 hex>.<32 hex>.mycelium``
(``key_name`` writes that form)."""

from __future__ import annotations

import ipaddress
import re

from .identity import IdentityError, address_of, parse_public_key
from .wire.rules import is_overlay_address

ZONE = "mycelium"
MAX_NAMES = 10_000
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


class DnsNameError(ValueError):
    """A [names] entry that cannot be served; the message is user-facing."""


def normalise(name: str) -> str:
    """Lower case, no trailing dot."""
    return name.lower().rstrip(".")


def key_name(public_key: bytes) -> str:
    """The name that answers a key's address: ``<32 hex>.<32 hex>.mycelium``."""
    text = public_key.hex()
    return f"{text[:32]}.{text[32:]}.{ZONE}"


def key_name_address(name: str) -> ipaddress.IPv6Address | None:
    """A key's name (its 64 hex digits in one or more labels, then
    ``.mycelium``) -> the node address of that key; None for any other name."""
    labels = normalise(name).split(".")
    if len(labels) < 2 or labels[-1] != ZONE:
        return None
    digits = "".join(labels[:-1])
    if len(digits) != 64:
        return None
    try:
        return address_of(parse_public_key(digits))
    except IdentityError:
        return None


def parse_names(table: object) -> dict[str, ipaddress.IPv6Address]:
    """The ``[names]`` table -> {normalised name: address}. A value is a
    64-hex public key or an overlay IPv6 address; a name is one or more DNS
    labels (letters, digits, hyphens), answered as given and, if it does not
    end in ``.mycelium``, also with that suffix."""
    if not isinstance(table, dict):
        raise DnsNameError('[names] must be a table of name = "<public key or overlay address>"')
    if len(table) > MAX_NAMES:
        raise DnsNameError(f"[names] has {len(table)} entries; at most {MAX_NAMES}")
    out: dict[str, ipaddress.IPv6Address] = {}
    for raw_name, value in table.items():
        name = normalise(str(raw_name))
        if not name or len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
            raise DnsNameError(f"[names]: {raw_name!r} is not a DNS name (labels of letters, digits and hyphens)")
        if not isinstance(value, str):
            raise DnsNameError(f"[names] {raw_name}: expected a public key or an overlay address, got {value!r}")
        out[name] = _target(str(raw_name), value.strip())
    return out


def parse_overlay_address(text: str) -> ipaddress.IPv6Address:
    """An overlay IPv6 address (inside 400::/7); DnsNameError says what is wrong."""
    try:
        addr = ipaddress.IPv6Address(text)
    except ValueError as exc:
        raise DnsNameError(f"{text!r} is not an IPv6 address") from exc
    if not is_overlay_address(addr):
        raise DnsNameError(f"{text} is not an overlay address (400::/7)")
    return addr


def _target(name: str, value: str) -> ipaddress.IPv6Address:
    if len(value) == 64:
        try:
            return address_of(parse_public_key(value))
        except IdentityError:
            pass
    try:
        return parse_overlay_address(value)
    except DnsNameError as exc:
        raise DnsNameError(f"[names] {name}: {exc} (nor a 64-hex public key)") from exc


def lookup(names: dict[str, ipaddress.IPv6Address], qname: str) -> ipaddress.IPv6Address | None:
    """The address a name stands for: a key name, a [names] entry, or that entry + ``.mycelium``."""
    name = normalise(qname)
    found = key_name_address(name)
    if found is not None:
        return found
    if name in names:
        return names[name]
    if name.endswith("." + ZONE):
        return names.get(name[: -len(ZONE) - 1])
    return None
