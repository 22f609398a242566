"""Private networks: options and key files refused before start, and the
TLS-PSK contexts and sans-IO session handshaking (and refusing) in memory."""

from __future__ import annotations

import datetime
import ssl
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common import privnet
from common.privnet import (
    PrivateNetwork,
    PrivnetError,
    TlsSession,
    client_context,
    refusal_reason,
    server_context,
)
from services.cli.main import build_parser
from services.cli.options import OptionError, resolve

from .test_launcher_options import run_cli

NET = PrivateNetwork("mynet", bytes(range(32)))


def pump(a: TlsSession, b: TlsSession, rounds: int = 10) -> None:
    """Run a handshake between two in-memory sessions to its end."""
    done_a = done_b = False
    for _ in range(rounds):
        done_a = done_a or a.handshake()
        b.feed(a.pending_out())
        done_b = done_b or b.handshake()
        a.feed(b.pending_out())
        if done_a and done_b:
            return
    raise AssertionError("handshake did not finish")


def test_same_name_and_key_handshake_psk_sha256_and_carry_data() -> None:
    client, server = TlsSession(client_context(NET), False), TlsSession(server_context(NET), True)
    pump(client, server)
    for side in (client, server):
        assert side.obj.version() == "TLSv1.3"
        suite = (side.obj.cipher() or ("",))[0]
        assert suite in ("TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_128_GCM_SHA256")  # the SHA-256 suites
        assert privnet.used_psk(side.obj)
    server.feed(client.encrypt(b"hello" * 1000))
    buf = bytearray(10_000)
    assert server.read_into(memoryview(buf)) == 5000 and bytes(buf[:5]) == b"hello"


@pytest.mark.parametrize(
    ("client_net", "reason"),
    [(PrivateNetwork("mynet", b"\xff" * 32), "wrong_key"), (PrivateNetwork("other", NET.key), "wrong_name")],
)
def test_wrong_key_or_name_is_refused_with_the_reason(client_net: PrivateNetwork, reason: str) -> None:
    client, server = TlsSession(client_context(client_net), False), TlsSession(server_context(NET), True)
    client.handshake()
    server.feed(client.pending_out())
    with pytest.raises(ssl.SSLError) as exc:
        server.handshake()
    assert refusal_reason(exc.value) == reason
    alert = server.pending_out()  # the refusal is told to the client, as OpenSSL does
    assert alert, "no alert to send"
    client.feed(alert)
    with pytest.raises(ssl.SSLError):
        client.handshake()


def _cert_context(server: bool) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not-a-psk")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    tmp = Path(f"/tmp/privnet-test-cert-{id(key)}.pem")
    tmp.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        if not server:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        ctx.load_cert_chain(tmp)
    finally:
        tmp.unlink()
    return ctx


def test_a_client_with_a_certificate_instead_of_the_psk_is_refused() -> None:
    client, server = TlsSession(_cert_context(server=False), False), TlsSession(server_context(NET), True)
    client.handshake()
    server.feed(client.pending_out())
    with pytest.raises(ssl.SSLError) as exc:
        server.handshake()
    assert refusal_reason(exc.value) == "wrong_name"  # no PSK offered, and we have no certificate


def test_a_server_with_a_certificate_instead_of_the_psk_is_refused() -> None:
    client, server = TlsSession(client_context(NET), False), TlsSession(_cert_context(server=True), True)
    with pytest.raises(ssl.SSLError) as exc:
        pump(client, server)
    assert "CERTIFICATE" in str(exc.value).upper()  # our client trusts no certificate at all


def test_plain_bytes_are_not_tls() -> None:
    server = TlsSession(server_context(NET), True)
    server.feed(bytes.fromhex("0101000018") + bytes(40))  # a public node's first Babel packet
    with pytest.raises(ssl.SSLError) as exc:
        server.handshake()
    assert refusal_reason(exc.value) == "not_tls"
    assert refusal_reason(TimeoutError()) == "timeout"


@pytest.mark.parametrize("name", ["a", "x" * 65, "é" * 33])
def test_network_name_is_2_to_64_bytes(name: str) -> None:
    with pytest.raises(PrivnetError, match="2-64 bytes"):
        PrivateNetwork(name, bytes(32))
    assert PrivateNetwork("é" * 32, bytes(32)).name  # 64 bytes of UTF-8


