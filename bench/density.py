"""Overhead and density: what the management process and each QEMU cost in memory with
0, 10 and 30 running 64 MiB appliance VMs, how many such VMs this machine runs, and the
host's memory with KSM off and on.

thinvisor's agent is compared with libvirtd and virtlogd (when libvirtd can be started:
``bench.density_libvirt``), running the same guests at the same time; their resident sets
are sampled in turn, round after round. The count of VMs is thinvisor's alone.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from bench.api import annotate_peer
from bench.api_load import cpu_percent
from bench.api_thinvisor import MEMORY_MIB
from bench.density_fleet import BOOTING, READY_TIMEOUT_S, Boot, Fleet, ThinvisorFleet, boot
from bench.density_fleet import qemu_rss_kib as fleet_qemu_rss
from bench.density_memory import (
    KSM_FAST,
    available_mib,
    ksm_available,
    ksm_merge,
    ksm_off,
    ksm_restored,
    used_mib,
)
from bench.harness import Comparison, Round, alternate
from bench.hosts import ThinvisorHost

LEVELS = (0, 10, 30)
MARGIN_MIB = 2048  # start no VM once the host has less than this available
# The count is capped by time: under TCG every boot costs about two seconds of CPU, so the
# two cores add a VM every second or two; the budget keeps the benchmark within minutes,
# and the memory each added VM took tells how many memory alone would allow.
RAMP_BUDGET_S = 60.0
RAMP_MAX = 150
SAMPLE_PAUSE_S = 0.25
CPU_SECONDS = 3.0  # how long the idle VMs' CPU use is measured at the end

Log = Callable[[str], None]


def run(log: Log, rounds: int) -> list[Comparison]:
    """Every density figure; nothing is left running or defined afterwards."""
    with contextlib.ExitStack() as stack:
        log("density: starting a thinvisor host")
        host = stack.enter_context(ThinvisorHost("density"))
        host.start()
        tv = ThinvisorFleet(host)
        stack.callback(tv.client.close)
        stack.callback(tv.clear)
        fleets: dict[str, Fleet] = {"thinvisor": tv}
        peer, peer_note = open_peer(stack, log)
        if peer is not None:
            fleets["libvirt"] = peer
        results = overhead(fleets, log, rounds)
        annotate_peer(results, peer_note)
        if peer is not None:
            peer.clear()  # the count and KSM are thinvisor's alone
        results += density(tv, log)
        return results


def open_peer(stack: contextlib.ExitStack, log: Log) -> tuple[Any, str]:
    """libvirt's fleet, cleared and closed with ``stack``, or None and why there is none."""
    try:
        from bench import density_libvirt
    except ImportError as exc:
        return None, f"no libvirt peer: {exc}"
    try:
        fleet = density_libvirt.open_fleet(stack, log)
    except density_libvirt.Unavailable as exc:
        return None, f"no libvirt peer: {exc}"
    return fleet, density_libvirt.NOTE


# Overhead at 0, 10 and 30 VMs


def overhead(fleets: dict[str, Fleet], log: Log, rounds: int) -> list[Comparison]:
    """Each fleet grows to each level; then its memory is sampled, fleets in turn."""
    for name, fleet in fleets.items():
        log(f"density: warm-up, one VM through {name}")
        warm_up(fleet)
    comparisons: dict[str, Comparison] = {}
    for level in LEVELS:
        for name, fleet in fleets.items():
            grow(fleet, name, level, log)
        comparisons |= level_comparisons(level)
        plays = {name: sampler(fleet, level) for name, fleet in fleets.items()}
        log(f"density: sampling with {level} running VMs each")
        alternate(plays, comparisons, rounds=rounds, warmup=1, log=log)
        if level:
            spread(comparisons[f"qemu_rss_{level}"], fleets)
    return [*comparisons.values(), growth(comparisons)]


def warm_up(fleet: Fleet) -> None:
    """One VM made, booted, stopped and removed: the code paths are loaded at level 0."""
    outcome = boot(fleet, ["warm"])
    if not outcome.ready:
        raise RuntimeError(f"the warm-up VM did not boot: {outcome.stopped_by}")
    fleet.stop("warm")
    fleet.delete("warm")


def grow(fleet: Fleet, contender: str, level: int, log: Log) -> None:
    names = [f"d{n:03d}" for n in range(len(fleet.running), level)]
    if not names:
        return
    outcome = boot(fleet, names)
    log(f"  {contender}: {len(outcome.ready)} VMs booted in {outcome.wall_s:.1f} s")
    if outcome.stopped_by is not None:
        raise RuntimeError(f"{contender}: {outcome.stopped_by}")


def level_comparisons(level: int) -> dict[str, Comparison]:
    found = {
        f"mgmt_rss_{level}": Comparison(
            f"management RSS, {level} running VMs", f"mgmt_rss_{level}", "MiB"
        )
    }
    if level:
        metric = f"qemu_rss_{level}"
        found[metric] = Comparison(f"QEMU RSS (median), {level} running VMs", metric, "MiB")
    return found


def sampler(fleet: Fleet, level: int) -> Round:
    def one() -> dict[str, float]:
        time.sleep(SAMPLE_PAUSE_S)
        values = {f"mgmt_rss_{level}": fleet.manager_rss_kib() / 1024}
        if level:
            values[f"qemu_rss_{level}"] = statistics.median(fleet_qemu_rss(fleet)) / 1024
        return values

    return one


