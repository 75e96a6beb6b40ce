"""libvirt's side of the API benchmarks: libvirt-python on ``qemu:///system`` (a unix
socket, no TLS), with libvirtd started by hand (``bench.libvirt_host``).

The domains are the same definitions as thinvisor's VMs: 64 MiB, one vCPU, q35, direct
kernel boot of the appliance's kernel and initrd, which lie once in a shared folder.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from typing import Any

import libvirt

from bench.api_thinvisor import MEMORY_MIB
from bench.hosts import appliance
from bench.libvirt_host import URI, LibvirtHost, LibvirtVm, Unavailable, domain_xml

__all__ = ["NOTE", "LibvirtApi", "Unavailable", "open_api"]

NOTE = (
    "libvirt: libvirt-python on qemu:///system (unix socket, no TLS, no authentication), "
    "libvirtd 9.0 started by hand; define: defineXML() of a domain booting the same kernel "
    "and initrd; list: listAllDomains() and info() of each; read one: lookupByName(), "
    "info() and XMLDesc() (state and definition, as GET /vms/{vm})"
)


def open_api(stack: contextlib.ExitStack, log: Callable[[str], None]) -> LibvirtApi:
    """Start libvirtd, closed with ``stack``: every domain undefined, both daemons ended.
    ``Unavailable`` when libvirt cannot run here."""
    host = LibvirtHost()
    with contextlib.ExitStack() as guard:
        guard.callback(host.close)
        log("api: starting libvirtd")
        try:
            host.start()
        except Exception as exc:
            raise Unavailable(f"libvirtd did not start: {exc}") from exc
        stack.push(guard.pop_all())
    return LibvirtApi(host)


class LibvirtApi:
    """Domains defined on a ``LibvirtHost``, all of them undefined when it closes."""

    def __init__(self, host: LibvirtHost) -> None:
        self.host = host
        self.conn: Any = host.conn
        image = appliance()
        images = host.root / "images"
        images.mkdir(mode=0o711)
        self.kernel = images / "vmlinuz"
        self.initrd = images / "initrd.img"
        shutil.copyfile(image.kernel, self.kernel)
        shutil.copyfile(image.initrd, self.initrd)
        self.cmdline = image.cmdline

    def define(self, name: str) -> None:
        serial_log = self.host.root / f"{name}.serial0.log"
        xml = domain_xml(
            name,
            memory_mib=MEMORY_MIB,
            kernel=self.kernel,
            initrd=self.initrd,
            cmdline=self.cmdline,
            serial_log=serial_log,
        )
        domain = self.conn.defineXML(xml)
        self.host.vms[name] = LibvirtVm(name, domain, serial_log)

    def delete(self, name: str) -> None:
        self.host.undefine(name)

    def list_all(self) -> int:
        domains = self.conn.listAllDomains()
        for domain in domains:
            domain.info()
        return len(domains)

    def read(self, name: str) -> tuple[Any, str]:
        return read_domain(self.conn, name)

    def manager_pids(self) -> list[int]:
        """libvirtd and virtlogd."""
        pids = (self.host.libvirtd_pid, self.host.virtlogd_pid)
        return [pid for pid in pids if pid is not None]

    def reader(self) -> LibvirtReader:
        return LibvirtReader(libvirt.open(URI))


def read_domain(conn: Any, name: str) -> tuple[Any, str]:
    domain = conn.lookupByName(name)
    return domain.info(), domain.XMLDesc(0)


class LibvirtReader:
    """One concurrent client: its own connection to libvirtd."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def read(self, name: str) -> None:
        read_domain(self.conn, name)

    def close(self) -> None:
        self.conn.close()
