"""Admission control: reservations must fit in what the host has for VMs."""

from __future__ import annotations

import pytest

from thinvisor.errors import InsufficientResources
from thinvisor.host.admission import Reserved, capacity, check_admission, reserved_by
from thinvisor.model.resources import ResourceSpec

CAP = capacity(4, 2000, 8192, host_cpu_mhz=1000, host_memory_mib=1024)


def test_capacity_is_the_host_less_its_own_share() -> None:
    assert (CAP.cpu_mhz, CAP.memory_mib) == (7000, 7168)
    assert capacity(1, 1000, 512, host_cpu_mhz=2000, host_memory_mib=1024).cpu_mhz == 0


def test_vms_without_reservations_always_fit() -> None:
    full = [Reserved(7000, 7168)]
    check_admission("vm1", reserved_by(ResourceSpec()), full, CAP)


def test_reservations_that_fit() -> None:
    running = [Reserved(3000, 2048), Reserved(1000, 1024)]
    check_admission("vm1", Reserved(3000, 4096), running, CAP)


@pytest.mark.parametrize(
    ("new", "message"),
    [
        (Reserved(cpu_mhz=3001), "cannot reserve 3001 MHz of CPU: 3000 of the host's 7000 MHz"),
        (Reserved(memory_mib=4097), "cannot reserve 4097 MiB of memory: 4096 of the host's"),
    ],
)
def test_reservations_that_do_not_fit(new: Reserved, message: str) -> None:
    running = [Reserved(3000, 2048), Reserved(1000, 1024)]
    with pytest.raises(InsufficientResources, match=message):
        check_admission("vm1", new, running, CAP)
