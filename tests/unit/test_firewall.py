"""The inbound TUN firewall's rules (common/firewall.py): parsing, one-line
errors, decisions on real IPv6 packets."""

from __future__ import annotations

import os
import struct

import pytest

from common.firewall import Firewall, FirewallError, load_rules
from common.identity import Identity
from common.wire.inner import L3_HEADER

A = Identity.from_secret(os.urandom(32))
B = Identity.from_secret(os.urandom(32))
ME = Identity.from_secret(os.urandom(32))


def packet(src: Identity, proto: int, dport: int = 0, flags: int = 0x02, ext: bool = False) -> bytes:
    if proto == 6:
        l4 = struct.pack("!HHIIBBHHH", 40000, dport, 1, 0, 5 << 4, flags, 1000, 0, 0)
    elif proto == 17:
        l4 = struct.pack("!HHHH", 40000, dport, 8, 0)
    else:
        l4 = struct.pack("!BBHHH", 128, 0, 0, 1, 1)
    nh = proto
    if ext:  # a destination-options header in front
        l4 = bytes([proto, 0]) + bytes(6) + l4
        nh = 60
    ip = struct.pack("!IHBB", 6 << 28, len(l4), nh, 64) + src.address.packed + ME.address.packed
    return L3_HEADER + ip + l4


def fw(text: str) -> Firewall:
    f = Firewall()
    f.replace(load_rules(text), 0.0)
    return f


def test_default_allow_without_rules_is_a_passthrough() -> None:
    assert fw("").passthrough and fw('default = "allow"').passthrough
    assert not fw('default = "deny"').passthrough


def test_deny_by_default_with_key_subnet_protocol_and_port_rules() -> None:
    f = fw(
        'default = "deny"\n'
        f'[[rule]]\npublic_key = "{A.public_key.hex()}"\nprotocol = "icmpv6"\n'
        f'[[rule]]\nsource = "{B.subnet}"\nprotocol = "tcp"\nport = "8000-8100"\n'
        '[[rule]]\nprotocol = "udp"\nport = 53\n'
    )
    assert f.allow(packet(A, 58)) and not f.allow(packet(B, 58))
    assert f.allow(packet(B, 6, 8080)) and not f.allow(packet(B, 6, 8101)) and not f.allow(packet(A, 6, 8080))
    assert f.allow(packet(A, 17, 53)) and not f.allow(packet(A, 17, 54))
    assert f.allow(packet(B, 6, 8050, ext=True))  # ports found behind an extension header
    # tcp_established: a segment that is not a first SYN passes (a reply to our own connection)
    assert f.allow(packet(A, 6, 40000, flags=0x10)) and not f.allow(packet(A, 6, 40000, flags=0x02))
    assert f.counters["fw_denied"] >= 5 and f.counters["fw_allowed_established"] == 1


def test_first_match_wins_and_deny_rules() -> None:
    f = fw(f'[[rule]]\naction = "deny"\nsource = "{A.subnet}"\n[[rule]]\nsource = "{A.address}/128"\n')
    assert not f.allow(packet(A, 58)) and f.allow(packet(B, 58))
    f2 = fw('default = "deny"\ntcp_established = false\n')
    assert not f2.allow(packet(A, 6, 80, flags=0x10))


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("default = ", "not valid TOML"),
        ('default = "maybe"', "default must be"),
        ('defualt = "deny"', "unknown key 'defualt'"),
        ("[[rule]]\nprotocol = 'sctp'", "rule 1: protocol"),
        ("[[rule]]\nport = 22", "rule 1: port needs protocol"),
        ("[[rule]]\nprotocol = 'tcp'\nport = 70000", "out of range"),
        ("[[rule]]\nprotocol = 'tcp'\nport = 'ssh'", "port must be"),
        ("[[rule]]\nsource = '10.0.0.0/8'", "not an IPv6 subnet"),
        ("[[rule]]\npublic_key = 'abcd'", "64 hex"),
        ("[[rule]]\naction = 'reject'", "action must be"),
        ("[[rule]]\nsrc = '400::/7'", "unknown key 'src'"),
        ("tcp_established = 1", "true or false"),
        ("rule = 5", "[[rule]]"),
    ],
)
def test_bad_rule_files_are_one_line_errors(text: str, words: str) -> None:
    with pytest.raises(FirewallError) as exc:
        load_rules(text)
    assert words in str(exc.value) and "\n" not in str(exc.value)


def test_truncated_packets_do_not_crash() -> None:
    f = fw('default = "deny"\n[[rule]]\nprotocol = "tcp"\nport = 22\n')
    full = packet(A, 6, 22)
    for n in range(44, len(full)):
        f.allow(full[:n])  # decided on what is there, never an IndexError
