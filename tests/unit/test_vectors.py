"""Every wire vector of tests/data/vectors.json (shared/spec/vectors.json) against our codecs.

Vectors are never copied here: each test reads its group through
``tests.vectors`` so a changed or added vector is tested as soon as the
spec changes. ``test_every_group_is_tested`` fails when the file gains a
group nobody tests.
"""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path
from typing import Any

import blake3
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from common.crypto import SessionKey, shared_secret
from common.identity import (
    Identity,
    address_of,
    make_router_id,
    public_key_of,
    router_id_text,
    subnet_of,
)
from common.wire.beacon import MAGIC, Beacon
from common.wire.errors import CodecError
from common.wire.icmp import icmpv6_checksum, oob_icmp_plaintext, parse_oob_icmp
from common.wire.inner import INNER_L3, INNER_MESSAGE, INNER_OOB_ICMP, MESSAGE_HEADER, split_inner
from common.wire.message import (
    FLAG_ABORTED,
    FLAG_ACK,
    FLAG_CHUNK,
    FLAG_DONE,
    FLAG_INIT,
    FLAG_READ,
    FLAG_REPLY,
    HEADER_SIZE,
    Abort,
    Chunk,
    ChunkAck,
    Done,
    DoneAck,
    Init,
    InitAck,
    MessagePacket,
    Read,
    decode_message,
    encode_message,
)
from common.wire.packet import ControlPacket, DataPacket, StreamDecoder, decode_packet, encode_data_header
from common.wire.subnet import Subnet
from common.wire.tlv import Hello, Ihu, RouteRequest, SeqNoRequest, Tlv, Update, decode_tlv
from tests.vectors import params, vectors, vectors_path

# Groups the router engineer tests next to the router (tests/unit/test_router*).
TESTED_ELSEWHERE = frozenset({"route_hold_time", "metric_add", "metric_sub", "seqno_compare", "seqno_arith"})

_TESTED_HERE: set[str] = set()


def group(name: str) -> list[Any]:
    """``params`` that also records the group as covered by this module."""
    _TESTED_HERE.add(name)
    return params(name)


def test_every_group_is_tested() -> None:
    """A new group in vectors.json must get tests before the suite passes again."""
    in_file = {v["group"] for v in json.loads(vectors_path().read_text())["vectors"]}
    untested = in_file - _TESTED_HERE - TESTED_ELSEWHERE
    assert not untested, f"vector groups without tests: {sorted(untested)}"
    assert not _TESTED_HERE & TESTED_ELSEWHERE, "a group is claimed both here and elsewhere"
    # "Elsewhere" must really exist: some test module has to load each of those groups.
    tests_dir = Path(__file__).resolve().parents[1]
    referenced: set[str] = set()
    for source in tests_dir.rglob("test_*.py"):
        if source.resolve() != Path(__file__).resolve():
            referenced |= set(_GROUP_REF.findall(source.read_text()))
    missing = TESTED_ELSEWHERE - referenced
    assert not missing, f"groups said to be tested elsewhere but loaded by no test module: {sorted(missing)}"


_GROUP_REF = re.compile(r"""\b(?:params|vectors)\(\s*["']([A-Za-z0-9_]+)["']""")


def test_every_vector_name_is_unique() -> None:
    """Vector names are pytest ids; a duplicate would hide one vector behind another."""
    names = [v["name"] for v in json.loads(vectors_path().read_text())["vectors"]]
    assert len(names) == len(set(names))


def _h(text: str) -> bytes:
    return bytes.fromhex(text)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def _both_ways(v: dict[str, Any]) -> bool:
    direction = v.get("direction", "encode+decode")
    assert direction in ("encode+decode", "decode-only"), direction
    return bool(direction == "encode+decode")


# --------------------------------------------------------------------------- Babel TLVs

# Offset of the AE byte in each prefix-carrying TLV body.
_AE_OFFSET = {"update": 0, "route_request": 1, "seqno_request": 0}


