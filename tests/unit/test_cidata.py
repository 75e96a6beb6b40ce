"""Guest customization: its validation, the NoCloud seed's files, and the seed ISO."""

from __future__ import annotations

import base64
import errno
import io
import json
import re
import shutil
import struct
import subprocess
from importlib import resources
from pathlib import Path
from typing import Any

import pycdlib
import pytest
import yaml
from pydantic import ValidationError

from thinvisor import fs
from thinvisor.errors import ImageError, InsufficientResources, InvalidArgument
from thinvisor.model.customization import Customization, NetworkCustomization
from thinvisor.model.vm import invalid_argument
from thinvisor.storage import cidata
from thinvisor.storage.cidata import seed_files, write_seed

MAC = "02:74:76:00:00:01"


def ssh_key(kind: str = "ssh-ed25519", comment: str = "alice@example", blob_kind: str = "") -> str:
    """A public key line whose blob names ``blob_kind`` (``kind`` unless given)."""
    name = (blob_kind or kind).encode()
    blob = struct.pack(">I", len(name)) + name + struct.pack(">I", 32) + bytes(range(32))
    return f"{kind} {base64.b64encode(blob).decode()} {comment}".strip()


def problem(model: Any, data: dict[str, Any]) -> InvalidArgument:
    """The InvalidArgument the service makes of ``data``'s first validation error."""
    with pytest.raises(ValidationError) as caught:
        model.model_validate(data)
    return invalid_argument(caught.value)


def static(**fields: Any) -> Customization:
    network = {"address": "10.0.2.50/24", "gateway": "10.0.2.2", "dns": ["10.0.2.3"]}
    return Customization.model_validate(
        {
            "hostname": "web01.example.test",
            "ssh_authorized_keys": [ssh_key()],
            "network": network,
            **fields,
        }
    )


def yaml_of(document: bytes) -> Any:
    """What cloud-init sees: it reads every seed file with PyYAML's safe loader."""
    return yaml.safe_load(document.decode())


# --- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["web01", "a", "web-01.example.test", "A" * 63, ".".join(["a" * 63] * 3 + ["b" * 61])]
)
def test_good_hostnames(name: str) -> None:
    assert Customization(hostname=name).hostname == name


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "must not be empty"),
        ("-web", "must not start or end with '-'"),
        ("web-", "must not start or end with '-'"),
        ("we_b", "may contain only letters, digits and '-'"),
        ("web 01", "may contain only letters, digits and '-'"),
        ("a" * 64, "longer than 63 characters"),
        (".".join(["a" * 63] * 4), "at most 253 characters"),
        ("web..example", "empty label"),
        ("web.", "empty label"),
        ("10.0.0.5", "not an IP address"),
        ("web01\n", "may contain only letters, digits and '-'"),
    ],
)
def test_bad_hostnames_name_the_reason(name: str, reason: str) -> None:
    error = problem(Customization, {"hostname": name})
    assert error.field == "hostname"
    assert reason in error.reason


@pytest.mark.parametrize(
    "kind",
    [
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    ],
)
def test_known_key_types_are_accepted(kind: str) -> None:
    key = ssh_key(kind)
    assert Customization(ssh_authorized_keys=[key]).ssh_authorized_keys == [key]


def test_a_key_without_comment_and_with_stray_blanks_is_accepted_and_tidied() -> None:
    bare = ssh_key(comment="")
    kind, data = bare.split()
    assert Customization(ssh_authorized_keys=[f"  {kind}\t{data}\n"]).ssh_authorized_keys == [bare]


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("", "must not be empty"),
        (ssh_key("ssh-foo"), "key type 'ssh-foo' is not one of"),
        ('from="10.0.0.1" ' + ssh_key(), "options before the key type are not supported"),
        ("ssh-ed25519", "no key data"),
        ("ssh-ed25519 not*base64 x", "not valid base64"),
        ("ssh-ed25519 AAAA", "is not a ssh-ed25519 key"),
        (ssh_key("ssh-rsa", blob_kind="ssh-ed25519"), "is not a ssh-rsa key"),
        (ssh_key() + "\n" + ssh_key(), "one line of printable characters"),
        (ssh_key(comment="a\x00b"), "one line of printable characters"),
        (ssh_key(comment="a\u2028b"), "one line of printable characters"),
    ],
)
def test_bad_keys_name_the_reason(key: str, reason: str) -> None:
    error = problem(Customization, {"ssh_authorized_keys": [ssh_key(), key]})
    assert error.field == "ssh_authorized_keys.1"
    assert reason in error.reason


def test_network_values_are_normalized() -> None:
    network = NetworkCustomization(
        address="10.0.0.5/255.255.255.0", gateway="10.0.0.1", dns=["2001:DB8::1", "10.0.0.2"]
    )
    assert network.address == "10.0.0.5/24"
    assert network.dns == ["2001:db8::1", "10.0.0.2"]
    assert NetworkCustomization().address is None  # DHCP


