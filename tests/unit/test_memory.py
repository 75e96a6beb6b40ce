"""Memory overcommit: the balloon policy (pure), KSM's settings on a fake sysfs, and the
QMP arguments of disk throttling."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from thinvisor.config import HostConfig, MemoryConfig
from thinvisor.errors import InvalidArgument
from thinvisor.host.engine.qmp import Monitor
from thinvisor.host.memory import (
    BalloonVm,
    KsmSettings,
    balloon_targets,
    check_balloon_target,
    ksm_settings,
    read_ksm,
    restore_ksm,
    start_ksm,
)
from thinvisor.model.resources import DiskLimits
from thinvisor.model.vm import VmSpec


def vm(name: str, memory: int = 1000, shares: int | None = None, **fields: Any) -> BalloonVm:
    """A VM of ``memory`` MiB with normal shares (10 a MiB) unless told otherwise."""
    return BalloonVm(name, memory, shares if shares is not None else 10 * memory, **fields)


# --- the balloon policy ---------------------------------------------------------------


def test_no_vms_no_targets() -> None:
    assert balloon_targets([], 100, 1000) == {}


def test_without_pressure_every_vm_keeps_all_its_memory() -> None:
    vms = [vm("a"), vm("b", 500)]
    assert balloon_targets(vms, 5000, 1000) == {"a": 1000, "b": 500}


def test_pressure_is_taken_from_vms_of_one_level_in_proportion() -> None:
    # Short by 300 MiB: a 1000 and a 500 MiB VM with normal shares give back a fifth each.
    targets = balloon_targets([vm("a"), vm("b", 500)], 700, 1000)
    assert targets == {"a": 800, "b": 400}


def test_fewer_shares_give_back_first() -> None:
    low, high = vm("low", shares=5 * 1000), vm("high", shares=20 * 1000)
    assert balloon_targets([low, high], 800, 1000) == {"low": 800, "high": 1000}
    # More pressure than the low VM can give alone: both give, the low one more.
    targets = balloon_targets([low, high], 0, 1000, max_percent=100)
    assert targets["low"] + targets["high"] == 1000
    assert 1000 - targets["low"] > 1000 - targets["high"] > 0
    assert targets["high"] == 4 * targets["low"]  # memory in proportion to shares


def test_shares_count_per_mib() -> None:
    # Equal numbers of shares: the bigger VM has fewer per MiB and gives back first.
    big, small = vm("big", 2000, shares=1000), vm("small", 500, shares=1000)
    assert balloon_targets([big, small], 700, 1000) == {"big": 1700, "small": 500}


def test_never_below_the_reservation() -> None:
    vms = [vm("a", reservation_mib=900), vm("b")]
    targets = balloon_targets(vms, 0, 2000, max_percent=100)
    assert targets == {"a": 900, "b": 0}


def test_never_more_than_max_percent_taken() -> None:
    targets = balloon_targets([vm("a"), vm("b")], 0, 5000, max_percent=65)
    assert targets == {"a": 350, "b": 350}


def test_a_limit_below_memory_is_always_ballooned_to() -> None:
    limited = vm("limited", limit_mib=600)
    assert balloon_targets([limited, vm("b")], 9000, 1000) == {"limited": 600, "b": 1000}
    # The memory the limit frees counts against a shortage.
    assert balloon_targets([limited, vm("b")], 700, 1000) == {"limited": 600, "b": 1000}
    # Under more pressure it gives more, still within its bounds.
    targets = balloon_targets([limited, vm("b")], 0, 1500)
    assert targets["limited"] <= 600 and targets["b"] < 1000


def test_a_limit_wins_over_the_reservation_floor() -> None:
    # Ballooned down to its limit even though max_percent would keep more.
    assert balloon_targets([vm("a", limit_mib=100)], 9000, 0, max_percent=10) == {"a": 100}


def test_memory_goes_back_once_the_pressure_is_gone() -> None:
    vms = [vm("a", balloon_mib=400), vm("b", balloon_mib=100)]
    # 200 MiB above the mark: given back, most to the VM with the most shares per MiB
    # now (b's shares are for 1000 MiB, it has 900; a has 600).
    partial = balloon_targets(vms, 1200, 1000)
    assert sum(partial.values()) == 600 + 900 + 200
    assert partial["a"] > 600
    # Plenty of room: every VM back to all its memory.
    assert balloon_targets(vms, 9000, 1000) == {"a": 1000, "b": 1000}


def test_at_the_mark_nothing_changes() -> None:
    vms = [vm("a", balloon_mib=400), vm("b", balloon_mib=100)]
    assert balloon_targets(vms, 1000, 1000) == {"a": 600, "b": 900}


def test_a_shortage_beyond_what_balloons_hold_takes_all_they_may() -> None:
    vms = [vm("a", reservation_mib=500), vm("b", 2000)]
    assert balloon_targets(vms, 0, 100_000, max_percent=50) == {"a": 500, "b": 1000}


def test_the_reclaim_adds_up_to_the_shortage() -> None:
    vms = [vm(f"v{n}", 256 * (n + 1), shares=1000 * (n % 3 + 1)) for n in range(6)]
    before = sum(v.memory_mib for v in vms)
    targets = balloon_targets(vms, 3000, 4000, max_percent=90)
    assert before - sum(targets.values()) in range(1000, 1000 + len(vms))
    for v in vms:
        assert v.floor_mib(90) <= targets[v.name] <= v.memory_mib


def test_balloon_vm_from_a_spec() -> None:
    spec = VmSpec.model_validate(
        {
            "name": "web",
            "memory_mib": 512,
            "resources": {
                "memory_shares": "high",
                "memory_reservation_mib": 128,
                "memory_limit_mib": 384,
            },
        }
    )
    got = BalloonVm.of(spec, actual_mib=448)
    assert got == BalloonVm("web", 512, 20 * 512, 128, 384, balloon_mib=64)
    assert got.current_mib == 448 and got.ceiling_mib == 384


def test_balloon_targets_a_user_may_set() -> None:
    spec = VmSpec.model_validate(
        {"name": "web", "memory_mib": 512, "resources": {"memory_reservation_mib": 64}}
    )
    check_balloon_target(spec, 64)
    check_balloon_target(spec, 512)
    for wrong in (63, 513):
        with pytest.raises(InvalidArgument) as caught:
            check_balloon_target(spec, wrong)
        assert caught.value.field == "balloon_mib"
    with pytest.raises(InvalidArgument):
        check_balloon_target(with_resources(spec, memory_limit_mib=256), 300)
    with pytest.raises(InvalidArgument, match="no balloon"):
        check_balloon_target(with_resources(spec, balloon=False), 256)


def with_resources(spec: VmSpec, **changes: Any) -> VmSpec:
    return spec.model_copy(update={"resources": spec.resources.model_copy(update=changes)})


def test_memory_config() -> None:
    config = HostConfig().memory
    assert config.ksm and config.balloon_max_percent == 65
    assert config.low_water(24_000) == 1440
    assert MemoryConfig(low_water_mib=512).low_water(24_000) == 512


# --- KSM on a fake /sys/kernel/mm/ksm -------------------------------------------------


@pytest.fixture
def ksm(tmp_path: Path) -> Path:
    values = {"run": "0", "pages_to_scan": "100", "sleep_millisecs": "20"}
    values |= {"pages_sharing": "7", "advisor_mode": "[none] scan-time"}
    for name, text in values.items():
        (tmp_path / name).write_text(text + "\n")
    return tmp_path


def test_read_ksm_takes_the_numbers(ksm: Path) -> None:
    values = read_ksm(ksm)
    assert values == {"run": 0, "pages_to_scan": 100, "sleep_millisecs": 20, "pages_sharing": 7}
    assert read_ksm(ksm / "missing") == {}
    assert ksm_settings(ksm / "missing") is None


def test_start_ksm_turns_it_on_and_remembers(ksm: Path) -> None:
    config = MemoryConfig(ksm_pages_to_scan=1000, ksm_sleep_millisecs=50)
    previous = start_ksm(config, ksm)
    assert previous == KsmSettings(0, 100, 20)
    assert ksm_settings(ksm) == KsmSettings(1, 1000, 50)
    restore_ksm(previous, ksm)
    assert ksm_settings(ksm) == KsmSettings(0, 100, 20)


def test_start_ksm_leaves_it_alone_when_told(ksm: Path) -> None:
    assert start_ksm(MemoryConfig(ksm=False), ksm) is None
    assert ksm_settings(ksm) == KsmSettings(0, 100, 20)
    assert start_ksm(MemoryConfig(), ksm / "missing") is None


# --- the QMP arguments ----------------------------------------------------------------


class Recorder(Monitor):
    def __init__(self) -> None:
        super().__init__("vm1", Path("/nonexistent"))
        self.sent: list[tuple[str, dict[str, Any] | None]] = []

    async def execute(self, name: str, args: dict[str, Any] | None = None) -> Any:
        self.sent.append((name, args))
        return {"actual": 96 << 20}


def test_throttle_gives_all_six_values_by_device_id() -> None:
    mon = Recorder()
    asyncio.run(mon.block_set_io_throttle("disk0", DiskLimits(iops_total=100, bps_read=1 << 20)))
    asyncio.run(mon.block_set_io_throttle("disk1", None))
    zero = {"bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0}
    assert mon.sent == [
        ("block_set_io_throttle", {"id": "disk0", **zero, "iops": 100, "bps_rd": 1 << 20}),
        ("block_set_io_throttle", {"id": "disk1", **zero}),
    ]


def test_balloon_commands() -> None:
    mon = Recorder()
    asyncio.run(mon.balloon(128 << 20))
    assert asyncio.run(mon.query_balloon()) == 96 << 20
    assert mon.sent == [("balloon", {"value": 128 << 20}), ("query-balloon", {})]