def _subnet(f: dict[str, Any]) -> Subnet:
    return Subnet(_ip(f["address"]), f["prefix_len"])


def tlv_from_fields(kind: str, f: dict[str, Any]) -> Tlv:
    if kind == "hello":
        return Hello(f["flags"], f["seqno"], f["interval"])
    if kind == "ihu":
        return Ihu(f["rx_cost"], f["interval"], None if f["address"] is None else _ip(f["address"]))
    if kind == "update":
        return Update(f["flags"], f["interval"], f["seqno"], f["metric"], _subnet(f), _h(f["router_id"]))
    if kind == "route_request":
        return RouteRequest(f["generation"], None if f["address"] is None else _subnet(f))
    if kind == "seqno_request":
        return SeqNoRequest(f["seqno"], f["hop_count"], _h(f["router_id"]), _subnet(f))
    raise AssertionError(f"vector names an unknown TLV kind {kind!r}")


def _expected_wire_address(kind: str, body: bytes, f: dict[str, Any]) -> bytes:
    """What a reader reconstructs: the sent prefix bytes (host bits in the last
    byte kept), zero-filled; AE 3 carries the whole low half of a fe80::/64."""
    packed = _ip(f["address"]).packed
    if body[_AE_OFFSET[kind]] == 3:
        return packed
    n = (f["prefix_len"] + 7) // 8
    return packed[:n] + bytes(len(packed) - n)


def check_decoded_tlv(kind: str, body: bytes, decoded: Tlv, f: dict[str, Any]) -> None:
    expected = tlv_from_fields(kind, f)
    assert type(decoded) is type(expected)
    assert decoded == expected
    subnet = getattr(decoded, "subnet", None)
    if subnet is not None:
        # Subnet equality is by network only; pin down the exact address too.
        assert subnet.prefix_len == f["prefix_len"]
        assert subnet.address.packed == _expected_wire_address(kind, body, f)


def _control_frame(tlv_type: int, body: bytes) -> bytes:
    n = len(body)
    return bytes((1, 1, 0, 0, 42, 3)) + (n + 2).to_bytes(2, "big") + bytes((tlv_type, n)) + body


_HELLO_FRAME = ControlPacket(Hello(0x8000, 7, 2000)).encode()


@pytest.mark.parametrize("v", group("babel_tlv_body"))
def test_babel_tlv_body(v: dict[str, Any]) -> None:
    body = _h(v["hex"])
    if v.get("expect") == "reject":
        assert v["fields"] is None
        with pytest.raises(CodecError):
            decode_tlv(v["tlv_type"], body)
        return
    assert "expect" not in v, f"unknown expectation {v['expect']!r}"
    check_decoded_tlv(v["tlv"], body, decode_tlv(v["tlv_type"], body), v["fields"])
    if _both_ways(v):
        tlv = tlv_from_fields(v["tlv"], v["fields"])
        assert v["tlv_type"] == tlv.TYPE
        assert tlv.encode_body() == body


@pytest.mark.parametrize("v", group("babel_tlv_body"))
def test_babel_tlv_body_in_stream(v: dict[str, Any]) -> None:
    """Inside a link stream every vector TLV, accepted or rejected, consumes
    exactly its TLV length: the packet after it still decodes."""
    body = _h(v["hex"])
    dec = StreamDecoder()
    out = dec.feed(_control_frame(v["tlv_type"], body) + _HELLO_FRAME)
    assert dec.buffered == 0
    if v.get("expect") == "reject":
        assert [p.tlv for p in out] == [Hello(0x8000, 7, 2000)]
        assert sum(dec.drops.values()) == 1
    else:
        assert len(out) == 2 and not dec.drops
        check_decoded_tlv(v["tlv"], body, out[0].tlv, v["fields"])
        assert out[1].tlv == Hello(0x8000, 7, 2000)


