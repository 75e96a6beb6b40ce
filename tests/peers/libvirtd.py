"""libvirtd for tests: started once, shared by every test that needs it, stopped after.

``libvirt_daemon()`` starts ``virtlogd`` and ``libvirtd`` by hand (``bench.libvirt_host``
does the starting, and the removal of whatever the daemons leave behind) and adds what
the tests need on top: a directory storage pool of its own, a defined (never started)
libvirt network, and appliance domains with a small qcow2 disk in that pool (so that
internal snapshots work) and a VNC display on loopback, booting the quick-start
appliance of the functional tests' cache. Nested ``with libvirt_daemon()`` blocks share
one daemon: only one libvirtd can run on a machine, and several test modules use it.

When the last user leaves, every domain, pool and network that appeared while it ran is
destroyed and undefined, both daemons are ended by pid, and nothing is left under
libvirt's trees or in the cgroups.

Every test may ask for the session fixture ``libvirtd`` (``tests/conftest.py`` loads it
with ``tests.peers.peer_libvirt``), define an appliance domain with
``libvirtd.define_appliance(name)``, start it, and ``libvirtd.wait_ready(name)``.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bench.libvirt_host import URI, LibvirtHost, LibvirtVm

from thinvisor.appliance import build_appliance

CACHE_ENV = "THINVISOR_TEST_CACHE"  # the functional tests' appliance cache, shared
DEFAULT_TEST_CACHE = Path("/var/cache/thinvisor-test")
READY = re.compile(rb"THINVISOR-APPLIANCE-READY uptime=([0-9.]+)\r?\n")
APPLIANCE_MIB = 96
DISK_MIB = 16
READY_TIMEOUT_S = 120.0


def appliance_cache_dir() -> Path:
    """Where the test session builds the appliance (as ``tests/functional`` does)."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_TEST_CACHE)


class LibvirtDaemon:
    """A running libvirtd (``uri``) with a storage pool ``pool`` (directory ``pool_path``)
    and an inactive libvirt network ``network``; the domains defined here are in ``vms``
    by name."""

    def __init__(self) -> None:
        self.host = LibvirtHost(build_appliance(appliance_cache_dir()))
        self.uri = URI
        tag = secrets.token_hex(2)
        self.pool = f"tvtest-{tag}"
        self.network = f"tvtest-net-{tag}"
        self._bridge = f"tvtbr{tag}"
        self.pool_path = self.host.root / "pool"
        self._before: dict[str, set[str]] = {}

    @property
    def conn(self) -> Any:
        """The harness's own connection (libvirt.virConnect)."""
        return self.host.conn

    @property
    def vms(self) -> dict[str, LibvirtVm]:
        return self.host.vms

    def start(self) -> None:
        """Start the daemons, then add the pool and the network."""
        self.host.start()
        self.conn.getVersion()  # libvirtd probes QEMU on first use: here, not in a test
        self._before = self._objects()
        pool = self.conn.storagePoolDefineXML(_pool_xml(self.pool, self.pool_path))
        pool.build(0)
        pool.create(0)
        # Defined only: starting it would make a bridge on the machine. New domains may
        # name it; they cannot start with it.
        self.conn.networkDefineXML(
            f"<network><name>{self.network}</name><bridge name='{self._bridge}'/></network>"
        )

    def define_appliance(
        self, name: str, *, memory_mib: int = APPLIANCE_MIB, disk_mib: int = DISK_MIB
    ) -> LibvirtVm:
        """Define (not start) a domain booting the appliance, with a blank qcow2 disk of
        ``disk_mib`` in the pool and a VNC display on loopback. Its serial log holds
        the current boot only (libvirt truncates it when the domain starts)."""
        vm = self.host.define_appliance(name, memory_mib=memory_mib)
        pool = self.conn.storagePoolLookupByName(self.pool)
        volume = pool.createXML(_volume_xml(f"{name}.qcow2", disk_mib), 0)
        xml = self._fitted(vm.domain.XMLDesc(0), volume.path())
        self.conn.defineXML(xml)  # the same name and uuid: redefines it
        return vm

    @staticmethod
    def _fitted(xml: str, disk: str) -> str:
        root = ET.fromstring(xml)
        devices = root.find("devices")
        assert devices is not None
        log = devices.find("serial/log")
        assert log is not None
        log.set("append", "off")
        disk_el = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(disk_el, "driver", name="qemu", type="qcow2")
        ET.SubElement(disk_el, "source", file=disk)
        ET.SubElement(disk_el, "target", dev="vda", bus="virtio")
        graphics = ET.SubElement(devices, "graphics", type="vnc", port="-1", autoport="yes")
        ET.SubElement(graphics, "listen", type="address", address="127.0.0.1")
        return ET.tostring(root, encoding="unicode")

    def vm(self, ref: str) -> LibvirtVm:
        """The domain defined here whose name or UUID is ``ref``."""
        for vm in self.vms.values():
            if ref in (vm.name, vm.domain.UUIDString()):
                return vm
        raise KeyError(f"no appliance domain {ref!r} defined by the harness")

    def wait_ready(self, ref: str, timeout: float = READY_TIMEOUT_S) -> float:
        """Wait until the running domain ``ref`` (a name or UUID) prints the appliance's
        ready line; the guest's uptime on it."""
        vm = self.vm(ref)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError):
                found = READY.search(vm.serial_log.read_bytes())
                if found:
                    return float(found.group(1))
            if not vm.domain.isActive():
                raise AssertionError(f"domain {vm.name!r} stopped before its ready line")
            time.sleep(0.1)
        tail = vm.serial_log.read_bytes()[-2000:] if vm.serial_log.exists() else b""
        raise AssertionError(f"domain {vm.name!r}: no ready line in {timeout:.0f} s: {tail!r}")

    def close(self) -> None:
        """Remove what appeared on the daemon, then stop it and clean up after it."""
        try:
            if self.conn is not None and self._before:
                self._remove_new_objects()
        finally:
            self.host.close()

    def _objects(self) -> dict[str, set[str]]:
        return {
            "domains": {d.UUIDString() for d in self.conn.listAllDomains(0)},
            "pools": {p.UUIDString() for p in self.conn.listAllStoragePools(0)},
            "networks": {n.UUIDString() for n in self.conn.listAllNetworks(0)},
        }

    def _remove_new_objects(self) -> None:
        """Domains first (they use the pools and networks), the harness's own included."""
        import libvirt

        for name in list(self.vms):
            with contextlib.suppress(libvirt.libvirtError):
                self.host.undefine(name)
        before = self._before
        for domain in self.conn.listAllDomains(0):
            if domain.UUIDString() not in before["domains"]:
                _remove_domain(domain)
        for pool in self.conn.listAllStoragePools(0):
            if pool.UUIDString() not in before["pools"]:
                with contextlib.suppress(libvirt.libvirtError):
                    pool.destroy()
                pool.undefine()
        for network in self.conn.listAllNetworks(0):
            if network.UUIDString() not in before["networks"]:
                with contextlib.suppress(libvirt.libvirtError):
                    network.destroy()
                network.undefine()


