"""Guest customization: what a VM deployed from a template is told about itself.

Pure data, no I/O. thinvisor hands it to the guest as a NoCloud seed (see
``thinvisor.storage.cidata``), the way cloud-init expects it. Every value is checked
here, so that what reaches the guest is well formed.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import struct
import unicodedata
from typing import Annotated, Self

from pydantic import AfterValidator, Field, field_validator, model_validator

from thinvisor.model.base import StrictModel

HOSTNAME_MAX = 253
LABEL_MAX = 63
DNS_MAX = 3  # the resolver uses no more (MAXNS in resolv.conf(5))
KEYS_MAX = 100
KEY_LINE_MAX = 16384
_UNPRINTABLE = frozenset({"Cc", "Cs", "Zl", "Zp"})
_LABEL_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?")
# The key types sshd accepts in authorized_keys (not ssh-dss: OpenSSH dropped DSA).
SSH_KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)


def check_hostname(value: str) -> str:
    """An RFC 1123 host name (a short name or a fully qualified one); ``ValueError`` else."""
    if not value:
        raise ValueError("must not be empty")
    if len(value) > HOSTNAME_MAX:
        raise ValueError(f"must be at most {HOSTNAME_MAX} characters")
    if _is_ip_address(value):
        raise ValueError("must be a name, not an IP address")
    for label in value.split("."):
        if not label:
            raise ValueError("must not have an empty label (a leading, trailing or double '.')")
        if len(label) > LABEL_MAX:
            raise ValueError(f"label {label[:16]!r}... is longer than {LABEL_MAX} characters")
        if not _LABEL_RE.fullmatch(label):
            raise ValueError(
                f"label {label!r} may contain only letters, digits and '-', "
                "and must not start or end with '-'"
            )
    return value


def _is_ip_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _printable(char: str) -> bool:
    # Control characters, and what YAML reads as a line break (NEL is a C1 control).
    return unicodedata.category(char) not in _UNPRINTABLE and char not in "\ufffe\uffff"


def _key_blob_type(blob: bytes) -> str | None:
    """The key type a public key blob names in its first field (SSH wire format)."""
    if len(blob) < 4:
        return None
    (size,) = struct.unpack(">I", blob[:4])
    if size > len(blob) - 4:
        return None
    return blob[4 : 4 + size].decode("ascii", errors="replace")


def check_ssh_public_key(value: str) -> str:
    """One OpenSSH public key line: ``<type> <base64> [comment]``; ``ValueError`` else."""
    # A tab is a separator as good as a space; keep the line printable otherwise.
    line = value.replace("\t", " ").strip()
    if not line:
        raise ValueError("must not be empty")
    if len(line) > KEY_LINE_MAX:
        raise ValueError(f"must be at most {KEY_LINE_MAX} characters")
    if not all(_printable(c) for c in line):
        raise ValueError("must be one line of printable characters")
    fields = line.split(None, 2)
    kind = fields[0]
    if kind not in SSH_KEY_TYPES:
        raise ValueError(
            f"key type {kind[:40]!r} is not one of {', '.join(sorted(SSH_KEY_TYPES))} "
            "(options before the key type are not supported)"
        )
    if len(fields) < 2:
        raise ValueError("has no key data after the key type")
    try:
        blob = base64.b64decode(fields[1], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("key data is not valid base64") from None
    if _key_blob_type(blob) != kind:
        raise ValueError(f"key data is not a {kind} key")
    return " ".join(fields)


def _ipv4_interface(value: str) -> str:
    if "/" not in value:
        raise ValueError("must have a prefix length, like 10.0.0.5/24")
    try:
        iface = ipaddress.IPv4Interface(value)
    except ValueError as exc:
        raise ValueError(f"is not an IPv4 address with a prefix length: {exc}") from None
    net = iface.network
    if net.prefixlen < 31 and iface.ip in (net.network_address, net.broadcast_address):
        kind = "network" if iface.ip == net.network_address else "broadcast"
        raise ValueError(f"{iface.ip} is the {kind} address of {net}, not a host's")
    if iface.ip.is_loopback or iface.ip.is_multicast or iface.ip.is_unspecified:
        raise ValueError(f"{iface.ip} cannot be a host's address")
    return iface.with_prefixlen


def _ipv4_address(value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError as exc:
        raise ValueError(f"is not an IPv4 address: {exc}") from None


def _ip_address(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 or IPv6 address") from None


Hostname = Annotated[str, AfterValidator(check_hostname)]
SshPublicKey = Annotated[str, AfterValidator(check_ssh_public_key)]


class NetworkCustomization(StrictModel):
    """The guest's first NIC: a static IPv4 address, or DHCP when ``address`` is None."""

    address: Annotated[str, AfterValidator(_ipv4_interface)] | None = Field(
        default=None, description="IPv4 address with prefix length, like 10.0.0.5/24"
    )
    gateway: Annotated[str, AfterValidator(_ipv4_address)] | None = None
    dns: list[Annotated[str, AfterValidator(_ip_address)]] = Field(default_factory=list)

    @field_validator("dns")
    @classmethod
    def _dns(cls, value: list[str]) -> list[str]:
        if len(value) > DNS_MAX:
            raise ValueError(f"at most {DNS_MAX} DNS servers (the resolver uses no more)")
        if len(set(value)) != len(value):
            raise ValueError("must not repeat a server")
        return value

    @model_validator(mode="after")
    def _gateway(self) -> Self:
        if self.gateway is None:
            return self
        if self.address is None:
            raise ValueError("a gateway needs a static address (with DHCP the lease gives one)")
        iface = ipaddress.IPv4Interface(self.address)
        gateway = ipaddress.IPv4Address(self.gateway)
        if gateway not in iface.network:
            raise ValueError(f"gateway {gateway} is outside the address's network {iface.network}")
        if gateway == iface.ip:
            raise ValueError(f"gateway {gateway} is the guest's own address")
        return self


class Customization(StrictModel):
    """What the guest is told on its first boot (cloud-init's NoCloud data source)."""

    hostname: Hostname | None = Field(
        default=None, description="a short name or a fully qualified one (RFC 1123)"
    )
    ssh_authorized_keys: list[SshPublicKey] = Field(default_factory=list)
    network: NetworkCustomization | None = None

    @field_validator("ssh_authorized_keys")
    @classmethod
    def _keys(cls, value: list[str]) -> list[str]:
        if len(value) > KEYS_MAX:
            raise ValueError(f"at most {KEYS_MAX} keys")
        return value