@pytest.mark.parametrize("v", group("control_packet_frame"))
def test_control_packet_frame(v: dict[str, Any]) -> None:
    frame = _h(v["hex"])
    pkt = decode_packet(frame)
    assert isinstance(pkt, ControlPacket)
    body = frame[10:]
    assert pkt.tlv.TYPE == v["tlv_type"] == frame[8]
    check_decoded_tlv(v["tlv"], body, pkt.tlv, v["fields"])
    if _both_ways(v):
        assert ControlPacket(tlv_from_fields(v["tlv"], v["fields"])).encode() == frame


@pytest.mark.parametrize("v", group("subnet_equality"))
def test_subnet_equality(v: dict[str, Any]) -> None:
    f = v["fields"]
    a, b = Subnet.parse(f["a"]), Subnet.parse(f["b"])
    assert (a == b) is f["equal"]
    assert (a != b) is not f["equal"]
    if f["equal"]:
        assert hash(a) == hash(b)
        assert len({a, b}) == 1
    # The address keeps its host bits (it is what goes on the wire).
    assert str(a.address) == f["a"].split("/")[0]


# --------------------------------------------------------------------------- messages

_FLAG_BITS = {
    "INIT": FLAG_INIT,
    "DONE": FLAG_DONE,
    "ABORTED": FLAG_ABORTED,
    "CHUNK": FLAG_CHUNK,
    "READ": FLAG_READ,
    "REPLY": FLAG_REPLY,
    "ACK": FLAG_ACK,
}


def _flag_word(names: list[str]) -> int:
    word = 0
    for name in names:
        word |= _FLAG_BITS[name]
    return word


def message_from_fields(f: dict[str, Any]) -> MessagePacket:
    mid = _h(f["message_id"])
    flags = frozenset(f["flags"])
    if flags in ({"INIT"}, {"INIT", "REPLY"}):
        return Init(mid, f["length"], f["topic"].encode(), reply="REPLY" in flags)
    if flags == {"INIT", "ACK"}:
        return InitAck(mid, f["length"], f["topic_len"])
    if flags == {"CHUNK"}:
        return Chunk(mid, f["chunk_index"], f["chunk_offset"], f["chunk_size"], f["data"].encode())
    if flags == {"CHUNK", "ACK"}:
        return ChunkAck(mid, f["chunk_index"], f["chunk_offset"], f["chunk_size"])
    if flags == {"DONE"}:
        return Done(mid, f["chunk_count"], _h(f["checksum"]))
    if flags == {"DONE", "ACK"}:
        return DoneAck(mid, f["chunk_count"], _h(f["checksum"]))
    if flags == {"READ"}:
        return Read(mid)
    if flags == {"ABORTED"}:
        return Abort(mid)
    raise AssertionError(f"no message packet for flags {sorted(flags)}")


@pytest.mark.parametrize("v", group("message_plaintext"))
def test_message_plaintext(v: dict[str, Any]) -> None:
    plaintext = _h(v["hex"])
    f = v["fields"]
    kind, payload = split_inner(plaintext)
    assert kind == INNER_MESSAGE
    assert int.from_bytes(payload[8:10], "big") == _flag_word(f["flags"])
    expected = message_from_fields(f)
    assert decode_message(payload) == expected
    assert MESSAGE_HEADER + encode_message(expected) == plaintext
    if "checksum_blake3_of" in f:
        assert blake3.blake3(f["checksum_blake3_of"].encode()).digest() == _h(f["checksum"])


# One packet per flag combination that names a packet type; REPLY and ACK
# alone do not, so a bare header with them must be rejected.
_HEADER_PACKETS: dict[frozenset[str], Any] = {
    frozenset({"INIT"}): lambda mid: Init(mid, 0, b""),
    frozenset({"INIT", "ACK"}): lambda mid: InitAck(mid, 0, 0),
    frozenset({"DONE"}): lambda mid: Done(mid, 0, bytes(32)),
    frozenset({"ABORTED"}): lambda mid: Abort(mid),
    frozenset({"CHUNK"}): lambda mid: Chunk(mid, 0, 0, 0, b""),
    frozenset({"READ"}): lambda mid: Read(mid),
}


