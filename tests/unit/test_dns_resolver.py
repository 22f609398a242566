"""The resolver's decisions (services/dnsd/resolver.py) and the overlay
names (common/dnsnames.py): local answers, the cache, forwarding and
SERVFAIL, the upstream choice, and bad input of every kind."""

from __future__ import annotations

import ipaddress
from typing import Any

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rrset
import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.dnsnames import DnsNameError, key_name, key_name_address, lookup, parse_names
from common.identity import Identity
from services.dnsd.resolver import CACHE_SIZE, FORWARD_TIMEOUT, NEGATIVE_TTL, DnsCore, Forward, Reply

NODE = Identity.from_secret(bytes(range(32)))
OTHER = Identity.from_secret(bytes(32))
R1, R2 = ipaddress.IPv6Address("40a::1"), ipaddress.IPv6Address("54b::1")


def core(**kw: Any) -> DnsCore:
    names = parse_names({"bob": NODE.public_key.hex(), "web.lab": str(OTHER.address)})
    return DnsCore(names=names, resolvers=[R1, R2], fallback="1.1.1.1", **kw)


def query(name: str, rdtype: str = "AAAA", **kw: Any) -> dns.message.Message:
    return dns.message.make_query(name, rdtype, **kw)


def reply_of(action: Any) -> dns.message.Message:
    assert isinstance(action, Reply), action
    return dns.message.from_wire(action.wire)


def addresses(msg: dns.message.Message) -> list[str]:
    return [rd.address for rrset in msg.answer for rd in rrset]


def test_key_names_and_the_names_table_are_answered_locally() -> None:
    c = core()
    for name in (key_name(NODE.public_key), key_name(NODE.public_key).upper() + ".", "bob", "bob.mycelium", "BOB."):
        msg = reply_of(c.handle(query(name).to_wire(), 0.0))
        assert addresses(msg) == [str(NODE.address)] and msg.flags & dns.flags.AA, name
    assert addresses(reply_of(c.handle(query("web.lab.mycelium").to_wire(), 0.0))) == [str(OTHER.address)]
    nodata = reply_of(c.handle(query("bob", "A").to_wire(), 0.0))
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    for name in ("nobody.mycelium", "ab" * 16 + "." + "zz" * 16 + ".mycelium", "mycelium"):
        assert reply_of(c.handle(query(name).to_wire(), 0.0)).rcode() == dns.rcode.NXDOMAIN, name


def test_forward_then_cache_until_the_ttl_runs_out() -> None:
    c = core()
    request = query("www.example", "A", id=4242)
    fwd = c.handle(request.to_wire(), 100.0)
    assert isinstance(fwd, Forward) and fwd.upstream == "1.1.1.1"
    assert fwd.query.flags & dns.flags.RD and fwd.query.question == request.question
    upstream = dns.message.make_response(fwd.query)
    upstream.answer.append(dns.rrset.from_text("www.example.", 60, "IN", "A", "192.0.2.7"))
    msg = reply_of(c.complete(fwd, upstream, 100.0))
    assert msg.id == 4242 and addresses(msg) == ["192.0.2.7"] and msg.flags & dns.flags.RA
    again = reply_of(c.handle(query("WWW.example", "A", id=7).to_wire(), 130.0))
    assert again.id == 7 and addresses(again) == ["192.0.2.7"] and again.answer[0].ttl == 30
    assert isinstance(c.handle(query("www.example", "A").to_wire(), 161.0), Forward)  # expired
    assert c.counters["answered_cache"] == 1 and c.counters["forwarded"] == 2


def test_failures_are_servfail_and_not_cached() -> None:
    c = core()
    fwd = c.handle(query("slow.example", "A", id=9).to_wire(), 0.0)
    assert isinstance(fwd, Forward)
    msg = reply_of(c.complete(fwd, None, FORWARD_TIMEOUT))
    assert msg.rcode() == dns.rcode.SERVFAIL and msg.id == 9
    refused = dns.message.make_response(fwd.query)
    refused.set_rcode(dns.rcode.REFUSED)
    assert reply_of(c.complete(fwd, refused, 1.0)).rcode() == dns.rcode.REFUSED
    assert isinstance(c.handle(query("slow.example", "A").to_wire(), 2.0), Forward)
    assert c.cache_len() == 0


