"""``thinvisor center vm``: every VM of every host, through the center.

A VM is named by its path (``/dc1/prod/host1/web``), its id, or its name where that is
unique across the hosts. Operations wait for their task (progress on a terminal) unless
``--no-wait``, which prints the task's id instead.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from dataclasses import replace
from enum import StrEnum
from typing import Annotated, Any
from urllib.parse import quote

import typer

from thinvisor.cli import common
from thinvisor.cli.center_client import (
    CenterCertificateChanged,
    CenterClient,
    load_center_login,
    on_center,
    print_table,
)
from thinvisor.cli.remote import (
    ConsoleTarget,
    Login,
    attach_console,
    console_target,
    open_console,
)
from thinvisor.console import serial
from thinvisor.errors import InvalidArgument, NotFound

app = typer.Typer(help="VMs of every host, through the center.", no_args_is_help=True)
snapshot_app = typer.Typer(help="Snapshots of a VM.", no_args_is_help=True)
app.add_typer(snapshot_app, name="snapshot")


class MemoryCopyArg(StrEnum):
    AUTO = "auto"
    LIVE = "live"
    PAUSED = "paused"


VmArg = Annotated[str, typer.Argument(help="The VM: its path, id or unique name.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
NoWaitOpt = Annotated[
    bool, typer.Option("--no-wait", help="Print the task's id instead of waiting for it.")
]

POWER_ACTIONS = {
    "start": "Power a VM on.",
    "stop": "Power a VM off at once, as pulling the plug.",
    "shutdown": "Ask a VM's guest to shut down.",
    "reset": "Reset a VM, as the reset button.",
    "pause": "Pause a VM's CPUs.",
    "resume": "Resume a paused or suspended VM.",
    "suspend": "Suspend a VM (where its host can).",
}

out = common.console()


def operation(
    what: Callable[[CenterClient], Awaitable[tuple[str, str, dict[str, Any] | None]]],
    no_wait: bool,
) -> Any:
    """Ask for an operation (``what`` gives method, path and body after looking up what
    it names); its task's result, or with ``no_wait`` the task."""

    async def go(center: CenterClient) -> Any:
        method, path, body = await what(center)
        response = await center.call(method, path, body=body)
        task = response.json()
        title = f"{task['kind']} {task['object']}"
        return await center.result(response, title, wait=not no_wait)

    return on_center(go)


def _run(
    what: Callable[[CenterClient], Awaitable[tuple[str, str, dict[str, Any] | None]]],
    no_wait: bool,
    say: Callable[[Any], str],
    json_out: bool = False,
) -> None:
    """Run an operation (``operation``) and print what ``say`` says of its result, or
    with ``no_wait`` that its task started; with ``json_out``, either as JSON."""
    result = operation(what, no_wait)
    if json_out:
        common.print_json(result)
    elif no_wait:
        typer.echo(f"task {result['id']} started: {result['kind']} {result['object']}")
    else:
        typer.echo(say(result))


def _vm_rows(vms: list[dict[str, Any]]) -> None:
    rows = [
        [
            v["path"],
            v["host"],
            "template" if v["template"] else v["power_state"],
            v["cpus"],
            v["memory_mib"],
        ]
        for v in vms
    ]
    print_table(["PATH", "HOST", "STATE", "CPUS", "MEMORY (MiB)"], rows)


# --- finding VMs ----------------------------------------------------------------------