@pytest.mark.parametrize("v", group("message_header"))
def test_message_header(v: dict[str, Any]) -> None:
    header = _h(v["hex"])
    f = v["fields"]
    assert len(header) == HEADER_SIZE
    assert _flag_word(f["flags"]) == f["flags_u16"]
    assert header == _h(f["message_id"]) + f["flags_u16"].to_bytes(2, "big") + b"\0\0"
    make = _HEADER_PACKETS.get(frozenset(f["flags"]))
    mid = _h(f["message_id"])
    if make is None:
        with pytest.raises(CodecError):
            decode_message(header + bytes(64))
        return
    pkt = make(mid)
    encoded = encode_message(pkt)
    assert encoded[:HEADER_SIZE] == header
    assert decode_message(encoded) == pkt


# field name -> (packet with the field set to a value, attribute to read back)
_BODY_FIELDS: dict[str, tuple[Any, str]] = {
    "length": (lambda val: Init(bytes(8), val, b""), "length"),
    "chunk_index": (lambda val: ChunkAck(bytes(8), val, 0, 0), "index"),
    "chunk_offset": (lambda val: ChunkAck(bytes(8), 0, val, 0), "offset"),
    "chunk_size": (lambda val: ChunkAck(bytes(8), 0, 0, val), "size"),
    "chunk_count": (lambda val: Done(bytes(8), val, bytes(32)), "chunk_count"),
    "checksum": (lambda val: Done(bytes(8), 0, val), "checksum"),
}


@pytest.mark.parametrize("v", group("message_body_field"))
def test_message_body_field(v: dict[str, Any]) -> None:
    raw = _h(v["hex"])
    f = v["fields"]
    if f["field"] == "chunk body with data":
        pkt = Chunk(bytes(8), f["chunk_index"], f["chunk_offset"], f["chunk_size"], _h(f["data_hex"]))
        assert encode_message(pkt)[HEADER_SIZE:] == raw
        assert decode_message(encode_message(pkt)[:HEADER_SIZE] + raw) == pkt
        return
    make, attr = _BODY_FIELDS[f["field"]]
    value = raw if f["field"] == "checksum" else f["value"]
    if "length" in f:
        assert len(raw) == f["length"]
    off = f["offset_in_body"]
    encoded = encode_message(make(value))
    # write: the field lands at its offset
    assert encoded[HEADER_SIZE + off : HEADER_SIZE + off + len(raw)] == raw
    # read: splice the bytes into an otherwise different packet and decode
    template = bytearray(encode_message(make(bytes(32) if f["field"] == "checksum" else 0)))
    template[HEADER_SIZE + off : HEADER_SIZE + off + len(raw)] = raw
    assert getattr(decode_message(bytes(template)), attr) == value


# --------------------------------------------------------------------------- identity


@pytest.mark.parametrize("v", group("address_derivation"))
def test_address_derivation(v: dict[str, Any]) -> None:
    f = v["fields"]
    pk = _h(f["public_key"])
    if "secret_key" in f:
        assert public_key_of(_h(f["secret_key"])) == pk
        ident = Identity.from_secret(_h(f["secret_key"]))
        assert ident.public_key == pk
        assert str(ident.address) == f["address"]
        assert ident.subnet == Subnet.parse(f["subnet"])
    assert blake3.blake3(pk).digest(length=16) == _h(f["blake3_xof_first16"])
    if "first_byte_popcount_parity" in f:
        assert bin(_h(f["blake3_xof_first16"])[0]).count("1") % 2 == f["first_byte_popcount_parity"]
    addr = address_of(pk)
    assert addr == ipaddress.IPv6Address(f["address"])
    assert str(addr) == f["address"]
    sub = subnet_of(addr)
    assert sub == Subnet.parse(f["subnet"])
    assert str(sub) == f["subnet"]
    assert sub.address == sub.network.network_address  # host bits zero
    if "router_id_prefix_hex" in f:
        assert make_router_id(pk)[:34] == _h(f["router_id_prefix_hex"])
    if "readme_printed_address" in f:
        # the stale pre-0.5 BLAKE2b value must not come back
        assert str(addr) != f["readme_printed_address"]


