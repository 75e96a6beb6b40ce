"""A VM's resource controls as cgroup settings."""

from __future__ import annotations

from thinvisor.host.resources import MIB, PIDS_MAX, QEMU_OVERHEAD_MIB, cgroup_settings
from thinvisor.model import VmSpec


def test_defaults_are_normal_shares_and_no_limits() -> None:
    s = cgroup_settings(VmSpec(name="vm1", vcpus=2), core_mhz=2000)
    assert (s.cpu_shares, s.cpu_quota_cores, s.memory_max_bytes, s.memory_min_bytes) == (
        2000,
        None,
        None,
        0,
    )
    assert s.pids_max == PIDS_MAX


def test_limits_and_reservations() -> None:
    resources = {
        "cpu_shares": "low",
        "cpu_limit_mhz": 500,
        "memory_limit_mib": 256,
        "memory_reservation_mib": 128,
    }
    spec = VmSpec.model_validate({"name": "vm1", "memory_mib": 512, "resources": resources})
    s = cgroup_settings(spec, core_mhz=2500)
    assert s.cpu_shares == 500
    assert s.cpu_quota_cores == 0.2
    assert s.memory_max_bytes == (256 + QEMU_OVERHEAD_MIB) * MIB
    assert s.memory_min_bytes == 128 * MIB


def test_a_tiny_limit_is_the_kernels_smallest_quota() -> None:
    spec = VmSpec.model_validate({"name": "vm1", "resources": {"cpu_limit_mhz": 1}})
    assert cgroup_settings(spec, core_mhz=3000).cpu_quota_cores == 0.01