@pytest.mark.parametrize(
    ("data", "field", "reason"),
    [
        ({"address": "10.0.0.5"}, "network.address", "must have a prefix length"),
        ({"address": "10.0.0.300/24"}, "network.address", "is not an IPv4 address"),
        ({"address": "2001:db8::5/64"}, "network.address", "is not an IPv4 address"),
        ({"address": "10.0.0.0/24"}, "network.address", "network address of 10.0.0.0/24"),
        ({"address": "10.0.0.255/24"}, "network.address", "broadcast address"),
        ({"address": "127.0.0.5/8"}, "network.address", "cannot be a host's address"),
        ({"address": "10.0.0.5/24", "gateway": "10.0.1.1"}, "network", "outside the address's"),
        ({"address": "10.0.0.5/24", "gateway": "10.0.0.5"}, "network", "the guest's own"),
        ({"gateway": "10.0.0.1"}, "network", "a gateway needs a static address"),
        ({"address": "10.0.0.5/24", "gateway": "x"}, "network.gateway", "not an IPv4"),
        ({"dns": ["10.0.0.1", "dns.example"]}, "network.dns.1", "not an IPv4 or IPv6 address"),
        ({"dns": ["10.0.0.1", "10.0.0.1"]}, "network.dns", "must not repeat"),
        ({"dns": ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]}, "network.dns", "at most 3"),
        ({"mtu": 1500}, "network.mtu", "unknown field"),
    ],
)
def test_bad_network_values_name_field_and_reason(
    data: dict[str, Any], field: str, reason: str
) -> None:
    error = problem(Customization, {"network": data})
    assert (error.field, reason in error.reason) == (field, True), error


def test_unknown_fields_are_refused() -> None:
    assert problem(Customization, {"password": "x"}).field == "password"


# --- seed files ---------------------------------------------------------------------------


def test_seed_files_hold_what_cloud_init_expects() -> None:
    files = seed_files(static(), instance_id="iid-4f2a", macs=[MAC.upper(), "02:00:00:00:00:09"])
    assert sorted(files) == ["meta-data", "network-config", "user-data"]
    assert files["user-data"].startswith(b"#cloud-config\n")
    assert yaml_of(files["meta-data"]) == {
        "instance-id": "iid-4f2a",
        "local-hostname": "web01.example.test",
    }
    assert yaml_of(files["user-data"]) == {
        "hostname": "web01",
        "fqdn": "web01.example.test",
        "manage_etc_hosts": True,
        "ssh_authorized_keys": [ssh_key()],
    }
    assert yaml_of(files["network-config"]) == {
        "version": 2,
        "ethernets": {
            "eth0": {
                "match": {"macaddress": MAC},
                "set-name": "eth0",
                "dhcp4": False,
                "addresses": ["10.0.2.50/24"],
                "routes": [{"to": "0.0.0.0/0", "via": "10.0.2.2"}],
                "nameservers": {"addresses": ["10.0.2.3"]},
            }
        },
    }


def test_every_document_is_json_too() -> None:
    files = seed_files(static(), instance_id="iid-1", macs=[MAC])
    for name, data in files.items():
        body = data.removeprefix(b"#cloud-config\n")
        assert json.loads(body) == yaml_of(data), name


def test_a_short_hostname_has_no_fqdn() -> None:
    files = seed_files(Customization(hostname="web01"), instance_id="i-1", macs=[])
    assert yaml_of(files["user-data"]) == {"hostname": "web01", "manage_etc_hosts": True}
    assert yaml_of(files["meta-data"])["local-hostname"] == "web01"
    assert "network-config" not in files  # cloud-init's own default: DHCP on the first NIC


def test_nothing_customized_gives_a_bare_seed() -> None:
    files = seed_files(Customization(), instance_id="i-1", macs=[MAC])
    assert yaml_of(files["meta-data"]) == {"instance-id": "i-1"}
    assert files["user-data"] == b"#cloud-config\n{}\n"


def test_dhcp_network_config() -> None:
    custom = Customization(network=NetworkCustomization(dns=["1.1.1.1"]))
    files = seed_files(custom, instance_id="i-1", macs=[MAC])
    assert yaml_of(files["network-config"])["ethernets"]["eth0"] == {
        "match": {"macaddress": MAC},
        "set-name": "eth0",
        "dhcp4": True,
        "nameservers": {"addresses": ["1.1.1.1"]},
    }


def test_static_address_without_gateway_has_no_routes() -> None:
    custom = Customization(network=NetworkCustomization(address="192.168.7.9/24"))
    nic = yaml_of(seed_files(custom, instance_id="i-1", macs=[MAC])["network-config"])
    assert "routes" not in nic["ethernets"]["eth0"]
    assert "nameservers" not in nic["ethernets"]["eth0"]


