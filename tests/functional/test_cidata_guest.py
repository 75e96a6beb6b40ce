"""Guest customization on real QEMU: the appliance applies a NoCloud seed at boot."""

from __future__ import annotations

import base64
import struct
from pathlib import Path
from typing import Any

import pytest

from thinvisor.model.customization import Customization
from thinvisor.storage.cidata import seed_files, write_seed

from .hostenv import TestHost

pytestmark = pytest.mark.functional

MAC = "02:74:76:00:00:01"
NIC = {"name": "net0", "mac": MAC, "network": "user"}
# A comment that YAML would misread unquoted, and that the appliance must copy exactly.
KEY_COMMENT = 'ops "team": #1'


def ssh_key(comment: str) -> str:
    blob = struct.pack(">I", 11) + b"ssh-ed25519" + struct.pack(">I", 32) + bytes(range(32))
    return f"ssh-ed25519 {base64.b64encode(blob).decode()} {comment}"


def guest(host: TestHost, name: str, command: str, timeout: float = 60) -> tuple[int, str]:
    return host.guest(name, command, timeout)


def make_seed(host: TestHost, custom: dict[str, Any], name: str = "seed.iso") -> Path:
    """A seed ISO in the host's datastore, as a deployment would write it."""
    files = seed_files(Customization.model_validate(custom), instance_id=f"iid-{name}", macs=[MAC])
    path = host.datastore / name
    write_seed(files, path)
    return path


def static_seed(host: TestHost) -> tuple[Path, str]:
    key = ssh_key(KEY_COMMENT)
    seed = make_seed(
        host,
        {
            "hostname": "web01.example.test",
            "ssh_authorized_keys": [key],
            "network": {"address": "10.0.2.50/24", "gateway": "10.0.2.2", "dns": ["10.0.2.3"]},
        },
    )
    return seed, key


def wait_for_lease(host: TestHost, name: str) -> str:
    """eth0's addresses once udhcpc has a lease (slirp always offers 10.0.2.15)."""
    wait = (
        "i=0; while [ $i -lt 600 ] && ! ip -4 addr show dev eth0 | grep -q 'inet '; do "
        "sleep 0.2; i=$((i + 1)); done; ip -4 addr show dev eth0"
    )
    return guest(host, name, wait, timeout=180)[1]


def check_static_guest(host: TestHost, name: str, key: str) -> None:
    assert guest(host, name, "hostname") == (0, "web01\n")
    assert guest(host, name, "cat /etc/hostname") == (0, "web01\n")
    status, hosts = guest(host, name, "cat /etc/hosts")
    assert status == 0
    assert "127.0.1.1\tweb01.example.test web01" in hosts
    assert guest(host, name, "cat /root/.ssh/authorized_keys") == (0, key + "\n")
    modes = "stat -c '%a %n' /root/.ssh /root/.ssh/authorized_keys"
    assert guest(host, name, modes) == (0, "700 /root/.ssh\n600 /root/.ssh/authorized_keys\n")
    status, addr = guest(host, name, "ip -4 addr show eth0")
    assert status == 0 and "inet 10.0.2.50/24 " in addr
    routes = guest(host, name, "ip -4 route show default")[1]
    assert routes.split()[:3] == ["default", "via", "10.0.2.2"]
    assert guest(host, name, "cat /etc/resolv.conf") == (0, "nameserver 10.0.2.3\n")
    # A static address means no DHCP client, which would flush it.
    assert guest(host, name, "pidof udhcpc")[0] != 0


def test_seed_on_a_read_only_disk_customizes_the_guest(host: TestHost) -> None:
    seed, key = static_seed(host)
    disk = {"name": "cidata", "path": str(seed), "format": "raw", "readonly": True}
    host.create("vm1", disks=[disk], nics=[NIC])
    log = host.wait_ready("vm1")
    assert b"appliance: cidata found on /dev/vda" in log
    assert b"appliance: cidata applied: hostname=web01 " in log
    check_static_guest(host, "vm1", key)
    status, mounts = guest(host, "vm1", "grep ' /run/cidata ' /proc/mounts")
    assert status == 0
    assert mounts.split()[:3] == ["/dev/vda", "/run/cidata", "iso9660"]
    assert " ro," in mounts


