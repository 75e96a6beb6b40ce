"""Facts about the host machine that VM placement and validation need."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path


@dataclass(frozen=True)
class HostFacts:
    cpus: int
    memory_total_mib: int
    memory_available_mib: int
    cpu_model: str
    # One core's nominal clock, the unit of CPU reservations and limits (as vSphere's MHz).
    core_mhz: int = 1000


def _meminfo() -> dict[str, int]:
    values: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0])  # KiB
    return values


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return "unknown"


def host_facts() -> HostFacts:
    mem = _meminfo()
    return HostFacts(
        cpus=len(os.sched_getaffinity(0)),
        memory_total_mib=mem.get("MemTotal", 0) // 1024,
        memory_available_mib=mem.get("MemAvailable", 0) // 1024,
        cpu_model=_cpu_model(),
        core_mhz=core_mhz(),
    )


def core_mhz() -> int:
    """One core's nominal clock in MHz: the TSC rate on x86, else 1000 if unknown."""
    khz = tsc_khz()
    return max(1, khz // 1000) if khz else 1000


@cache
def tsc_khz() -> int | None:
    """The host's TSC frequency in kHz, for guests that cannot calibrate it themselves."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    # "model name ... @ 2.20GHz" is the nominal TSC rate on x86.
    m = re.search(r"@ (\d+(?:\.\d+)?)GHz", text)
    if m:
        return int(float(m.group(1)) * 1_000_000)
    m = re.search(r"^cpu MHz\s*:\s*(\d+(?:\.\d+)?)", text, re.MULTILINE)
    return int(float(m.group(1)) * 1000) if m else None
