"""The host agent's TLS certificate (thinvisor.tls)."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import subprocess
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from thinvisor.errors import InvalidArgument, InvalidConfig
from thinvisor.tls import ensure_certificate, fingerprint, fingerprint_der

HOSTS = ["esx1.example.test", "esx1", "192.0.2.10"]


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"


def openssl_fingerprint(cert: Path) -> str:
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(cert)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.strip().split("=", 1)[1]


def test_generates_a_self_signed_certificate(pair: tuple[Path, Path]) -> None:
    cert, key = pair
    fp = ensure_certificate(cert, key, HOSTS)
    assert fp == openssl_fingerprint(cert) == fingerprint(cert)
    assert len(fp) == 32 * 3 - 1
    assert fp == fp.upper()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(cert.stat().st_mode) == 0o644

    c = x509.load_pem_x509_certificate(cert.read_bytes())
    assert c.subject == c.issuer
    cn = c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "esx1.example.test"
    san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["esx1.example.test", "esx1", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address(a) for a in ("192.0.2.10", "127.0.0.1", "::1")
    ]
    public_key = c.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert public_key.curve.name == "secp256r1"
    lifetime = c.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(days=3649) < lifetime <= timedelta(days=3650)


def test_reuses_existing_files(pair: tuple[Path, Path]) -> None:
    cert, key = pair
    fp = ensure_certificate(cert, key, HOSTS)
    before = (cert.read_bytes(), key.read_bytes())
    assert ensure_certificate(cert, key, ["other.example.test"]) == fp
    assert (cert.read_bytes(), key.read_bytes()) == before


def test_key_without_certificate_gets_one(pair: tuple[Path, Path]) -> None:
    cert, key = pair
    ensure_certificate(cert, key, HOSTS)
    old_key = key.read_bytes()
    cert.unlink()
    fp = ensure_certificate(cert, key, HOSTS)
    assert key.read_bytes() == old_key
    assert fp == fingerprint(cert)


def test_certificate_without_key_is_an_error(pair: tuple[Path, Path]) -> None:
    cert, key = pair
    ensure_certificate(cert, key, HOSTS)
    key.unlink()
    with pytest.raises(InvalidConfig, match="exists but its key"):
        ensure_certificate(cert, key, HOSTS)


@pytest.mark.parametrize("which", ["cert", "key"])
def test_corrupt_files(pair: tuple[Path, Path], which: str) -> None:
    cert, key = pair
    ensure_certificate(cert, key, HOSTS)
    (cert if which == "cert" else key).write_text("-----BEGIN GARBAGE-----\nxx\n")
    with pytest.raises(InvalidConfig) as info:
        ensure_certificate(cert, key, HOSTS)
    assert "\n" not in str(info.value)
    if which == "cert":
        with pytest.raises(InvalidConfig):
            fingerprint(cert)


def test_mismatched_key(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    cert, key = pair
    ensure_certificate(cert, key, HOSTS)
    ensure_certificate(tmp_path / "c2.pem", tmp_path / "k2.pem", HOSTS)
    key.write_bytes((tmp_path / "k2.pem").read_bytes())
    with pytest.raises(InvalidConfig, match="is not the key of"):
        ensure_certificate(cert, key, HOSTS)


def test_bad_hostnames(pair: tuple[Path, Path]) -> None:
    with pytest.raises(InvalidArgument):
        ensure_certificate(*pair, [])
    with pytest.raises(InvalidArgument):
        ensure_certificate(pair[0], pair[1].with_name("k2.pem"), ["a b"])


@pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1", "esx1.example.test"])
def test_a_tls_client_accepts_it(pair: tuple[Path, Path], server_hostname: str) -> None:
    """A client that trusts the certificate verifies it; the DER it gets has the same print."""
    cert, key = pair
    fp = ensure_certificate(cert, key, HOSTS)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    # What Python 3.13 sets by default: a self-signed leaf must still pass.
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT | ssl.VERIFY_X509_PARTIAL_CHAIN
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)

        thread = threading.Thread(target=serve)
        thread.start()
        with (
            socket.create_connection(("127.0.0.1", port)) as raw,
            client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
            tls.sendall(b"x")
        thread.join(5)
    assert der is not None
    assert fingerprint_der(der) == fp
