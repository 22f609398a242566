"""Topic ACL configuration: decisions, API mutations and the ``--topic-config``
TOML loader (PROTOCOL.md 7.7, 7.9; API.md 2.4)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from common.wire.subnet import Subnet
from services.msgbus.topics import TopicConfig, TopicConfigError, load_topic_config, parse_topic_config


def addr(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


def test_acl_decisions() -> None:
    cfg = TopicConfig()
    assert cfg.is_allowed(b"anything", addr("400::1"))
    cfg.add_source(b"t", "400:1::/32")
    assert cfg.is_allowed(b"t", addr("400:1:2::3"))
    assert not cfg.is_allowed(b"t", addr("400:2::3"))
    assert cfg.is_allowed(b"other", addr("400:2::3"))  # default accept
    cfg.default_accept = False
    assert not cfg.is_allowed(b"other", addr("400:2::3"))
    assert cfg.is_allowed(b"t", ipaddress.IPv6Address("400:1::9"))
    cfg.add_topic(b"blocked")
    assert not cfg.is_allowed(b"blocked", addr("400:1::1"))  # an empty whitelist blocks everyone
    cfg.add_source(b"v4", "10.0.0.0/8")
    assert not cfg.is_allowed(b"v4", addr("::ffff:10.0.0.1"))  # different families never match


def test_api_mutations() -> None:
    cfg = TopicConfig()
    rev = cfg.revision
    cfg.add_topic(b"a")
    cfg.add_source(b"b", "400::/7")  # creates the topic
    cfg.add_source(b"b", "400::/7")  # listed once
    cfg.add_source(b"b", "5ab:1234::1")  # bare IP -> /128
    assert cfg.topics() == [b"a", b"b"]
    assert [str(s) for s in cfg.sources(b"b")] == ["400::/7", "5ab:1234::1/128"]
    assert cfg.sources(b"missing") is None
    cfg.remove_source(b"b", Subnet.parse("400::/7"))
    cfg.remove_source(b"missing", "400::/7")  # idempotent
    assert [str(s) for s in cfg.sources(b"b")] == ["5ab:1234::1/128"]
    cfg.set_forward_socket(b"nope", "/x")  # not whitelisted: ignored
    assert cfg.forward_socket(b"nope") is None and b"nope" not in cfg.topics()
    cfg.set_forward_socket(b"b", "/run/b.sock")
    assert cfg.forward_socket(b"b") == "/run/b.sock"
    cfg.remove_forward_socket(b"b")
    assert cfg.forward_socket(b"b") is None
    cfg.remove_topic(b"a")
    cfg.remove_topic(b"a")
    assert cfg.topics() == [b"b"]
    assert cfg.revision > rev
    with pytest.raises(TopicConfigError):
        cfg.add_source(b"b", "not-a-subnet")
    with pytest.raises(TopicConfigError):
        cfg.add_source(b"b", "400::/129")


def test_toml_both_formats() -> None:
    cfg = parse_topic_config(
        """
        default = "Reject"
        old_style = ["400::/7", "5ab:1234::1"]

        ["example.topic"]
        subnets = ["400::/7"]
        forward_socket = "/run/app.sock"

        ["no.subnets"]
        forward_socket = "/run/x.sock"
        unknown_key = 1
        """
    )
    assert not cfg.default_accept
    assert set(cfg.topics()) == {b"old_style", b"example.topic", b"no.subnets"}
    assert [str(s) for s in cfg.sources(b"old_style")] == ["400::/7", "5ab:1234::1/128"]
    assert cfg.forward_socket(b"example.topic") == "/run/app.sock"
    assert cfg.sources(b"no.subnets") == [] and cfg.forward_socket(b"no.subnets") == "/run/x.sock"
    assert parse_topic_config("").default_accept
    assert parse_topic_config('default = "Accept"').topics() == []


def test_toml_unquoted_dotted_name_whitelists_the_first_part() -> None:
    cfg = parse_topic_config('[example.topic]\nsubnets = ["400::/7"]\n')
    assert cfg.topics() == [b"example"]
    assert cfg.sources(b"example") == []  # the nested table is ignored, so the topic is blocked


@pytest.mark.parametrize(
    "text",
    [
        'default = "accept"',  # exact spelling only
        "default = true",
        "t = 5",
        't = ["400::/7", 3]',
        't = ["bogus"]',
        '[t]\nsubnets = "400::/7"',
        '[t]\nsubnets = ["400::/7"]\nforward_socket = 1',
        "this is not toml",
    ],
)
def test_bad_toml_is_rejected(text: str) -> None:
    with pytest.raises(TopicConfigError):
        parse_topic_config(text)


def test_loader_falls_back_to_default_with_warning(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('default = "Reject"\n["t"]\nsubnets = ["400::/7"]\n')
    cfg, warning = load_topic_config(good)
    assert warning is None and not cfg.default_accept and cfg.topics() == [b"t"]
    bad = tmp_path / "bad.toml"
    bad.write_text('default = "Maybe"\n')
    cfg, warning = load_topic_config(bad)
    assert cfg.default_accept and cfg.topics() == [] and "bad.toml" in warning
    cfg, warning = load_topic_config(tmp_path / "missing.toml")
    assert cfg.default_accept and warning is not None
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe")
    assert load_topic_config(binary)[1] is not None


def test_dict_round_trip_and_validation() -> None:
    cfg = TopicConfig(default_accept=False)
    cfg.add_source(b"\x00\xff", "400::/7")
    cfg.set_forward_socket(b"\x00\xff", "/s")
    back = TopicConfig.from_dict(cfg.to_dict())
    assert back.to_dict() == cfg.to_dict()
    assert back.is_allowed(b"\x00\xff", addr("400::1")) and not back.is_allowed(b"x", addr("400::1"))
    for broken in ({}, {"default_accept": 1, "topics": []}, {"default_accept": True, "topics": [{"topic": "zz"}]}):
        with pytest.raises(TopicConfigError):
            TopicConfig.from_dict(broken)
