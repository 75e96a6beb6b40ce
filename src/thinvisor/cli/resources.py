"""``thinvisor vm resources``, ``vm balloon`` and ``vm disk limits``: ESXi's resource
controls from the command line, on the local host or the logged-in agent."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from thinvisor.cli import common
from thinvisor.cli.remote import VmView
from thinvisor.model.resources import DiskLimits, ResourceSpec, ResourceUpdate
from thinvisor.model.vm import validate

NameArg = Annotated[str, typer.Argument(help="The VM's name.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
SharesOpt = Annotated[str | None, typer.Option(help="low, normal, high, or a number.")]
Mhz = Annotated[int | None, typer.Option(help="MHz of the host's cores; a limit of 0 lifts it.")]
Mib = Annotated[int | None, typer.Option(help="MiB; a limit of 0 lifts it.")]
Rate = Annotated[int | None, typer.Option(help="Per second; unset is unlimited.")]


def _shares(value: str | None) -> str | int | None:
    return int(value) if value is not None and value.isdigit() else value


def resources(
    name: NameArg,
    cpu_shares: SharesOpt = None,
    cpu_reservation: Mhz = None,
    cpu_limit: Mhz = None,
    memory_shares: SharesOpt = None,
    memory_reservation: Mib = None,
    memory_limit: Mib = None,
    json_out: JsonOpt = False,
) -> None:
    """Show a VM's shares, reservations and limits, or change those given (at once on a
    running VM; a larger reservation must fit in what the host has unreserved)."""
    changes: dict[str, Any] = {
        "cpu_shares": _shares(cpu_shares),
        "cpu_reservation_mhz": cpu_reservation,
        "cpu_limit_mhz": cpu_limit,
        "memory_shares": _shares(memory_shares),
        "memory_reservation_mib": memory_reservation,
        "memory_limit_mib": memory_limit,
    }
    changes = {k: v for k, v in changes.items() if v is not None}
    if changes:
        update = common.guard(lambda: validate(ResourceUpdate, changes))
        info = common.run_on_host(lambda h: h.set_resources(name, update))
    else:
        info = common.run_on_host(lambda h: h.get_vm(name))
    _print(info, json_out)


def balloon(
    name: NameArg,
    target: Annotated[int, typer.Argument(help="The guest memory to leave it, in MiB.")],
) -> None:
    """Inflate or deflate a running VM's balloon, leaving the guest TARGET MiB."""
    common.run_on_host(lambda h: h.set_limits(name, balloon_mib=target))
    typer.echo(f"{name}: balloon target {target} MiB")


def disk_limits(
    name: NameArg,
    disk: Annotated[str, typer.Argument(help="The disk, e.g. disk0.")],
    iops: Rate = None,
    iops_read: Rate = None,
    iops_write: Rate = None,
    bps: Rate = None,
    bps_read: Rate = None,
    bps_write: Rate = None,
) -> None:
    """Set a disk's I/O limits (IOPS, bytes per second); none given: unlimited."""
    given = {
        "iops_total": iops,
        "iops_read": iops_read,
        "iops_write": iops_write,
        "bps_total": bps,
        "bps_read": bps_read,
        "bps_write": bps_write,
    }
    limits = common.guard(
        lambda: validate(DiskLimits, {k: v for k, v in given.items() if v is not None})
    )
    common.run_on_host(lambda h: h.set_limits(name, disks={disk: limits}))
    shown = ", ".join(f"{k} {v}" for k, v in limits.model_dump(exclude_none=True).items())
    typer.echo(f"{name}: {disk} limits: {shown or 'none'}")


def _print(info: VmView, json_out: bool) -> None:
    spec = info.spec
    if spec is None:
        common.fail(f"vm {info.name!r} is invalid: {info.error}")
    r: ResourceSpec = spec.resources
    if json_out:
        common.print_json(r.model_dump(mode="json"))
        return
    table = Table(show_header=False, box=None)
    unlimited = "unlimited"
    rows = [
        ("cpu shares", str(r.cpu_shares)),
        ("cpu reservation", f"{r.cpu_reservation_mhz} MHz"),
        ("cpu limit", f"{r.cpu_limit_mhz} MHz" if r.cpu_limit_mhz else unlimited),
        ("memory shares", str(r.memory_shares)),
        ("memory reservation", f"{r.memory_reservation_mib} MiB"),
        ("memory limit", f"{r.memory_limit_mib} MiB" if r.memory_limit_mib else unlimited),
        ("page sharing", "on" if r.page_sharing else "off"),
        ("balloon", "yes" if r.balloon else "no"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    common.console().print(table)


def register(vm_app: typer.Typer, disk_app: typer.Typer) -> None:
    """Add these commands to ``thinvisor vm`` and ``thinvisor vm disk``."""
    vm_app.command("resources")(resources)
    vm_app.command("balloon")(balloon)
    disk_app.command("limits")(disk_limits)
