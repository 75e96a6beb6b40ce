"""Admission control: a VM starts only if the host can still honour every reservation.

As in ESXi, a reservation is a promise: the CPU (MHz) and memory (MiB) reserved by the
running VMs plus the new one's must fit in what the host has for VMs, its capacity less
what it keeps for itself. VMs without reservations always fit (they run on shares).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from thinvisor.errors import InsufficientResources
from thinvisor.model.resources import ResourceSpec


@dataclass(frozen=True)
class Capacity:
    """What the host has for VMs' reservations."""

    cpu_mhz: int
    memory_mib: int


@dataclass(frozen=True)
class Reserved:
    """What one VM, or all of them, reserved."""

    cpu_mhz: int = 0
    memory_mib: int = 0

    def __add__(self, other: Reserved) -> Reserved:
        return Reserved(self.cpu_mhz + other.cpu_mhz, self.memory_mib + other.memory_mib)


def reserved_by(resources: ResourceSpec) -> Reserved:
    return Reserved(resources.cpu_reservation_mhz, resources.memory_reservation_mib)


def capacity(
    cpus: int, core_mhz: int, memory_mib: int, *, host_cpu_mhz: int, host_memory_mib: int
) -> Capacity:
    """The host's capacity for VMs: all cores and memory less the host's own share."""
    return Capacity(
        cpu_mhz=max(0, cpus * core_mhz - host_cpu_mhz),
        memory_mib=max(0, memory_mib - host_memory_mib),
    )


def check_admission(vm: str, new: Reserved, running: Iterable[Reserved], cap: Capacity) -> None:
    """Raise ``InsufficientResources`` naming what does not fit if ``vm`` cannot start."""
    taken = sum(running, Reserved())
    if new.cpu_mhz and taken.cpu_mhz + new.cpu_mhz > cap.cpu_mhz:
        free = max(0, cap.cpu_mhz - taken.cpu_mhz)
        raise InsufficientResources(
            f"vm {vm!r}: cannot reserve {new.cpu_mhz} MHz of CPU: "
            f"{free} of the host's {cap.cpu_mhz} MHz for VMs are unreserved"
        )
    if new.memory_mib and taken.memory_mib + new.memory_mib > cap.memory_mib:
        free = max(0, cap.memory_mib - taken.memory_mib)
        raise InsufficientResources(
            f"vm {vm!r}: cannot reserve {new.memory_mib} MiB of memory: "
            f"{free} of the host's {cap.memory_mib} MiB for VMs are unreserved"
        )