@pytest.mark.parametrize("v", group("router_id"))
def test_router_id(v: dict[str, Any]) -> None:
    f = v["fields"]
    rid = _h(v["hex"])
    assert len(rid) == 40
    assert rid == _h(f["public_key"]) + _h(f["zone"]) + _h(f["random"])
    assert router_id_text(rid) == f["display"]
    fresh = make_router_id(_h(f["public_key"]))
    assert len(fresh) == 40 and fresh[:34] == _h(f["public_key"]) + _h(f["zone"])


@pytest.mark.parametrize("v", group("discovery_beacon"))
def test_discovery_beacon(v: dict[str, Any]) -> None:
    raw = _h(v["hex"])
    f = v["fields"]
    rid = _h(f["router_id"])
    assert f["magic"].encode() == MAGIC
    assert rid == _h(f["router_id_public_key"]) + _h(f["zone"]) + _h(f["random"])
    beacon = Beacon.decode(raw)
    assert beacon == Beacon(f["tcp_port"], rid)
    assert Beacon(f["tcp_port"], rid).encode() == raw


# --------------------------------------------------------------------------- crypto and data


def _private(hex_secret: str) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(_h(hex_secret))


def _by_name(name: str) -> dict[str, Any]:
    for v in json.loads(vectors_path().read_text())["vectors"]:
        if v["name"] == name:
            return dict(v)
    raise AssertionError(f"vector {name!r} referenced but not found")


@pytest.mark.parametrize("v", group("crypto"))
def test_crypto(v: dict[str, Any]) -> None:
    f = v["fields"]
    if "shared_secret" in f:
        alice, bob = _private(f["alice_secret"]), _private(f["bob_secret"])
        assert public_key_of(_h(f["alice_secret"])) == _h(f["alice_public"])
        assert public_key_of(_h(f["bob_secret"])) == _h(f["bob_public"])
        assert shared_secret(alice, _h(f["bob_public"])) == _h(f["shared_secret"])
        assert shared_secret(bob, _h(f["alice_public"])) == _h(f["shared_secret"])
        assert f["aes256gcm_key"] == f["shared_secret"]  # no KDF
        # and the derived key really is the one that opens the sealed vector
        sealed = [x for x in vectors("crypto") if x["fields"].get("key") == f["aes256gcm_key"]]
        assert sealed, "no sealed vector uses the X25519 output as its key"
        return
    assert f["aad"] == ""
    key = SessionKey(_h(f["key"]))
    plaintext, body = _h(f["plaintext"]), _h(v["hex"])
    assert key.seal(plaintext, _h(f["nonce"])) == body
    assert body[:-12] == _h(f["ciphertext_and_tag"])
    assert body[-28:-12] == _h(f["tag"])
    assert body[-12:] == _h(f["nonce"])
    assert key.open(body) == plaintext
    kind, _payload = split_inner(plaintext)
    assert (plaintext[0], kind) == (f["plaintext_inner_header"]["version"], f["plaintext_inner_header"]["type"])


