"""Resource controls on real appliance VMs: a CPU limit holds a busy guest, the memory
limit reaches the cgroup, changes apply while the VM runs, admission control refuses a
reservation the host cannot give."""

from __future__ import annotations

import time

import pytest

from thinvisor.errors import InsufficientResources
from thinvisor.host.engine.cgroups import VmCgroup
from thinvisor.host.resources import MIB, QEMU_OVERHEAD_MIB
from thinvisor.model.resources import ResourceUpdate

from .hostenv import TestHost

pytestmark = pytest.mark.functional


def _cpu_share(host: TestHost, name: str, seconds: float = 3.0) -> float:
    """The part of one core the VM's QEMU used over ``seconds``, by its cgroup."""
    spec = host.service.inventory.get(name).spec
    assert spec is not None
    before, started = host.service.controls.usage(spec), time.monotonic()
    time.sleep(seconds)
    after = host.service.controls.usage(spec)
    assert before is not None and after is not None
    return (after.cpu_ns - before.cpu_ns) / 1e9 / (time.monotonic() - started)


def _memory_limit(cgroup: VmCgroup) -> int:
    path = cgroup.path("memory")
    name = "memory.max" if (path / "memory.max").exists() else "memory.limit_in_bytes"
    return int((path / name).read_text())


def test_cpu_limit_memory_limit_and_admission(host: TestHost) -> None:
    layout = host.service.controls.layout()
    if layout is None:
        pytest.skip(f"no cgroups: {host.service.controls.unavailable}")
    core = host.service._facts().core_mhz
    resources = {"cpu_reservation_mhz": core // 10}
    resources |= {"memory_limit_mib": 96, "memory_reservation_mib": 32}
    info = host.create("busy", resources=resources)
    assert info.spec is not None
    host.wait_ready("busy")
    cgroup = VmCgroup(layout, info.spec.uuid)
    assert info.pid in cgroup.pids()
    assert _memory_limit(cgroup) == (96 + QEMU_OVERHEAD_MIB) * MIB
    host.sh("busy", "(while :; do :; done) >/dev/null 2>&1 & true")
    # Limited to a fifth of a core while it runs (a TCG guest that slow barely answers
    # its console, so the limit comes after the busy loop): 20 % of a core by the
    # cgroup's own accounting, with generous bounds on a noisy host.
    host.run(host.service.set_resources("busy", ResourceUpdate(cpu_limit_mhz=core // 5)))
    assert 0.10 < _cpu_share(host, "busy") < 0.35
    # Lifted again: the same busy guest takes most of a core.
    host.run(host.service.set_resources("busy", ResourceUpdate(cpu_limit_mhz=0)))
    assert _cpu_share(host, "busy") > 0.5
    # The host cannot give a second VM more CPU than is left unreserved.
    facts = host.service._facts()
    left = facts.cpus * core - core // 10
    host.create("greedy", start=False, resources={"cpu_reservation_mhz": left + 1})
    with pytest.raises(InsufficientResources, match="cannot reserve"):
        host.run(host.service.start("greedy"))
    assert host.run(host.service.get_vm("greedy")).state == "stopped"
    with pytest.raises(InsufficientResources):
        update = ResourceUpdate(cpu_reservation_mhz=facts.cpus * core + 1)
        host.run(host.service.set_resources("busy", update))
    assert host.service.inventory.get("busy").spec.resources.cpu_reservation_mhz == core // 10
    # Powered off, the VM's cgroups are gone.
    host.run(host.service.stop("busy"))
    assert not cgroup.exists()
