"""Shares, reservations and limits as a VM's spec holds them."""

from __future__ import annotations

import pytest

from thinvisor.errors import InvalidArgument
from thinvisor.model import VmSpec, parse_spec
from thinvisor.model.resources import (
    DiskLimits,
    ResourceSpec,
    ResourceUpdate,
    cpu_shares,
    memory_shares,
)
from thinvisor.model.vm import validate


def test_defaults_are_normal_shares_no_reservation_no_limit() -> None:
    spec = VmSpec(name="vm1", vcpus=2, memory_mib=512)
    r = spec.resources
    assert (r.cpu_reservation_mhz, r.cpu_limit_mhz, r.memory_limit_mib) == (0, None, None)
    assert r.page_sharing and r.balloon
    assert cpu_shares(r.cpu_shares, spec.vcpus) == 2000
    assert memory_shares(r.memory_shares, spec.memory_mib) == 5120
    assert cpu_shares("high", 1) == 2000 and cpu_shares(300, 4) == 300


@pytest.mark.parametrize(
    ("resources", "field"),
    [
        ({"cpu_shares": 0}, "resources.cpu_shares"),
        ({"cpu_shares": "huge"}, "resources.cpu_shares"),
        ({"cpu_limit_mhz": 100, "cpu_reservation_mhz": 200}, "resources"),
        ({"memory_limit_mib": 64, "memory_reservation_mib": 128}, "resources"),
        ({"memory_reservation_mib": -1}, "resources.memory_reservation_mib"),
        ({"turbo": True}, "resources.turbo"),
    ],
)
def test_bad_resources_name_the_field(resources: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_spec({"name": "vm1", "memory_mib": 256, "resources": resources})
    assert caught.value.field.startswith(field)


def test_reservation_and_limit_within_the_memory() -> None:
    for key in ("memory_reservation_mib", "memory_limit_mib"):
        with pytest.raises(InvalidArgument, match=key):
            parse_spec({"name": "vm1", "memory_mib": 256, "resources": {key: 512}})


def test_update_applies_only_what_is_given_and_zero_lifts_a_limit() -> None:
    current = ResourceSpec(cpu_limit_mhz=500, memory_limit_mib=128, cpu_shares="high")
    changed = ResourceUpdate(cpu_limit_mhz=0, memory_reservation_mib=64).apply(current)
    assert changed.cpu_limit_mhz is None
    assert changed.memory_limit_mib == 128 and changed.memory_reservation_mib == 64
    assert changed.cpu_shares == "high"
    with pytest.raises(ValueError, match="memory_limit_mib"):
        ResourceUpdate(memory_reservation_mib=256).apply(current)


def test_disk_limits() -> None:
    assert DiskLimits().is_unlimited()
    assert not DiskLimits(iops_read=100, bps_write=1 << 20).is_unlimited()
    with pytest.raises(InvalidArgument, match="iops_total"):
        validate(DiskLimits, {"iops_total": 100, "iops_read": 50})
    disk = {"name": "disk0", "path": "disk0.qcow2", "limits": {"bps_total": 0}}
    with pytest.raises(InvalidArgument) as caught:
        parse_spec({"name": "vm1", "disks": [disk]})
    assert caught.value.field == "disks.0.limits.bps_total"
