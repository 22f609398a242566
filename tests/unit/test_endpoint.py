from __future__ import annotations

import pytest

from common.endpoint import Endpoint, EndpointError


@pytest.mark.parametrize(
    ("text", "proto", "socket_text"),
    [
        ("tcp://192.0.2.6:9651", "tcp", "192.0.2.6:9651"),
        ("TCP://192.0.2.6:9651", "tcp", "192.0.2.6:9651"),
        ("quic://[2a01:4f8:212:fa6::2]:9651", "quic", "[2a01:4f8:212:fa6::2]:9651"),
        ("tcp://[fe80::1%eth0]:9651", "tcp", "[fe80::1%eth0]:9651"),
        ("tls://[::1]:1", "tls", "[::1]:1"),
        ("vsock://3:9651", "vsock", "3:9651"),
    ],
)
def test_parse_valid(text: str, proto: str, socket_text: str) -> None:
    ep = Endpoint.parse(text)
    assert ep.proto == proto
    assert ep.socket_text == socket_text
    assert Endpoint.parse(str(ep)) == ep


@pytest.mark.parametrize(
    "text",
    ["foo", "udp://1.2.3.4:5", "tcp://1.2.3.4", "tcp://host:9651", "tcp://::1:9651", "tcp://[::1]", "tcp://[::1]:0",
     "tcp://1.2.3.4:70000", "tcp://[1.2.3.4]:5", "vsock://x:1", "tcp://[fe80::1%]:5", ""],
)  # fmt: skip
def test_parse_invalid(text: str) -> None:
    with pytest.raises(EndpointError):
        Endpoint.parse(text)


def test_json_shape_matches_reference() -> None:
    assert Endpoint.parse("tcp://192.0.2.6:9651").to_json() == {"proto": "tcp", "addr": {"socket": "192.0.2.6:9651"}}
    assert Endpoint.parse("vsock://3:9651").to_json() == {"proto": "vsock", "addr": {"vsock": {"cid": 3, "port": 9651}}}