def _remove_domain(domain: Any) -> None:
    import libvirt

    with contextlib.suppress(libvirt.libvirtError):
        domain.destroy()
    with contextlib.suppress(libvirt.libvirtError):  # a transient one is gone already
        domain.undefineFlags(
            libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
        )


def _pool_xml(name: str, path: Path) -> str:
    return (
        f"<pool type='dir'><name>{name}</name>"
        f"<target><path>{path}</path><permissions><mode>0711</mode></permissions></target>"
        "</pool>"
    )


def _volume_xml(name: str, mib: int) -> str:
    return (
        f"<volume><name>{name}</name><capacity unit='MiB'>{mib}</capacity>"
        "<target><format type='qcow2'/></target></volume>"
    )


class _Shared:
    """The one daemon of the session and how many users it has."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.daemon: LibvirtDaemon | None = None
        self.users = 0

    def enter(self) -> LibvirtDaemon:
        with self.lock:
            if self.daemon is None:
                daemon = LibvirtDaemon()
                try:
                    daemon.start()
                except BaseException:
                    daemon.close()
                    raise
                self.daemon = daemon
            self.users += 1
            return self.daemon

    def leave(self) -> None:
        with self.lock:
            self.users -= 1
            if self.users == 0 and self.daemon is not None:
                daemon, self.daemon = self.daemon, None
                daemon.close()


_SHARED = _Shared()


@contextlib.contextmanager
def libvirt_daemon() -> Iterator[LibvirtDaemon]:
    """The test session's libvirtd: started by the first user, stopped after the last."""
    daemon = _SHARED.enter()
    try:
        yield daemon
    finally:
        _SHARED.leave()


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[LibvirtDaemon]:
    """libvirtd for the whole session (shared with any other user of ``libvirt_daemon``)."""
    with libvirt_daemon() as daemon:
        yield daemon
