"""libvirt's fleet for the density benchmark: the same 64 MiB appliance VMs as domains of
a libvirtd started by hand (``bench.libvirt_host``), whose QEMU runs as root here as
thinvisor's does (see ``bench.libvirt_host``)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from pathlib import Path

from bench.api_thinvisor import MEMORY_MIB
from bench.density_fleet import each
from bench.harness import wait_until
from bench.hosts import gone, rss_kib
from bench.libvirt_host import LibvirtHost, Unavailable

__all__ = ["NOTE", "LibvirtFleet", "Unavailable", "open_fleet"]

NOTE = (
    "libvirt: libvirtd 9.0 and virtlogd started by hand; domains type='qemu', q35, 80 MiB, "
    "one vCPU, no graphics, the appliance's kernel and initrd copied per domain (as "
    "thinvisor's appliance VMs), serial console on a pty logged by virtlogd"
)


def open_fleet(stack: contextlib.ExitStack, log: Callable[[str], None]) -> LibvirtFleet:
    """Start libvirtd, closed with ``stack`` after its VMs are cleared. ``Unavailable``
    when libvirt cannot run here."""
    host = LibvirtHost()
    with contextlib.ExitStack() as guard:
        guard.callback(host.close)
        log("density: starting libvirtd")
        try:
            host.start()
        except Exception as exc:
            raise Unavailable(f"libvirtd did not start: {exc}") from exc
        fleet = LibvirtFleet(host)
        guard.callback(fleet.clear)
        stack.push(guard.pop_all())
    return fleet


class LibvirtFleet:
    """Appliance domains started and destroyed through libvirt-python."""

    def __init__(self, host: LibvirtHost) -> None:
        self.host = host
        self.running: dict[str, int] = {}

    def create(self, name: str) -> None:
        self.host.define_appliance(name, memory_mib=MEMORY_MIB)

    def start(self, name: str) -> None:
        self.host.vms[name].domain.create()
        self.running[name] = self.host.qemu_pid(name)

    def serial_log(self, name: str) -> Path:
        return self.host.vms[name].serial_log

    def stop(self, name: str) -> None:
        pid = self.running.pop(name, None)
        self.host.vms[name].domain.destroy()
        if pid is not None:
            wait_until(lambda: gone(pid), 30, f"{name}'s QEMU gone")

    def delete(self, name: str) -> None:
        self.host.undefine(name)
        shutil.rmtree(self.host.root / name, ignore_errors=True)

    def manager_rss_kib(self) -> int:
        """libvirtd's and virtlogd's resident sets together."""
        pids = (self.host.libvirtd_pid, self.host.virtlogd_pid)
        return sum(rss_kib(pid) for pid in pids if pid is not None)

    def clear(self) -> None:
        """Destroy and undefine every domain of the fleet (again: nothing happens)."""
        each(self.stop, list(self.running))
        each(self.delete, list(self.host.vms))
