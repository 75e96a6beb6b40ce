"""The host's memory as the density benchmark sees it: what is used and available, and
KSM (kernel samepage merging), switched for a measurement and restored afterwards."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

KSM = Path("/sys/kernel/mm/ksm")
# While merging is measured, ksmd scans faster than its default (100 pages every 20 ms,
# about 20 MB/s, which needs minutes for tens of VMs); the previous values come back after.
KSM_FAST = {"pages_to_scan": 5000, "sleep_millisecs": 10}
KSM_SETTINGS = ("run", "pages_to_scan", "sleep_millisecs")


def meminfo() -> dict[str, int]:
    """/proc/meminfo in KiB."""
    values: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        values[key] = int(rest.split()[0])
    return values


def available_mib() -> float:
    return meminfo()["MemAvailable"] / 1024


def used_mib() -> float:
    """Memory in use: total less what is available to new work without swapping."""
    info = meminfo()
    return (info["MemTotal"] - info["MemAvailable"]) / 1024


def ksm_value(name: str) -> int:
    return int((KSM / name).read_text())


def ksm_set(name: str, value: int) -> None:
    (KSM / name).write_text(f"{value}\n")


def ksm_available() -> bool:
    return (KSM / "run").exists()


@contextlib.contextmanager
def ksm_restored() -> Iterator[dict[str, int]]:
    """Run the block, then put KSM's settings back as they were; yields them."""
    saved = {name: ksm_value(name) for name in KSM_SETTINGS}
    try:
        yield saved
    finally:
        # run first: pages_to_scan and sleep_millisecs may be written while it runs.
        for name in KSM_SETTINGS:
            with contextlib.suppress(OSError):
                ksm_set(name, saved[name])


def ksm_off() -> None:
    """No merged pages and no merging: unmerge (run=2) what an earlier run left merged."""
    if ksm_value("pages_shared") or ksm_value("pages_sharing"):
        ksm_set("run", 2)
        deadline = time.monotonic() + 120
        while ksm_value("pages_sharing") and time.monotonic() < deadline:
            time.sleep(0.5)
    ksm_set("run", 0)


def ksm_merge(
    log: Callable[[str], None], timeout: float = 90, quiet_s: float = 6
) -> dict[str, float]:
    """Start merging fast and wait until ksmd has scanned everything once and
    pages_sharing stops growing (less than 1 % over ``quiet_s``), or ``timeout`` passes;
    what it reached and how long it took."""
    for name, value in KSM_FAST.items():
        ksm_set(name, value)
    scans = ksm_value("full_scans")
    ksm_set("run", 1)
    started = time.monotonic()
    history: list[tuple[float, int]] = []
    while True:
        time.sleep(1)
        now, sharing = time.monotonic(), ksm_value("pages_sharing")
        history.append((now, sharing))
        earlier = [s for t, s in history if t <= now - quiet_s]
        scanned = ksm_value("full_scans") > scans
        if scanned and earlier and sharing - earlier[-1] <= 0.01 * sharing:
            break
        if now - started > timeout:
            log(f"  KSM still merging after {timeout:g} s")
            break
    return {
        "seconds": time.monotonic() - started,
        "pages_sharing": ksm_value("pages_sharing"),
        "pages_shared": ksm_value("pages_shared"),
        "full_scans": ksm_value("full_scans") - scans,
    }