@app.command("list")
def vm_list(
    host: Annotated[str | None, typer.Option(help="Only this host's: path, id or name.")] = None,
    templates: Annotated[
        bool | None, typer.Option("--templates/--no-templates", help="Only templates, or none.")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Every VM and template of every host (or of one), by path."""

    async def go(center: CenterClient) -> list[dict[str, Any]]:
        host_id = None if host is None else (await center.host(host))["id"]
        found: list[dict[str, Any]] = await center.get("/vms", host=host_id, template=templates)
        return found

    vms = on_center(go)
    if json_out:
        common.print_json(vms)
    else:
        _vm_rows(vms)


@app.command("find")
def vm_find(
    name: Annotated[str, typer.Argument(help="A name, or a pattern with * and ?.")],
    json_out: JsonOpt = False,
) -> None:
    """Find VMs by name across every host: where each is, and its state."""
    vms = on_center(lambda c: c.get("/vms", name=name))
    if json_out:
        common.print_json(vms)
        return
    if not vms:
        common.fail(f"no VM named {name!r} on any host")
    _vm_rows(vms)


@app.command("show")
def vm_show(vm: VmArg, json_out: JsonOpt = False) -> None:
    """One VM as the center knows it."""
    found = on_center(lambda c: c.vm(vm))
    if json_out:
        common.print_json(found)
        return
    state = found["power_state"]
    if state == "unknown" and found.get("last_power_state"):
        state += f" (last known: {found['last_power_state']}; its host is disconnected)"
    rows = [
        ["path", found["path"]],
        ["host", found["host"]],
        ["id on its host", found["ext_id"]],
        ["state", "template" if found["template"] else state],
        ["CPUs", found["cpus"]],
        ["memory", f"{found['memory_mib']} MiB"],
        ["datastores", ", ".join(found["datastores"])],
        ["networks", ", ".join(found["networks"])],
    ]
    print_table(["", ""], rows)


# --- power ----------------------------------------------------------------------------


def _power_command(action: str) -> Callable[[str, bool, bool], None]:
    def command(vm: VmArg, no_wait: NoWaitOpt = False, json_out: JsonOpt = False) -> None:
        async def what(center: CenterClient) -> tuple[str, str, None]:
            found = await center.vm(vm)
            return "POST", f"/vms/{found['id']}/power/{action}", None

        _run(what, no_wait, powered, json_out)

    return command


def powered(result: dict[str, Any]) -> str:
    """What a power action's result says: the VM's state, and where it moved to first
    (a start where its host could not take it)."""
    said = f"vm {result['path']}: {result['power_state']}"
    moved = result.get("moved")
    if moved:
        said += f" (moved from {moved['from']}: {moved['reason']})"
    return said


for _action, _help in POWER_ACTIONS.items():
    app.command(_action, help=_help)(_power_command(_action))


# --- the serial console ---------------------------------------------------------------


@app.command("console")
def vm_console(
    vm: VmArg,
    port: Annotated[
        str | None,
        typer.Option(
            "--serial", help="Which serial port (default: the VM's first).", show_default=False
        ),
    ] = None,
    history: Annotated[int, typer.Option(help="Print this many lines of history first.")] = 0,
) -> None:
    """Attach to a VM's serial console, through the center. Detach with Ctrl-]."""
    found = on_center(lambda c: c.vm(vm))
    target = serial_target(common.guard(load_center_login), found["id"], port)
    if serial.is_terminal():
        typer.echo(f"Connected to {found['path']}. Detach with {serial.DETACH_KEY_NAME}.", err=True)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    common.guard(lambda: attach_console(open_console(target), stdin, stdout, history=history))
    if serial.is_terminal():
        typer.echo("\r\nDetached.", err=True)


def serial_target(login: Login, vm_id: int, port: str | None) -> ConsoleTarget:
    """The center's broker of the VM ``vm_id``'s serial console (``port``: which one)."""
    path = f"/vms/{vm_id}/console/serial"
    if port is not None:
        path += f"?port={quote(port, safe='')}"
    target = console_target(login, path)
    return replace(target, changed=CenterCertificateChanged)


# --- creating, changing, deleting -----------------------------------------------------


@app.command("create")
def vm_create(
    host: Annotated[
        str,
        typer.Argument(
            help="The host: its path, id or name; or a cluster (its path or id), where "
            "placement chooses the host."
        ),
    ],
    name: Annotated[str, typer.Argument(help="The new VM's name.")],
    template: Annotated[
        str | None, typer.Option(help="A template on that host: path, id or name.")
    ] = None,
    cpus: Annotated[
        int | None, typer.Option(min=1, help="CPUs (default: 1, or the template's).")
    ] = None,
    memory: Annotated[
        int | None, typer.Option(min=1, help="Memory in MiB (default: 256, or the template's).")
    ] = None,
    disk: Annotated[int | None, typer.Option(min=1, help="A blank disk of this many MiB.")] = None,
    network: Annotated[str | None, typer.Option(help="A network of the host for a NIC.")] = None,
    no_wait: NoWaitOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Create a VM on a host, or on the host placement chooses in a cluster: from
    scratch, or from a template there (in a cluster: on the template's host)."""

    async def what(center: CenterClient) -> tuple[str, str, dict[str, Any]]:
        found = await _host_or_cluster(center, host)
        body: dict[str, Any] = {"host": found["id"], "name": name, "cpus": cpus}
        body |= {"memory_mib": memory, "disk_mib": disk, "network": network}
        if template is not None:
            on = found["id"] if found["kind"] == "host" else None
            body["template"] = (await _template(center, template, on))["id"]
        return "POST", "/vms", body

    _run(what, no_wait, _said("created"), json_out)


async def _host_or_cluster(center: CenterClient, ref: str) -> dict[str, Any]:
    """A host by path, id or name, or a cluster by path or id (as the node it is)."""
    if ref.startswith("/") or ref.isdecimal():
        node = await center.node(ref)
        if node["kind"] not in ("host", "cluster"):
            raise InvalidArgument("host", f"{node['kind']} {node['path']} is not a host or cluster")
        return node
    return {**await center.host(ref), "kind": "host"}


async def _template(center: CenterClient, ref: str, host_id: int | None) -> dict[str, Any]:
    """A template named by path or id, or by a name unique on the host (None: on every
    host)."""
    if ref.isdecimal() or ref.startswith("/"):
        return await center.vm(ref)
    found = await center.get("/vms", name=ref, host=host_id, template=True)
    if len(found) != 1:
        where = "that host" if host_id is not None else "one host"
        raise NotFound(f"no template named {ref!r} on {where}")
    template: dict[str, Any] = found[0]
    return template


def _said(verb: str) -> Callable[[dict[str, Any]], str]:
    """What to say of a VM that an operation has ``verb`` (created, cloned to)."""
    return lambda vm: f"{verb} vm {vm['path']} ({vm['power_state']})"


@app.command("clone")
def vm_clone(
    vm: VmArg,
    name: Annotated[str, typer.Argument(help="The copy's name.")],
    no_wait: NoWaitOpt = False,
) -> None:
    """Copy a stopped VM or a template, on its host."""

    async def what(center: CenterClient) -> tuple[str, str, dict[str, Any]]:
        found = await center.vm(vm)
        return "POST", f"/vms/{found['id']}/clone", {"name": name}

    _run(what, no_wait, _said("cloned to"))


@app.command("set")
def vm_set(
    vm: VmArg,
    cpus: Annotated[int | None, typer.Option(min=1, help="CPUs.")] = None,
    memory: Annotated[int | None, typer.Option(min=1, help="Memory in MiB.")] = None,
    no_wait: NoWaitOpt = False,
) -> None:
    """Change the CPUs or memory of a stopped VM."""
    if cpus is None and memory is None:
        common.fail("give --cpus, --memory or both")

    async def what(center: CenterClient) -> tuple[str, str, dict[str, Any]]:
        found = await center.vm(vm)
        return "PATCH", f"/vms/{found['id']}", {"cpus": cpus, "memory_mib": memory}

    _run(
        what,
        no_wait,
        lambda result: f"vm {result['path']}: {result['cpus']} CPUs, {result['memory_mib']} MiB",
    )


@app.command("delete")
def vm_delete(vm: VmArg, no_wait: NoWaitOpt = False) -> None:
    """Delete a stopped VM and its disks, on its host."""

    async def what(center: CenterClient) -> tuple[str, str, None]:
        found = await center.vm(vm)
        return "DELETE", f"/vms/{found['id']}", None

    _run(what, no_wait, lambda result: f"deleted vm {result['deleted']}")


# --- migration ------------------------------------------------------------------------


@app.command("migrate")
def vm_migrate(
    vm: VmArg,
    host: Annotated[str, typer.Argument(help="The host to move it to: its path, id or name.")],
    datastore: Annotated[
        str | None,
        typer.Option(
            help="Where its disks go if the host does not see them where they are "
            "(default: the host's default datastore).",
            show_default=False,
        ),
    ] = None,
    downtime_ms: Annotated[
        int, typer.Option(min=10, max=10_000, help="The longest pause of the VM when it switches.")
    ] = 300,
    auto_converge: Annotated[
        bool,
        typer.Option(
            "--auto-converge/--no-auto-converge",
            help="Slow the VM's CPUs down if its memory changes faster than it is copied.",
        ),
    ] = True,
    bandwidth: Annotated[
        int | None,
        typer.Option(
            min=1, max=100_000, help="The most the copy may use, in MiB/s.", show_default=False
        ),
    ] = None,
    memory_copy: Annotated[
        MemoryCopyArg,
        typer.Option(
            help="live: memory copied as the VM runs; paused: the VM paused for the whole "
            "copy; auto: live where the host copies it safely (KVM, or QEMU 9.0 and later).",
        ),
    ] = MemoryCopyArg.AUTO,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Move it even where placement refuses it (a rule of the VM's broken there, "
            "too little room).",
        ),
    ] = False,
    no_wait: NoWaitOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Move a VM to another host of the same provider kind: live if it runs, cold (its
    files moved) if it is stopped.

    Interrupting the command leaves the migration running. To stop it (the VM then stays
    where it was): thinvisor center task cancel ID.
    """

    async def what(center: CenterClient) -> tuple[str, str, dict[str, Any]]:
        found, target = await center.vm(vm), await center.host(host)
        body: dict[str, Any] = {"host": target["id"], "downtime_ms": downtime_ms}
        body |= {"auto_converge": auto_converge, "bandwidth_mib_s": bandwidth, "force": force}
        body["memory_copy"] = memory_copy.value
        if datastore is not None:
            body["datastore"] = datastore
        return "POST", f"/vms/{found['id']}/migrate", body

    if json_out:
        common.print_json(operation(what, no_wait))
    else:
        _run(what, no_wait, migrated)


def migrated(result: dict[str, Any]) -> str:
    """What a migration's result says: where the VM went, how long it took, what moved."""
    live = result.get("live", True)
    said = f"moved {result['source']} to {result['vm']['host']}"
    if isinstance(result.get("total_ms"), int | float):
        said += f" in {result['total_ms'] / 1000:.1f} s"
    details = [] if live else ["cold"]
    if live and isinstance(result.get("downtime_ms"), int | float):
        details.append(f"downtime {result['downtime_ms']:.0f} ms")
        if result.get("memory_copy") == "paused":
            details.append("paused for the memory copy")
    if isinstance(result.get("transferred_bytes"), int | float):
        details.append(f"{result['transferred_bytes'] / (1 << 20):.1f} MiB transferred")
    return said + (f" ({', '.join(details)})" if details else "")


# --- snapshots ------------------------------------------------------------------------

SnapshotArg = Annotated[str, typer.Argument(help="The snapshot: its id or name.")]


@snapshot_app.command("list")
def snapshot_list(vm: VmArg, json_out: JsonOpt = False) -> None:
    """A VM's snapshots, as its host has them."""

    async def go(center: CenterClient) -> list[dict[str, Any]]:
        found = await center.vm(vm)
        snapshots: list[dict[str, Any]] = await center.get(f"/vms/{found['id']}/snapshots")
        return snapshots

    snapshots = on_center(go)
    if json_out:
        common.print_json(snapshots)
        return
    rows = [
        [s["id"], s["name"], s["parent"], "*" if s["current"] else "", s["created"]]
        for s in snapshots
    ]
    print_table(["ID", "NAME", "PARENT", "CURRENT", "CREATED"], rows)


@snapshot_app.command("take")
def snapshot_take(
    vm: VmArg, name: Annotated[str, typer.Argument(help="Its name.")], no_wait: NoWaitOpt = False
) -> None:
    """Take a snapshot of a VM."""

    async def what(center: CenterClient) -> tuple[str, str, dict[str, Any]]:
        found = await center.vm(vm)
        return "POST", f"/vms/{found['id']}/snapshots", {"name": name}

    _run(what, no_wait, lambda result: f"took snapshot {result['name']!r} ({result['id']})")


def _snapshot_command(verb: str, method: str, suffix: str) -> Callable[[str, str, bool], None]:
    def command(vm: VmArg, snapshot: SnapshotArg, no_wait: NoWaitOpt = False) -> None:
        async def what(center: CenterClient) -> tuple[str, str, None]:
            found = await center.vm(vm)
            snap = await _snapshot(center, found, snapshot)
            path = f"/vms/{found['id']}/snapshots/{quote(snap['id'], safe='')}{suffix}"
            return method, path, None

        _run(what, no_wait, lambda result: f"{verb} snapshot {snapshot!r}")

    return command


async def _snapshot(center: CenterClient, vm: dict[str, Any], ref: str) -> dict[str, Any]:
    snapshots: list[dict[str, Any]] = await center.get(f"/vms/{vm['id']}/snapshots")
    by_id = [s for s in snapshots if s["id"] == ref]
    found = by_id or [s for s in snapshots if s["name"] == ref]
    if not found:
        raise NotFound(f"vm {vm['path']}: no snapshot {ref!r}")
    if len(found) > 1:
        raise InvalidArgument("snapshot", f"{len(found)} snapshots are named {ref!r}: give its id")
    return found[0]


snapshot_app.command("revert", help="Revert a VM to a snapshot.")(
    _snapshot_command("reverted to", "POST", "/revert")
)
snapshot_app.command("delete", help="Delete a snapshot (its changes stay in its children).")(
    _snapshot_command("deleted", "DELETE", "")
)
