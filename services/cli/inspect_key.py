"""`mycelium inspect`: print a public key and its overlay address."""

from __future__ import annotations

import json

from common.identity import address_of, load_or_create_key, parse_public_key, public_key_of


def inspect(pubkey_hex: str | None, key_file: str, as_json: bool) -> str:
    """The text the reference prints; raises IdentityError with a user-facing message."""
    pk = parse_public_key(pubkey_hex) if pubkey_hex is not None else public_key_of(load_or_create_key(key_file))
    address = address_of(pk)
    if as_json:
        return json.dumps({"publicKey": pk.hex(), "address": str(address)}, indent=2)
    return f"Public key: {pk.hex()}\nAddress: {address}"