def spread(comparison: Comparison, fleets: dict[str, Fleet]) -> None:
    """The smallest and largest QEMU of each fleet, beside the medians."""
    for name, fleet in fleets.items():
        rss = fleet_qemu_rss(fleet)
        comparison.notes.append(
            f"{name}: {len(rss)} QEMU processes, RSS {min(rss) / 1024:.1f} to "
            f"{max(rss) / 1024:.1f} MiB"
        )


def growth(comparisons: dict[str, Comparison]) -> Comparison:
    """Per round: (RSS at the top level - RSS at 0) / VMs, for each contender."""
    top = LEVELS[-1]
    result = Comparison(
        f"management RSS growth per running VM (0 to {top} VMs)", "mgmt_rss_per_vm", "KiB"
    )
    low, high = comparisons[f"mgmt_rss_{LEVELS[0]}"], comparisons[f"mgmt_rss_{top}"]
    for contender, series in high.series.items():
        for a, b in zip(low.series[contender].values, series.values, strict=False):
            result.add(contender, (b - a) * 1024 / top)
    result.notes.append(
        "thinvisor: the agent (thinvisor host serve); libvirt: libvirtd + virtlogd; round n "
        "at 0 VMs paired with round n at the top level. At each level thinvisor's VMs boot "
        "first, then libvirt's, and both fleets run side by side while sampled in turn"
    )
    return result


# How many VMs, and KSM


def density(fleet: ThinvisorFleet, log: Log) -> list[Comparison]:
    """Boot more VMs until one is not ready in time, memory runs short, or the budget is
    spent; then the host's memory with KSM off and on."""
    first = len(fleet.running)
    deadline = time.monotonic() + RAMP_BUDGET_S

    def refuse() -> str | None:
        if len(fleet.running) >= RAMP_MAX:
            return f"the cap of {RAMP_MAX} VMs"
        if available_mib() < MARGIN_MIB:
            return f"the host's available memory fell below {MARGIN_MIB} MiB"
        if time.monotonic() > deadline:
            return f"the time budget of {RAMP_BUDGET_S:g} s for adding VMs"
        return None

    log(f"density: adding VMs to the {first} running, {BOOTING} booting at a time")
    names = [f"d{n:03d}" for n in range(first, RAMP_MAX)]
    used_before = used_mib()
    outcome = boot(fleet, names, refuse=refuse)
    count = len(fleet.running)
    log(f"  {count} VMs running and ready; stopped by {outcome.stopped_by}")
    per_vm = (used_mib() - used_before) / max(len(outcome.ready), 1)
    results = [count_comparison(fleet, first, outcome, per_vm)]
    if ksm_available():
        results.append(ksm_comparison(count, log))
    return results


def count_comparison(
    fleet: ThinvisorFleet, first: int, outcome: Boot, per_vm_mib: float
) -> Comparison:
    result = Comparison(f"{MEMORY_MIB} MiB appliance VMs running and ready", "vms_ready", "VMs")
    count = len(fleet.running)
    result.add("thinvisor", count)
    rss = fleet_qemu_rss(fleet)
    load = os.getloadavg()[0]
    busy = cpu_percent(list(fleet.running.values()), CPU_SECONDS)
    room = max(available_mib() - MARGIN_MIB, 0) / per_vm_mib if per_vm_mib > 0 else 0
    result.notes += [
        f"started {BOOTING} at a time, each next one when one reached its ready line; "
        f"{len(outcome.ready)} added to the {first} already running in {outcome.wall_s:.0f} s",
        f"stopped by: {outcome.stopped_by or 'none'}; a VM counts when it prints its ready "
        f"line within {READY_TIMEOUT_S:g} s; safety margin {MARGIN_MIB} MiB available",
        f"QEMU RSS median {statistics.median(rss) / 1024:.1f} MiB, host memory available "
        f"{available_mib():.0f} MiB, load average {load:.1f} at the end",
        f"the {count} idle guests used {busy:.0f} % of a core together ({busy / count:.1f} % "
        f"each, TCG) over {CPU_SECONDS:g} s",
        f"each VM added used {per_vm_mib:.0f} MiB of host memory (KSM off): memory alone "
        f"would allow about {count + int(room)} before the safety margin",
    ]
    return result


def ksm_comparison(count: int, log: Log) -> Comparison:
    """Host memory in use with KSM off, then on once it has merged what it can."""
    result = Comparison(f"host memory used, {count} running VMs", "host_mem_used", "MiB")
    with ksm_restored() as saved:
        ksm_off()
        time.sleep(3)
        result.add("KSM off", statistics.median(sample_used()))
        log(f"density: KSM merging ({count} VMs)")
        merged = ksm_merge(log)
        result.add("KSM on", statistics.median(sample_used()))
    result.notes += [
        f"MemTotal - MemAvailable, median of 3 samples; KSM on: after {merged['seconds']:.0f} s, "
        f"{merged['full_scans']:.0f} full scans; pages_sharing {merged['pages_sharing']:.0f}, "
        f"pages_shared {merged['pages_shared']:.0f} "
        f"({merged['pages_sharing'] * 4 / 1024:.0f} MiB saved at most)",
        f"ksmd scanned with pages_to_scan {KSM_FAST['pages_to_scan']}, sleep_millisecs "
        f"{KSM_FAST['sleep_millisecs']} while measured; its settings were restored "
        f"afterwards (run={saved['run']})",
    ]
    log(f"  used {fmt_series(result)}")
    return result


def sample_used() -> list[float]:
    values = []
    for _ in range(3):
        values.append(used_mib())
        time.sleep(1)
    return values


def fmt_series(comparison: Comparison) -> str:
    return ", ".join(f"{c} {s.values[0]:.0f} MiB" for c, s in comparison.series.items())