@pytest.mark.parametrize("name", ["no", "on", "123", "1e5", "null"])
def test_hostnames_yaml_would_retype_stay_strings(name: str) -> None:
    files = seed_files(Customization(hostname=name), instance_id="i-1", macs=[])
    assert yaml_of(files["user-data"])["hostname"] == name
    assert yaml_of(files["meta-data"])["local-hostname"] == name


def test_key_comments_survive_whatever_they_hold() -> None:
    key = ssh_key(comment='ops "team": #1 \\ josé 🔑')
    files = seed_files(Customization(ssh_authorized_keys=[key]), instance_id="i-1", macs=[])
    assert yaml_of(files["user-data"])["ssh_authorized_keys"] == [key]


@pytest.mark.parametrize("mac", ["02:74:76:00:00", f"{MAC}\n", "not a mac"])
def test_a_bad_mac_is_refused(mac: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        seed_files(static(), instance_id="i-1", macs=[mac])
    assert caught.value.field == "nics"


def test_network_without_a_nic_is_refused() -> None:
    with pytest.raises(InvalidArgument) as caught:
        seed_files(static(), instance_id="i-1", macs=[])
    assert caught.value.field == "customization.network"


@pytest.mark.parametrize("instance_id", ["", "with space", "tab\tbed", "x" * 256, "é"])
def test_bad_instance_ids_are_refused(instance_id: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        seed_files(Customization(), instance_id=instance_id, macs=[])
    assert caught.value.field == "instance_id"


# --- the seed ISO -------------------------------------------------------------------------


def read_iso(path: Path) -> dict[str, Any]:
    """Volume identifier, and file names and contents as Rock Ridge and Joliet give them."""
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        found: dict[str, Any] = {"volume": iso.pvd.volume_identifier.decode().rstrip()}
        facades = {"rr": iso.get_rock_ridge_facade(), "j": iso.get_joliet_facade()}
        for key, facade in facades.items():
            files = {}
            for child in facade.list_children("/"):
                if child.is_dot() or child.is_dotdot():
                    continue
                name = iso.full_path_from_dirrecord(child, rockridge=key == "rr")
                out = io.BytesIO()
                facade.get_file_from_iso_fp(out, name)
                files[name.lstrip("/")] = out.getvalue()
            found[key] = files
        found["joliet_volume"] = iso.joliet_vd.volume_identifier.decode("utf-16-be").rstrip()
        return found
    finally:
        iso.close()


def test_write_seed_makes_a_cidata_iso_with_the_real_names(tmp_path: Path) -> None:
    files = seed_files(static(), instance_id="iid-1", macs=[MAC])
    dest = tmp_path / "seed.iso"
    write_seed(files, dest)
    found = read_iso(dest)
    assert found["volume"] == "cidata"
    assert found["joliet_volume"] == "cidata"
    assert found["rr"] == files
    assert found["j"] == files
    assert oct(dest.stat().st_mode & 0o777) == oct(0o644)
    assert [p.name for p in tmp_path.iterdir()] == ["seed.iso"]


def test_the_volume_label_is_what_blkid_sees(tmp_path: Path) -> None:
    blkid = shutil.which("blkid") or "/usr/sbin/blkid"
    dest = tmp_path / "seed.iso"
    write_seed(seed_files(Customization(), instance_id="i-1", macs=[]), dest)
    out = subprocess.run(
        [blkid, "-o", "export", str(dest)], capture_output=True, text=True, check=True
    ).stdout
    assert "LABEL=cidata" in out.splitlines()
    assert "TYPE=iso9660" in out.splitlines()


def test_write_seed_replaces_an_older_seed(tmp_path: Path) -> None:
    dest = tmp_path / "seed.iso"
    write_seed(seed_files(Customization(hostname="old"), instance_id="i-1", macs=[]), dest)
    new = seed_files(Customization(hostname="new"), instance_id="i-2", macs=[])
    write_seed(new, dest)
    assert read_iso(dest)["rr"] == new


def test_a_failed_write_leaves_nothing_and_keeps_the_old_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "seed.iso"
    old = seed_files(Customization(hostname="old"), instance_id="i-1", macs=[])
    write_seed(old, dest)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fs.os, "fsync", full)
    with pytest.raises(InsufficientResources):
        write_seed(seed_files(Customization(hostname="new"), instance_id="i-2", macs=[]), dest)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["seed.iso"]
    assert read_iso(dest)["rr"] == old


def test_writing_over_a_directory_fails_and_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "seed.iso"
    dest.mkdir()
    with pytest.raises(OSError):
        write_seed({"meta-data": b"{}\n"}, dest)
    assert [p.name for p in tmp_path.iterdir()] == ["seed.iso"]
    assert dest.is_dir()


@pytest.mark.parametrize("name", ["", "../meta-data", "a/b", "x" * 65, ".hidden", "meta-data\n"])
def test_bad_file_names_are_refused_before_writing(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidArgument):
        write_seed({name: b""}, tmp_path / "seed.iso")
    assert list(tmp_path.iterdir()) == []


def test_similar_names_get_distinct_iso_names(tmp_path: Path) -> None:
    files = {"user-data": b"1", "user_data": b"2", "user-data2": b"3"}
    write_seed(files, tmp_path / "seed.iso")
    assert read_iso(tmp_path / "seed.iso")["rr"] == files


def test_pycdlib_failures_become_image_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise cidata.PyCdlibException("broken")

    monkeypatch.setattr(pycdlib.PyCdlib, "write_fp", broken)
    with pytest.raises(ImageError, match="broken"):
        write_seed({"meta-data": b"{}\n"}, tmp_path / "seed.iso")
    assert list(tmp_path.iterdir()) == []


# --- the appliance reads it ---------------------------------------------------------------

BUSYBOX = shutil.which("busybox")
needs_busybox = pytest.mark.skipif(BUSYBOX is None, reason="busybox is not installed")


def appliance_init() -> str:
    return resources.files("thinvisor.appliance").joinpath("files/init").read_text()


def flatten(document: bytes) -> list[str]:
    """The appliance init's own reader, run with busybox awk as in the guest."""
    match = re.search(r"^flatten='\n(.*?)^'$", appliance_init(), re.MULTILINE | re.DOTALL)
    assert match is not None
    assert BUSYBOX is not None
    done = subprocess.run(
        [BUSYBOX, "awk", match.group(1)], input=document, capture_output=True, check=True
    )
    return done.stdout.decode().splitlines()


@needs_busybox
def test_the_appliance_init_is_valid_shell() -> None:
    assert BUSYBOX is not None
    subprocess.run([BUSYBOX, "sh", "-n", "-c", appliance_init()], check=True)


@needs_busybox
def test_the_appliance_reads_the_seed_files() -> None:
    key = ssh_key(comment='ops "team": #1 \\ x')
    files = seed_files(static(ssh_authorized_keys=[key]), instance_id="iid-1", macs=[MAC])
    assert flatten(files["meta-data"]) == [
        "instance-id=iid-1",
        "local-hostname=web01.example.test",
    ]
    assert flatten(files["user-data"]) == [
        "hostname=web01",
        "fqdn=web01.example.test",
        "manage_etc_hosts=true",
        f"ssh_authorized_keys.0={key}",
    ]
    assert flatten(files["network-config"]) == [
        "version=2",
        f"ethernets.eth0.match.macaddress={MAC}",
        "ethernets.eth0.set-name=eth0",
        "ethernets.eth0.dhcp4=false",
        "ethernets.eth0.addresses.0=10.0.2.50/24",
        "ethernets.eth0.routes.0.to=0.0.0.0/0",
        "ethernets.eth0.routes.0.via=10.0.2.2",
        "ethernets.eth0.nameservers.addresses.0=10.0.2.3",
    ]


@needs_busybox
def test_the_appliance_reads_hand_written_yaml_seeds_too() -> None:
    user_data = b"""#cloud-config
hostname: 'web02'   # a comment
fqdn: "web02.example.org"
ssh_authorized_keys:
  - ssh-rsa AAAAB3Nza first@host
  - "ssh-ed25519 AAAAC3 second: with colon # kept"
write_files:
  - path: /x
    content: |
      skipped: yes
runcmd: [ls, "echo hi"]
"""
    assert flatten(user_data) == [
        "hostname=web02",
        "fqdn=web02.example.org",
        "ssh_authorized_keys.0=ssh-rsa AAAAB3Nza first@host",
        "ssh_authorized_keys.1=ssh-ed25519 AAAAC3 second: with colon # kept",
        "write_files.0.path=/x",
        "runcmd.0=ls",
        "runcmd.1=echo hi",
    ]
    network_config = b"""network:
  version: 2
  ethernets:
    id0:
      match: {macaddress: "02:74:76:00:00:01"}
      addresses: [10.0.0.5/24]
      routes:
      - via: 10.0.0.1
        to: default
"""
    assert flatten(network_config) == [
        "network.version=2",
        "network.ethernets.id0.match.macaddress=02:74:76:00:00:01",
        "network.ethernets.id0.addresses.0=10.0.0.5/24",
        "network.ethernets.id0.routes.0.via=10.0.0.1",
        "network.ethernets.id0.routes.0.to=default",
    ]


def test_the_appliance_has_the_applets_its_init_uses() -> None:
    from thinvisor.appliance._initramfs import APPLETS

    assert {"findfs", "awk", "sed", "grep", "uniq", "tr", "head", "cp", "chmod"} <= set(APPLETS)