@pytest.mark.parametrize("v", group("data_packet_frame"))
def test_data_packet_frame(v: dict[str, Any]) -> None:
    frame = _h(v["hex"])
    f = v["fields"]
    src, dst = _ip(f["src"]).packed, _ip(f["dst"]).packed
    pkt = decode_packet(frame)
    assert isinstance(pkt, DataPacket)
    assert (pkt.src, pkt.dst, pkt.hop_limit) == (src, dst, f["hop_limit"])
    assert len(pkt.body) == f["body_len"]
    if "body_hex" in f:
        assert pkt.body == _h(f["body_hex"])
    assert DataPacket(src, dst, f["hop_limit"], pkt.body).encode() == frame
    assert encode_data_header(src, dst, f["hop_limit"], len(pkt.body)) + pkt.body == frame
    if "key" in f:
        key = SessionKey(_h(f["key"]))
        plaintext = _h(f["plaintext"])
        assert key.open(pkt.body) == plaintext
        assert key.seal(plaintext, _h(f["nonce"])) == pkt.body
        kind, payload = split_inner(plaintext)
        assert kind in (INNER_L3, INNER_MESSAGE, INNER_OOB_ICMP)
        if kind == INNER_MESSAGE:
            decode_message(payload)  # must be a well-formed message packet


@pytest.mark.parametrize("v", group("oob_icmp"))
def test_oob_icmp(v: dict[str, Any]) -> None:
    plaintext = _h(v["hex"])
    f = v["fields"]
    reporter = _private(f["intermediate_secret"])
    assert public_key_of(_h(f["intermediate_secret"])) == _h(f["intermediate_public"])
    reporter_net = subnet_of(address_of(_h(f["intermediate_public"]))).address
    assert reporter_net == _ip(f["intermediate_subnet_address"])
    original_src, original_dst = _ip(f["original_src"]).packed, _ip(f["original_dst"]).packed

    # "icmp_payload" names another vector's field: "...: <vector>.<field>"
    ref_name, ref_field = f["icmp_payload"].rsplit(": ", 1)[1].split(".")
    original_body = _h(_by_name(ref_name)["fields"][ref_field])

    built = oob_icmp_plaintext(
        reporter_net.packed, original_src, original_dst, f["icmp_type"], f["icmp_code"], original_body
    )
    assert built == plaintext

    kind, payload = split_inner(plaintext)
    assert kind == INNER_OOB_ICMP
    oob = parse_oob_icmp(payload)
    assert oob.original_dst == original_dst
    assert (oob.src, oob.dst) == (_ip(f["outer_packet"]["src"]).packed, _ip(f["outer_packet"]["dst"]).packed)
    assert (oob.icmp_type, oob.code, oob.rest, oob.payload) == (f["icmp_type"], f["icmp_code"], bytes(4), original_body)
    ip = payload[16:]
    assert ip[7] == f["outer_packet"]["hop_limit"]
    icmp = ip[40:]
    assert icmpv6_checksum(oob.src, oob.dst, icmp) == 0  # a valid checksum sums to zero
    assert icmpv6_checksum(oob.src, oob.dst, icmp[:2] + b"\0\0" + icmp[4:]) == int.from_bytes(icmp[2:4], "big")

    # sealed by the reporter for the original source (Bob)
    bob_pk = next(
        _h(a["fields"]["public_key"])
        for a in vectors("address_derivation")
        if a["fields"]["address"] == f["original_src"]
    )
    key = shared_secret(reporter, bob_pk)
    assert key == _h(f["key_intermediate_bob"])
    sealed = _h(f["sealed_body"])
    assert SessionKey(key).seal(plaintext, _h(f["nonce"])) == sealed
    assert SessionKey(key).open(sealed) == plaintext

    # Bob opens the returned original body with the key he shares with the
    # destination: the crypto vector that sealed exactly that body.
    sealed_original = [x for x in vectors("crypto") if x.get("hex") == original_body.hex()]
    assert sealed_original, "no crypto vector holds the original body"
    of = sealed_original[0]["fields"]
    assert SessionKey(_h(of["key"])).open(oob.payload) == _h(of["plaintext"])