def test_key_file_first_32_bytes_short_is_an_error_never_rewritten(tmp_path: Path) -> None:
    long = tmp_path / "long"
    long.write_bytes(bytes(range(40)))
    assert privnet.load_network_key(long) == bytes(range(32))
    short = tmp_path / "short"
    short.write_bytes(b"x" * 31)
    with pytest.raises(PrivnetError, match="holds 31 bytes"):
        privnet.load_network_key(short)
    assert short.read_bytes() == b"x" * 31
    with pytest.raises(PrivnetError, match="does not exist"):
        privnet.load_network_key(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()


def _resolve(tmp_path: Path, *args: str, config: str | None = None) -> tuple[object, list[str]]:
    warnings: list[str] = []
    argv = ["--no-tun", "-k", str(tmp_path / "k"), "--run-dir", str(tmp_path / "run"), *args]
    if config is not None:
        (tmp_path / "m.toml").write_text(config)
        argv += ["-c", str(tmp_path / "m.toml")]
    return resolve(build_parser().parse_args(argv), warnings.append, check_ports=False), warnings


def test_options_each_flag_requires_the_other_and_the_file_keys_work(tmp_path: Path) -> None:
    key = tmp_path / "net.key"
    key.write_bytes(bytes(32))
    with pytest.raises(OptionError, match="requires --network-key-file"):
        _resolve(tmp_path, "--network-name", "mynet")
    with pytest.raises(OptionError, match="requires --network-name"):
        _resolve(tmp_path, "--network-key-file", str(key))
    with pytest.raises(OptionError, match="2-64 bytes"):
        _resolve(tmp_path, "--network-name", "x", "--network-key-file", str(key))
    cfg, _ = _resolve(tmp_path, config=f'network_name = "mynet"\nnetwork_key_file = "{key}"\n')
    assert cfg.network_name == "mynet" and cfg.network_key_file == str(key) and cfg.disable_quic  # type: ignore[attr-defined]
    cfg, warnings = _resolve(
        tmp_path, "--network-name", "mynet", "--network-key-file", str(key),
        "--peers", "tcp://192.0.2.1:9651", "tls://192.0.2.2:9651",
    )  # fmt: skip
    assert cfg.peers == ["tcp://192.0.2.1:9651", "tls://192.0.2.2:9651"]  # type: ignore[attr-defined]
    assert any("upgraded to TLS" in w for w in warnings)
    cfg, warnings = _resolve(tmp_path, "--peers", "tls://192.0.2.2:9651")
    assert cfg.peers == [] and any("needs a private network" in w for w in warnings)  # type: ignore[attr-defined]


@pytest.mark.parametrize("size", [0, 16, 31])
def test_short_key_file_is_one_line_at_start(tmp_path: Path, size: int) -> None:
    key = tmp_path / "net.key"
    key.write_bytes(b"k" * size)
    out = run_cli(
        "--no-tun", "--network-name", "mynet", "--network-key-file", str(key), "--run-dir", str(tmp_path / "run"),
        cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 1
    assert len(out.stderr.strip().splitlines()) == 1 and f"holds {size} bytes" in out.stderr
    assert key.read_bytes() == b"k" * size and not (tmp_path / "run").exists()


OLD_PYTHONS = [p for p in ("/usr/bin/python3.11", "/usr/bin/python3.12") if Path(p).exists()]


@pytest.mark.skipif(not OLD_PYTHONS, reason="no Python older than 3.13 on this machine")
def test_an_older_python_is_told_why_in_one_line() -> None:
    """The check resolve() makes before anything starts, on a real older
    interpreter (it has none of the node's packages, so only the check runs;
    the launcher prints its OptionError as one line)."""
    code = "from common.privnet import psk_support_problem; print(psk_support_problem())"
    out = subprocess.run(
        [OLD_PYTHONS[0], "-c", code], capture_output=True, text=True, timeout=30, cwd=Path.cwd(),
        env={"PYTHONPATH": str(Path.cwd())},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and "Python 3.13+" in lines[0] and "this is Python 3.1" in lines[0], out.stdout
    assert privnet.psk_support_problem() is None  # and this interpreter can
