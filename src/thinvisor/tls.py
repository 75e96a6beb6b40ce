"""The host agent's TLS certificate: the operator's own, or a self-signed one made on first start.

Clients that cannot check a self-signed certificate against a CA pin its SHA-256
fingerprint instead, shown as browsers and ``openssl x509 -fingerprint -sha256`` show it.
"""

from __future__ import annotations

import hashlib
import ipaddress
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from thinvisor.errors import InvalidArgument, InvalidConfig
from thinvisor.fs import atomic_write

VALIDITY = timedelta(days=3650)
_LOOPBACK = ("127.0.0.1", "::1")
# Accept a certificate whose host clock ran slightly ahead of the client's.
_BACKDATE = timedelta(hours=1)

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def fingerprint_der(der: bytes) -> str:
    """The SHA-256 fingerprint of a DER certificate, like ``AB:CD:...`` (32 octets)."""
    return hashlib.sha256(der).digest().hex(":").upper()


def fingerprint(cert: Path) -> str:
    """The SHA-256 fingerprint of the (first) certificate in a PEM file."""
    return fingerprint_der(_load_cert(cert).public_bytes(serialization.Encoding.DER))


def ensure_certificate(cert: Path, key: Path, hostnames: list[str]) -> str:
    """Use the certificate and key at these paths, making a self-signed pair when missing.

    Returns the certificate's SHA-256 fingerprint. A key without its certificate gets a
    new certificate (a first start that stopped half-way); a certificate without its key
    is an error, since it cannot be used and must not be overwritten.
    """
    if cert.exists():
        if not key.exists():
            raise InvalidConfig(f"tls: {cert} exists but its key {key} does not")
        certificate = _load_cert(cert)
        _check_pair(certificate, _load_key(key), cert, key)
        return fingerprint_der(certificate.public_bytes(serialization.Encoding.DER))
    if key.exists():
        private_key = _load_key(key)
    else:
        private_key = ec.generate_private_key(ec.SECP256R1())
        pem = private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        key.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(key, pem, mode=0o600)
    certificate = self_signed(private_key, hostnames)
    cert.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cert, certificate.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return fingerprint_der(certificate.public_bytes(serialization.Encoding.DER))


def self_signed(private_key: SigningKey, hostnames: list[str]) -> x509.Certificate:
    """A server certificate for ``hostnames`` and the loopback addresses, valid 10 years."""
    if not hostnames:
        raise InvalidArgument("hostnames", "must name at least one host")
    names = [_general_name(h) for h in [*hostnames, "localhost", *_LOOPBACK]]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])])
    public_key = private_key.public_key()
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(list(dict.fromkeys(names))), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False
        )
    )
    return builder.sign(private_key, hashes.SHA256())


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        ascii_name = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise InvalidArgument("hostnames", f"{host!r} is not a host name") from None
    if not ascii_name or any(c.isspace() or c == "/" for c in ascii_name):
        raise InvalidArgument("hostnames", f"{host!r} is not a host name")
    return x509.DNSName(ascii_name)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidConfig(f"tls: cannot read {what} {path}: {exc.strerror}") from exc


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path, "certificate"))
    except ValueError:
        raise InvalidConfig(f"tls: {path} is not a PEM certificate") from None


def _load_key(path: Path) -> SigningKey:
    try:
        key = serialization.load_pem_private_key(_read(path, "key"), password=None)
    except TypeError:
        raise InvalidConfig(f"tls: {path} is encrypted; give an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise InvalidConfig(f"tls: {path} is not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise InvalidConfig(f"tls: {path}: only EC and RSA keys are supported")
    return key


def _check_pair(certificate: x509.Certificate, key: SigningKey, cert: Path, key_path: Path) -> None:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if certificate.public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
        raise InvalidConfig(f"tls: {key_path} is not the key of {cert}")
