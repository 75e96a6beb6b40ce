"""Memory overcommit and disk limits on real QEMU with appliance guests: KSM merges the
pages of VMs with page sharing, the balloon takes memory from a guest and gives it
back, and disk throttling is in QEMU's block layer from start and after a change."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from thinvisor.config import MemoryConfig
from thinvisor.host import memory
from thinvisor.host.engine.qmp import THROTTLE_FIELDS, Monitor
from thinvisor.host.inventory import Inventory
from thinvisor.host.service import NewDisk
from thinvisor.model.resources import DiskLimits

from .hostenv import TestHost

pytestmark = pytest.mark.functional

T = TypeVar("T")
MIB = 1 << 20


def eventually(probe: Callable[[], T], done: Callable[[T], bool], timeout: float = 30) -> T:
    """Poll ``probe`` until ``done`` says yes; its last value."""
    deadline = time.monotonic() + timeout
    value = probe()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.25)
        value = probe()
    return value


def qmp(host: TestHost, vm: str, command: str, **args: Any) -> Any:
    socket = Inventory(host.config).get(vm).paths.qmp_socket

    async def go() -> Any:
        async with Monitor(vm, socket) as mon:
            return await mon.command(command, **args)

    return host.run(go())


# --- page sharing ---------------------------------------------------------------------


@pytest.fixture
def fast_ksm() -> Iterator[None]:
    """KSM on through thinvisor.host.memory, scanning fast; what was there is put back."""
    if not os.access(memory.KSM_DIR / "run", os.W_OK):
        pytest.skip("KSM is missing or not writable here")
    previous = memory.start_ksm(MemoryConfig(ksm_pages_to_scan=4000, ksm_sleep_millisecs=20))
    assert previous is not None
    try:
        yield
    finally:
        memory.restore_ksm(previous)
        assert memory.ksm_settings() == previous


def merging_pages(pid: int | None) -> int:
    return int(Path(f"/proc/{pid}/ksm_merging_pages").read_text())


def test_ksm_merges_the_pages_of_identical_vms(host: TestHost, fast_ksm: None) -> None:
    if not Path(f"/proc/{os.getpid()}/ksm_merging_pages").exists():
        pytest.skip("the kernel does not count merged pages per process (before 5.19)")
    for name in ("vm1", "vm2"):
        host.create(name)
    host.create("private", resources={"page_sharing": False})
    for name in ("vm1", "vm2", "private"):
        host.wait_ready(name)
    pids = [host.pid("vm1"), host.pid("vm2")]
    # Two identical guests share their kernel and initramfs pages: several MiB each.
    merged = eventually(lambda: [merging_pages(p) for p in pids], lambda m: min(m) > 2000)
    assert min(merged) > 2000, merged
    assert memory.read_ksm()["pages_sharing"] > 0
    # QEMU did not mark the RAM of a VM without page sharing mergeable.
    assert merging_pages(host.pid("private")) == 0


# --- the balloon ----------------------------------------------------------------------


def meminfo(host: TestHost, vm: str) -> dict[str, int]:
    """The guest's /proc/meminfo in KiB."""
    out = host.sh(vm, "cat /proc/meminfo")
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+):\s+(\d+) kB", out, re.MULTILINE)}


def balloon_actual_mib(host: TestHost, vm: str) -> int:
    return int(qmp(host, vm, "query-balloon")["actual"]) // MIB