def test_nxdomain_is_cached_briefly_and_the_cache_is_bounded() -> None:
    c = core(cache_size=2)
    for i, name in enumerate(("a.test", "b.test", "c.test")):
        fwd = c.handle(query(name).to_wire(), float(i))
        assert isinstance(fwd, Forward)
        upstream = dns.message.make_response(fwd.query)
        upstream.set_rcode(dns.rcode.NXDOMAIN)
        assert reply_of(c.complete(fwd, upstream, float(i))).rcode() == dns.rcode.NXDOMAIN
    assert c.cache_len() == 2
    assert isinstance(c.handle(query("a.test").to_wire(), 3.0), Forward)  # evicted first
    assert isinstance(c.handle(query("c.test").to_wire(), 3.0), Reply)
    assert isinstance(c.handle(query("c.test").to_wire(), 2.0 + NEGATIVE_TTL + 1), Forward)
    assert CACHE_SIZE >= 1000


def test_a_large_answer_is_truncated_for_udp_and_whole_over_tcp() -> None:
    c = core()
    fwd = c.handle(query("big.example", "A").to_wire(), 0.0)
    assert isinstance(fwd, Forward)
    upstream = dns.message.make_response(fwd.query)
    upstream.answer.append(
        dns.rrset.from_text_list("big.example.", 60, "IN", "A", [f"192.0.2.{i}" for i in range(1, 80)])
    )
    small = reply_of(c.complete(fwd, upstream, 0.0))
    assert small.flags & dns.flags.TC
    whole = reply_of(c.handle(query("big.example", "A").to_wire(), 1.0, max_size=65535))
    assert len(addresses(whole)) == 79 and not whole.flags & dns.flags.TC


def test_bad_queries() -> None:
    c = core()
    assert c.handle(b"", 0.0) is None and c.handle(b"\x12\x34\x01", 0.0) is None
    garbage = b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff\xff"
    formerr = c.handle(garbage, 0.0)
    assert isinstance(formerr, Reply) and formerr.wire[:2] == b"\xab\xcd"
    assert formerr.wire[3] & 0x0F == dns.rcode.FORMERR and formerr.wire[2] & 0x80  # QR set
    answer = dns.message.make_response(query("x.example"))
    assert c.handle(answer.to_wire(), 0.0) is None  # never answer an answer
    notify = query("x.example")
    notify.set_opcode(dns.opcode.NOTIFY)
    assert reply_of(c.handle(notify.to_wire(), 0.0)).rcode() == dns.rcode.NOTIMP
    two = query("x.example")
    two.question.append(query("y.example").question[0])
    assert reply_of(c.handle(two.to_wire(), 0.0)).rcode() == dns.rcode.FORMERR
    empty = dns.message.Message(id=5)
    assert reply_of(c.handle(empty.to_wire(), 0.0)).rcode() == dns.rcode.FORMERR


@given(st.binary(max_size=600))
def test_any_bytes_give_a_decision_never_an_exception(data: bytes) -> None:
    action = core().handle(data, 0.0)
    assert action is None or isinstance(action, Reply | Forward)


def test_upstream_is_the_lowest_finite_metric_resolver_node() -> None:
    c = core()
    routes = [
        {"subnet": "40a::/64", "metric": 300},
        {"subnet": "54b::/64", "metric": 120},
        {"subnet": "54b::/64", "metric": "infinite"},
        {"subnet": "not a subnet", "metric": 1},
        {"metric": 1},
        "junk",
    ]
    assert c.choose_upstream(routes) == [] and c.upstream == "54b::1"
    assert c.choose_upstream([{"subnet": "40a::/64", "metric": 0xFFFF}]) == [R1, R2]
    assert c.upstream == "1.1.1.1" and c.best is None
    assert c.choose_upstream([{"subnet": "40a::/64", "metric": 5}]) == [R2] and c.upstream == "40a::1"


def test_names_table_errors() -> None:
    assert parse_names({}) == {}
    for bad in (
        [],
        {"bob": 5},
        {"bob": "not a key"},
        {"bob": "10.0.0.1"},
        {"bob": "2001:db8::1"},
        {"bad name!": str(NODE.address)},
        {"-x": str(NODE.address)},
        {"": str(NODE.address)},
        {"a" * 64: str(NODE.address)},
    ):
        with pytest.raises(DnsNameError):
            parse_names(bad)


def test_key_name_forms() -> None:
    hexkey = NODE.public_key.hex()
    assert key_name_address(key_name(NODE.public_key)) == NODE.address
    assert key_name_address(f"{hexkey[:10]}.{hexkey[10:40]}.{hexkey[40:]}.mycelium.") == NODE.address
    assert key_name_address(f"{hexkey[:32]}.{hexkey[32:]}.example") is None
    assert key_name_address(f"{hexkey[:32]}.{hexkey[32:-1]}.mycelium") is None
    assert lookup({}, "bob.mycelium") is None
