"""NoCloud seeds: the ISO 9660 image labelled ``cidata`` that cloud-init reads at boot.

``seed_files`` turns a ``Customization`` into the seed's three files; ``write_seed``
writes them into an ISO image, atomically. The service attaches the image to the VM
(a read-only disk or the CD-ROM), the way ESXi, Proxmox VE and libvirt deployments do.

Every document is JSON. JSON is YAML (1.2, and the subset of 1.1 PyYAML reads, which is
what cloud-init parses with), and ``json.dumps`` quotes every string: a host name such as
``no`` or ``1e5``, or a key comment holding ``: `` or ``#``, needs no YAML quoting rules
of our own to stay a string. Printed one value a line, it is also easy for the
quick-start appliance to read with busybox.
"""

from __future__ import annotations

import errno
import io
import json
import re
from pathlib import Path
from typing import Any

import pycdlib
from pycdlib.pycdlibexception import PyCdlibException

from thinvisor.errors import ImageError, InsufficientResources, InvalidArgument
from thinvisor.fs import atomic_write_with
from thinvisor.model.customization import Customization, NetworkCustomization

VOLUME_ID = "cidata"
META_DATA = "meta-data"
USER_DATA = "user-data"
NETWORK_CONFIG = "network-config"
USER_DATA_HEADER = b"#cloud-config\n"
INTERFACE = "eth0"
SEED_MODE = 0o644
INSTANCE_ID_MAX = 255
_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_FILE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def seed_files(custom: Customization, *, instance_id: str, macs: list[str]) -> dict[str, bytes]:
    """The files of a NoCloud seed: ``meta-data``, ``user-data`` and, when ``custom``
    configures the network, ``network-config`` (for the NIC whose MAC is ``macs[0]``).

    ``instance_id`` tells cloud-init whether this is a new instance: give a new one for
    every deployment (the VM's UUID does). Pure: no I/O.
    """
    _check_instance_id(instance_id)
    files = {
        META_DATA: _document(meta_data(custom, instance_id)),
        USER_DATA: USER_DATA_HEADER + _document(user_data(custom)),
    }
    if custom.network is not None:
        files[NETWORK_CONFIG] = _document(network_config(custom.network, _first_mac(macs)))
    return files


def meta_data(custom: Customization, instance_id: str) -> dict[str, Any]:
    """NoCloud's meta-data: the instance id and the host name as given (maybe an FQDN)."""
    data: dict[str, Any] = {"instance-id": instance_id}
    if custom.hostname is not None:
        data["local-hostname"] = custom.hostname
    return data


def user_data(custom: Customization) -> dict[str, Any]:
    """The cloud-config: host name, /etc/hosts, authorized keys.

    cloud-init sets the system's host name to ``hostname`` and takes ``fqdn`` for
    /etc/hosts; a dotted name is split into both as cloud-init itself would. Proxmox VE
    also asks for ``manage_etc_hosts`` so that the template's old name does not linger in
    /etc/hosts (sudo complains about a host name it cannot resolve).
    """
    data: dict[str, Any] = {}
    if custom.hostname is not None:
        short, dot, _ = custom.hostname.partition(".")
        data["hostname"] = short
        if dot:
            data["fqdn"] = custom.hostname
        data["manage_etc_hosts"] = True
    if custom.ssh_authorized_keys:
        data["ssh_authorized_keys"] = list(custom.ssh_authorized_keys)
    return data


def network_config(network: NetworkCustomization, mac: str) -> dict[str, Any]:
    """Network config version 2 for the NIC with ``mac``, named ``eth0`` in the guest.

    The default route is a ``routes`` entry: cloud-init documents ``gateway4`` as
    deprecated (netplan warns about it). Its destination is ``0.0.0.0/0`` rather than
    ``default``: cloud-init before 25.3 rejects ``default`` for every renderer but netplan
    (ifupdown on Debian 12, sysconfig on RHEL), and every version reads ``0.0.0.0/0``.
    """
    nic: dict[str, Any] = {"match": {"macaddress": mac}, "set-name": INTERFACE}
    if network.address is None:
        nic["dhcp4"] = True
    else:
        nic["dhcp4"] = False
        nic["addresses"] = [network.address]
        if network.gateway is not None:
            nic["routes"] = [{"to": "0.0.0.0/0", "via": network.gateway}]
    if network.dns:
        nic["nameservers"] = {"addresses": list(network.dns)}
    return {"version": 2, "ethernets": {INTERFACE: nic}}


def _document(data: dict[str, Any]) -> bytes:
    # Customization rejects the characters YAML would read differently from JSON (control
    # characters, line and paragraph separators), so UTF-8 can stay unescaped.
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode()


def _check_instance_id(instance_id: str) -> None:
    if not instance_id or len(instance_id) > INSTANCE_ID_MAX:
        raise InvalidArgument("instance_id", f"must be 1 to {INSTANCE_ID_MAX} characters")
    if not instance_id.isprintable() or not instance_id.isascii() or " " in instance_id:
        raise InvalidArgument("instance_id", "must be printable ASCII without spaces")


def _first_mac(macs: list[str]) -> str:
    if not macs:
        raise InvalidArgument("customization.network", "the VM has no NIC to configure")
    mac = macs[0].lower()
    if not _MAC_RE.fullmatch(mac):
        raise InvalidArgument("nics", f"{macs[0]!r} is not a MAC address")
    return mac


def write_seed(files: dict[str, bytes], dest: Path) -> None:
    """Write ``files`` as a NoCloud seed ISO at ``dest``, replacing it if it exists.

    Volume identifier ``cidata``; Rock Ridge and Joliet give the guest the files' real
    (lower-case) names. Written to a hidden file next to ``dest``, fsynced and renamed:
    on any failure nothing is left behind and an older ``dest`` is untouched. Blocking:
    call it in a worker thread.
    """
    names = _iso_names(files)
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=1, vol_ident=VOLUME_ID, joliet=3, rock_ridge="1.09")
    try:
        for name, data in sorted(files.items()):
            iso.add_fp(
                io.BytesIO(data),
                len(data),
                iso_path=f"/{names[name]}.;1",
                rr_name=name,
                joliet_path=f"/{name}",
            )
        _write_atomically(iso, dest)
    except PyCdlibException as exc:
        raise ImageError(f"cidata seed {dest.name}: {exc}") from exc
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientResources(f"no space for the cidata seed {dest}") from exc
        raise
    finally:
        iso.close()


def _iso_names(files: dict[str, bytes]) -> dict[str, str]:
    """An ISO 9660 level 1 name (8 upper-case characters, no extension) for each file."""
    names: dict[str, str] = {}
    for name in sorted(files):
        if not _FILE_NAME_RE.fullmatch(name):
            raise InvalidArgument(
                "files", f"{name!r} must be 1 to 64 letters, digits, '.', '_' or '-'"
            )
        stem = re.sub(r"[^A-Z0-9_]", "_", name.upper())[:8]
        candidate, n = stem, 0
        while candidate in names.values():
            n += 1
            candidate = f"{stem[:5]}{n:03d}"
        names[name] = candidate
    return names


def _write_atomically(iso: pycdlib.PyCdlib, dest: Path) -> None:
    atomic_write_with(dest, iso.write_fp, SEED_MODE)