def test_without_a_seed_the_guest_is_the_appliance_on_dhcp(host: TestHost) -> None:
    host.create("vm1", nics=[NIC])
    log = host.wait_ready("vm1")
    assert b"cidata" not in log
    assert guest(host, "vm1", "hostname") == (0, "appliance\n")
    assert "inet 10.0.2.15/24 " in wait_for_lease(host, "vm1")
    status, _ = guest(host, "vm1", "test -e /root/.ssh/authorized_keys")
    assert status == 1
    cmdline = "tr '\\0' ' ' </proc/$(pidof udhcpc)/cmdline"
    assert "hostname:appliance" in guest(host, "vm1", cmdline)[1]


def test_seed_in_the_cdrom_drive_customizes_the_guest(host: TestHost) -> None:
    seed, key = static_seed(host)
    host.create("vm1", cdrom={"bus": "scsi", "path": str(seed)}, nics=[NIC])
    log = host.wait_ready("vm1")
    assert b"appliance: cidata found on /dev/sr0" in log
    check_static_guest(host, "vm1", key)


def test_seed_with_dhcp_names_the_guest_and_its_dhcp_requests(host: TestHost) -> None:
    seed = make_seed(host, {"hostname": "db7", "network": {}})
    disk = {"name": "cidata", "path": str(seed), "format": "raw", "readonly": True}
    host.create("vm1", disks=[disk], nics=[NIC])
    log = host.wait_ready("vm1")
    assert b"appliance: cidata applied: hostname=db7 ssh-keys=0 network=dhcp" in log
    assert guest(host, "vm1", "hostname") == (0, "db7\n")
    assert "inet 10.0.2.15/24 " in wait_for_lease(host, "vm1")
    cmdline = "tr '\\0' ' ' </proc/$(pidof udhcpc)/cmdline"
    assert "hostname:db7" in guest(host, "vm1", cmdline)[1]
    assert guest(host, "vm1", "test -e /root/.ssh/authorized_keys")[0] == 1


def test_hand_written_yaml_seed_is_applied_too(host: TestHost) -> None:
    """A seed as operators write it for cloud-localds: YAML, interface matched by name."""
    files = {
        "meta-data": b"instance-id: iid-local01\nlocal-hostname: 'files01.lab.test'\n",
        "user-data": b"#cloud-config\nssh_authorized_keys:\n  - " + ssh_key("ops").encode() + b"\n",
        "network-config": (
            b"network:\n  version: 2\n  ethernets:\n    eth0:\n"
            b"      addresses: [192.168.77.10/24]\n      gateway4: 192.168.77.1\n"
            b"      nameservers:\n        addresses: [192.168.77.2, 192.168.77.3]\n"
        ),
    }
    seed = host.datastore / "handmade.iso"
    write_seed(files, seed)
    disk = {"name": "cidata", "path": str(seed), "format": "raw", "readonly": True}
    host.create("vm1", disks=[disk], nics=[NIC])
    log = host.wait_ready("vm1")
    assert b"appliance: cidata applied: hostname=files01 ssh-keys=1 network=static" in log
    assert guest(host, "vm1", "hostname") == (0, "files01\n")
    assert guest(host, "vm1", "cat /root/.ssh/authorized_keys") == (0, ssh_key("ops") + "\n")
    assert "inet 192.168.77.10/24 " in guest(host, "vm1", "ip -4 addr show eth0")[1]
    routes = guest(host, "vm1", "ip -4 route show default")[1]
    assert routes.split()[:3] == ["default", "via", "192.168.77.1"]
    assert guest(host, "vm1", "cat /etc/resolv.conf") == (
        0,
        "nameserver 192.168.77.2\nnameserver 192.168.77.3\n",
    )
