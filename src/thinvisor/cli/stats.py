"""``thinvisor host stats`` and ``thinvisor vm stats``: the latest performance figures.

On a logged-in agent they are its latest samples. On the local host there is no agent
memory to ask, so the command measures for itself: two looks, a second apart.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated
from urllib.parse import quote

import typer
from rich.table import Table

from thinvisor.cli import common
from thinvisor.cli.remote import RemoteHost
from thinvisor.host.service import HostService
from thinvisor.host.stats import (
    HostSample,
    HostStats,
    RunningVm,
    StatsSampler,
    VmSample,
    VmStats,
    running_vms,
)

MEASURE_S = 1.0

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

out = common.console()


async def measure(service: HostService, vm: str | None = None) -> StatsSampler:
    """A sampler that has looked twice, ``MEASURE_S`` apart, at the host and its running
    VMs (only at ``vm``, when given)."""

    def running() -> list[RunningVm]:
        found = running_vms(service.inventory)
        return [v for v in found if vm is None or v.name == vm]

    sampler = StatsSampler(None, None, interval_s=MEASURE_S, vms=running)
    await sampler.sample()
    await asyncio.sleep(MEASURE_S)
    await sampler.sample()
    return sampler


async def latest_host(host: common.Host) -> HostSample | None:
    if isinstance(host, RemoteHost):
        response = await host.call("GET", "/host/stats", params={"range": "realtime"})
        return HostStats.model_validate(response.json()).latest
    return (await measure(host)).latest_host


async def latest_vm(host: common.Host, name: str) -> VmSample | None:
    if isinstance(host, RemoteHost):
        path = f"/vms/{quote(name, safe='')}/stats"
        response = await host.call("GET", path, params={"range": "realtime"})
        return VmStats.model_validate(response.json()).latest
    name = host.resolve(name)
    return (await measure(host, name)).latest_vms.get(name)


def host_stats(json_out: JsonOpt = False) -> None:
    """The host's latest CPU, memory, KSM and ballooning figures."""
    sample: HostSample | None = common.run_on_host(latest_host)
    if sample is None:
        common.fail("no statistics yet; the agent has not sampled the host")
    if json_out:
        common.print_json(sample.model_dump(mode="json"))
        return
    rows = [
        ("cpu", f"{_percent(sample.cpu_percent)} of {sample.cpus} CPUs"),
        (
            "memory",
            f"{size(sample.memory_used_bytes)} used of {size(sample.memory_total_bytes)}, "
            f"{size(sample.memory_available_bytes)} available",
        ),
        ("ksm", f"{sample.ksm_pages_sharing} pages sharing, {sample.ksm_pages_shared} shared"),
        ("ballooned", size(sample.memory_ballooned_bytes)),
        ("vms running", str(sample.vms_running)),
        ("sampled", _when(sample.time)),
    ]
    _table(rows)


def vm_stats(
    name: Annotated[str, typer.Argument(help="The VM's name.")], json_out: JsonOpt = False
) -> None:
    """A running VM's latest CPU, memory, disk and network figures."""
    sample: VmSample | None = common.run_on_host(lambda h: latest_vm(h, name))
    if sample is None:
        common.fail(f"vm {name!r} is not running: no statistics")
    if json_out:
        common.print_json(sample.model_dump(mode="json"))
        return
    ballooned = sample.memory_ballooned_bytes
    rows = [
        ("cpu", f"{_percent(sample.cpu_percent)} of a core ({sample.cpu_seconds:.1f} s used)"),
        ("cpu ready", f"{_percent(sample.cpu_ready_percent)} ({sample.cpu_ready_seconds:.1f} s)"),
        ("memory", f"{size(sample.memory_resident_bytes)} resident"),
        ("shared (KSM)", size(sample.memory_shared_bytes)),
        ("ballooned", "no balloon" if ballooned is None else size(ballooned)),
    ]
    if not sample.qmp:
        rows.append(("disks", "unknown: QMP was busy"))
    for disk, d in sorted(sample.disks.items()):
        rows.append((f"disk {disk}", _io(d.read_bytes_per_s, d.write_bytes_per_s, "read", "write")))
    for nic, n in sorted(sample.nics.items()):
        rows.append((f"nic {nic}", _io(n.rx_bytes_per_s, n.tx_bytes_per_s, "rx", "tx")))
    rows += [("pid", str(sample.pid)), ("sampled", _when(sample.time))]
    _table(rows)


def size(n: float) -> str:
    """Bytes for people: 0 B, 512 B, 1.5 KiB, 120.3 MiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def _io(first: float | None, second: float | None, a: str, b: str) -> str:
    def per_s(v: float | None) -> str:
        return "-" if v is None else f"{size(v)}/s"

    return f"{a} {per_s(first)}, {b} {per_s(second)}"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t))


def _table(rows: list[tuple[str, str]]) -> None:
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)
