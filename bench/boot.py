"""Appliance boot per machine type: the guest's own uptime on the ready line, and the
wall-clock time from ``POST /vms/{vm}/start`` to that line, for each machine type
thinvisor offers (pc, q35, microvm), thinvisor only, the machine types in turn.

The default machine type should be the fastest one that boots every time. microvm has no
HPET and no PM timer to calibrate the TSC against; thinvisor adds ``tsc_early_khz`` to
its kernel command line, and a boot that does not reach the ready line in time counts as
a failure here instead of stopping the benchmark.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.harness import Comparison, Round, alternate, wait_until
from bench.hosts import ThinvisorHost, gone, log_size, ready_uptime

MACHINES = ("pc", "q35", "microvm")
DEFAULT_MACHINE = "q35"
MEMORY_MIB = 128
READY_TIMEOUT_S = 60.0
GONE_TIMEOUT_S = 60.0


def run(log: Callable[[str], None], rounds: int) -> list[Comparison]:
    """Boot each machine type in turn, ``rounds`` times after a warm-up."""
    uptime = Comparison("appliance boot: guest uptime at the ready line", "boot_uptime", "s")
    wall = Comparison("appliance boot: start request to the ready line", "boot_ready", "s")
    tally = {m: Tally() for m in MACHINES}
    with ThinvisorHost("boot") as host:
        log("boot: starting a thinvisor host")
        host.start()
        with host.token_client() as client:
            contenders = {
                m: boot_round(host, client, define_vm(host, client, m), tally[m]) for m in MACHINES
            }
            log(f"boot: {', '.join(MACHINES)}; {rounds} rounds after a warm-up")
            comparisons = {"boot_uptime": uptime, "boot_ready": wall}
            alternate(contenders, comparisons, rounds=rounds, log=log)
    uptime.notes += summary_notes(uptime, tally)
    wall.notes.append(
        "wall clock from POST /vms/{vm}/start to the ready line in the serial log: "
        "QEMU start, firmware and kernel loading included (pc and q35 run SeaBIOS, "
        "microvm qboot)"
    )
    return [uptime, wall]


@dataclass
class Tally:
    """Boots tried (the warm-up's included) and why the failed ones failed."""

    tried: int = 0
    failures: list[str] = field(default_factory=list)


def define_vm(host: ThinvisorHost, client: httpx.Client, machine: str) -> str:
    name = f"boot-{machine}"
    body = {
        "name": name,
        "memory_mib": MEMORY_MIB,
        "vcpus": 1,
        "machine": machine,
        "appliance": True,
        "graphics": {"kind": "none"},
    }
    host.wait_task(client, client.post("/vms", json=body))
    return name


def wait_boot(serial: Path, offset: int, pid: int) -> float:
    """The guest's uptime on the ready line; raises ``BootFailed`` when QEMU ends first
    or the line does not come in time."""

    def ready() -> float | None:
        uptime = ready_uptime(serial, offset)
        if uptime is None and gone(pid):
            raise BootFailed("QEMU ended before the ready line")
        return uptime

    try:
        return float(wait_until(ready, READY_TIMEOUT_S, "the ready line"))
    except TimeoutError as exc:
        raise BootFailed(str(exc)) from exc


class BootFailed(Exception):
    pass


def boot_round(host: ThinvisorHost, client: httpx.Client, vm: str, tally: Tally) -> Round:
    """Power on, wait for the ready line, power off. A boot that does not get there
    gives no value and is counted in ``tally``."""
    serial = host.serial_log(vm)

    def one() -> dict[str, float]:
        offset = log_size(serial)
        tally.tried += 1
        started = time.monotonic()
        response = client.post(f"/vms/{vm}/start")
        response.raise_for_status()
        pid = response.json().get("pid") or host.qemu_pid(vm)
        try:
            uptime = wait_boot(serial, offset, pid)
            values = {"boot_uptime": uptime, "boot_ready": time.monotonic() - started}
        except BootFailed as exc:
            tally.failures.append(str(exc))
            values = {}
        if not gone(pid):
            client.post(f"/vms/{vm}/stop").raise_for_status()
            wait_until(lambda: gone(pid), GONE_TIMEOUT_S, f"{vm}: QEMU gone")
        return values

    return one


def summary_notes(uptime: Comparison, tally: dict[str, Tally]) -> list[str]:
    """Which machine type booted fastest, and whether every boot succeeded."""
    medians = {m: statistics.median(s.values) for m, s in uptime.series.items() if s.values}
    notes = []
    if medians:
        fastest = min(medians, key=lambda m: medians[m])
        notes.append(f"fastest guest boot: {fastest} (median {medians[fastest]:.3f} s)")
        if DEFAULT_MACHINE in medians and fastest != DEFAULT_MACHINE:
            ratio = medians[fastest] / medians[DEFAULT_MACHINE]
            notes.append(f"{fastest} / {DEFAULT_MACHINE} (the default), medians: {ratio:.2f}")
    for machine, t in tally.items():
        if t.failures:
            why = "; ".join(sorted(set(t.failures)))
            notes.append(f"{machine}: {len(t.failures)} of {t.tried} boots failed ({why})")
        else:
            notes.append(f"{machine}: all {t.tried} boots reached the ready line")
    return notes