def test_the_balloon_takes_memory_from_the_guest_and_gives_it_back(host: TestHost) -> None:
    host.create("vm1", memory_mib=192, resources={"memory_limit_mib": 160})
    host.wait_ready("vm1")
    full = meminfo(host, "vm1")
    assert balloon_actual_mib(host, "vm1") == 192
    # The policy holds a VM at its limit when the host has memory to spare.
    inventory = Inventory(host.config)
    plenty = {"available_mib": 100_000, "low_water_mib": 1000}
    sent = host.run(memory.rebalance(inventory, MemoryConfig(), **plenty))
    assert sent == {"vm1": 160}
    assert eventually(lambda: balloon_actual_mib(host, "vm1"), lambda m: m == 160) == 160
    # An operator's target: the guest gives up 96 MiB of its 192.
    host.run(host.service.set_limits("vm1", balloon_mib=96))
    assert eventually(lambda: balloon_actual_mib(host, "vm1"), lambda m: m == 96) == 96
    small = meminfo(host, "vm1")
    # With deflate-on-oom the guest counts the balloon's pages as in use, not gone:
    # its MemTotal stays, what it can use (MemFree, MemAvailable) drops.
    assert full["MemFree"] - small["MemFree"] >= 90 * 1024, (full, small)
    assert full["MemAvailable"] - small["MemAvailable"] >= 90 * 1024, (full, small)
    inflated = host.sh("vm1", "grep balloon_inflate /proc/vmstat").split()[1]
    assert int(inflated) >= 96 * MIB // 4096
    # Next round the policy gives it back, up to the limit.
    assert host.run(memory.rebalance(inventory, MemoryConfig(), **plenty)) == {"vm1": 160}
    assert eventually(lambda: balloon_actual_mib(host, "vm1"), lambda m: m == 160) == 160
    back = meminfo(host, "vm1")
    assert back["MemFree"] - small["MemFree"] >= 60 * 1024, (small, back)


# --- disk limits ----------------------------------------------------------------------


def throttles(host: TestHost, vm: str) -> dict[str, dict[str, int]]:
    """Disk device -> its throttle values, as query-block reports them."""
    found = {}
    for entry in qmp(host, vm, "query-block"):
        device = str(entry.get("qdev", "")).removeprefix("/machine/peripheral/")
        inserted = entry.get("inserted")
        if inserted and device.startswith("disk"):
            name = device.split("/")[0]
            found[name] = {k: inserted[k] for k in THROTTLE_FIELDS.values()}
    return found


def throttle(**limits: int) -> dict[str, int]:
    return {qmp_name: limits.get(field, 0) for field, qmp_name in THROTTLE_FIELDS.items()}


def test_disk_limits_are_in_effect_from_start_and_change_live(host: TestHost) -> None:
    host.create("vm1", start=False, disk_mib=16)
    host.run(host.service.add_disk("vm1", NewDisk(size=16 * MIB, bus="scsi")))
    host.run(host.service.add_disk("vm1", NewDisk(size=16 * MIB, bus="ide")))
    limits = {
        "disk0": DiskLimits(bps_total=512 * 1024),
        "disk1": DiskLimits(iops_read=50, iops_write=20),
        "disk2": DiskLimits(bps_write=MIB),
    }
    host.run(host.service.set_limits("vm1", disks=limits))
    host.run(host.service.start("vm1"))
    host.wait_ready("vm1")
    assert throttles(host, "vm1") == {
        "disk0": throttle(bps_total=512 * 1024),
        "disk1": throttle(iops_read=50, iops_write=20),
        "disk2": throttle(bps_write=MIB),
    }
    # The guest feels it: 1 MiB read past its page cache at 512 KiB/s takes about 2 s.
    took = host.sh(
        "vm1",
        "read a _ </proc/uptime; dd if=/dev/vda of=/dev/null bs=64k count=16 iflag=direct"
        " 2>/dev/null; read b _ </proc/uptime; echo $a $b",
    ).split()
    assert float(took[-1]) - float(took[-2]) >= 1.5, took
    # Changed on the running VM, and kept in the spec for the next start.
    changes = {"disk0": DiskLimits(iops_total=200), "disk2": None}
    host.run(host.service.set_limits("vm1", disks=changes))
    now = throttles(host, "vm1")
    assert now["disk0"] == throttle(iops_total=200)
    assert now["disk1"] == throttle(iops_read=50, iops_write=20)
    assert now["disk2"] == throttle()
    spec = Inventory(host.config).get("vm1").spec
    assert spec is not None
    assert [d.limits for d in spec.disks] == [DiskLimits(iops_total=200), limits["disk1"], None]
