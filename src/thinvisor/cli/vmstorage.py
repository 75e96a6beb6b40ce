"""``thinvisor vm snapshot|clone|deploy|template|export|import``, ``vm disk move|provision``:
a VM's storage, locally or on the logged-in agent."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.tree import Tree

from thinvisor.cli import common
from thinvisor.cli.datastore import split_path
from thinvisor.host.clones import CloneRequest
from thinvisor.host.service import HostService
from thinvisor.model.customization import Customization
from thinvisor.model.vm import validate
from thinvisor.storage.datastore import safe_path
from thinvisor.storage.disk import format_size
from thinvisor.storage.snapshots import Snapshot, SnapshotCreate, SnapshotTree

snapshot_app = typer.Typer(
    help="Take, list, revert and delete a VM's snapshots.", no_args_is_help=True
)
template_app = typer.Typer(
    help="Mark a VM as a template, or make it a VM again.", no_args_is_help=True
)

NameArg = Annotated[str, typer.Argument(help="The VM's name.")]
SnapArg = Annotated[str, typer.Argument(help="The snapshot's id, or its name when unique.")]
DiskArg = Annotated[str, typer.Argument(help="The disk's name, like disk0.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]

out = common.console()


def local_path(host: HostService, datastore: str, path: str) -> Path:
    return safe_path(host.config.datastore(datastore).path, path)


def snapshot_dict(tree: SnapshotTree, snap: Snapshot) -> dict[str, Any]:
    return {
        **snap.model_dump(mode="json"),
        "children": [c.id for c in tree.children(snap.id)],
        "current": tree.current == snap.id,
    }


# --- Snapshots ------------------------------------------------------------------------


@snapshot_app.command("list")
def snapshot_list(name: NameArg, json_out: JsonOpt = False) -> None:
    """The snapshot tree; "<- you are here" marks what the VM's state descends from."""
    tree: SnapshotTree = common.run_on_host(lambda h: h.list_snapshots(name))
    if json_out:
        snaps = [snapshot_dict(tree, s) for s in tree.snapshots]
        common.print_json({"current": tree.current, "snapshots": snaps})
        return
    if not tree.snapshots:
        typer.echo(f"{name}: no snapshots")
        return
    root = Tree(name)

    def add(branch: Tree, parent: int | None) -> None:
        for snap in tree.children(parent):
            memory = ", memory" if snap.memory else ""
            here = "  <- you are here" if tree.current == snap.id else ""
            label = f"{snap.id} {snap.name} ({snap.created}{memory}){here}"
            add(branch.add(label), snap.id)

    add(root, None)
    out.print(root)


@snapshot_app.command("take")
def snapshot_take(
    name: NameArg,
    snapshot: Annotated[str, typer.Argument(help="The new snapshot's name.")],
    description: Annotated[str, typer.Option(help="What the snapshot is for.")] = "",
    memory: Annotated[
        bool, typer.Option("--memory/--no-memory", help="Include a running VM's memory.")
    ] = True,
    json_out: JsonOpt = False,
) -> None:
    """Take a snapshot (with a running VM's memory unless --no-memory)."""
    req = common.guard(
        lambda: validate(
            SnapshotCreate, {"name": snapshot, "description": description, "memory": memory}
        )
    )
    snap: Snapshot = common.run_on_host(lambda h: h.take_snapshot(name, req))
    if json_out:
        common.print_json(snap.model_dump(mode="json"))
    else:
        with_memory = " with memory" if snap.memory else ""
        typer.echo(f"{name}: snapshot {snap.id} {snap.name!r} taken{with_memory}")


@snapshot_app.command("revert")
def snapshot_revert(name: NameArg, snapshot: SnapArg) -> None:
    """Go back to a snapshot; the VM runs again if the snapshot has its memory."""
    snap: Snapshot = common.run_on_host(lambda h: h.revert_snapshot(name, snapshot))
    state = "running" if snap.memory and snap.power_state == "running" else "as it was"
    typer.echo(f"{name}: reverted to snapshot {snap.id} {snap.name!r} ({state})")


@snapshot_app.command("delete")
def snapshot_delete(name: NameArg, snapshot: SnapArg) -> None:
    """Delete a snapshot; its data is merged into what depends on it."""
    snap: Snapshot = common.run_on_host(lambda h: h.delete_snapshot(name, snapshot))
    typer.echo(f"{name}: deleted snapshot {snap.id} {snap.name!r}")


# --- Clones, templates ----------------------------------------------------------------


def clone(
    source: Annotated[str, typer.Argument(help="The VM (or template) to clone.")],
    new_name: Annotated[str, typer.Argument(help="The clone's name.")],
    snapshot: Annotated[
        str | None, typer.Option(help="Clone this snapshot instead of the current state.")
    ] = None,
    linked: Annotated[
        bool, typer.Option("--linked", help="Overlay the source's files instead of copying.")
    ] = False,
    datastore: Annotated[str | None, typer.Option(help="Where the clone goes.")] = None,
    power_on: Annotated[bool, typer.Option("--power-on", help="Start the clone.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """A full (or --linked) clone with a new UUID and new MAC addresses."""
    req = common.guard(
        lambda: validate(
            CloneRequest,
            {
                "name": new_name,
                "snapshot": snapshot,
                "linked": linked,
                "datastore": datastore,
                "power_on": power_on,
            },
        )
    )
    _made(common.run_on_host(lambda h: h.clone_vm(source, req)), "cloned from", source, json_out)


def deploy(
    template: Annotated[str, typer.Argument(help="The template.")],
    new_name: Annotated[str, typer.Argument(help="The new VM's name.")],
    linked: Annotated[
        bool, typer.Option("--linked", help="Overlay the template's files instead of copying.")
    ] = False,
    datastore: Annotated[str | None, typer.Option(help="Where the VM goes.")] = None,
    hostname: Annotated[str | None, typer.Option(help="The guest's host name.")] = None,
    ssh_key: Annotated[
        list[str] | None,
        typer.Option("--ssh-key", help="An authorized SSH public key, or @FILE holding one."),
    ] = None,
    ip: Annotated[
        str | None, typer.Option(help="A static IPv4 address for the first NIC, like 10.0.0.5/24.")
    ] = None,
    gateway: Annotated[str | None, typer.Option(help="The default gateway.")] = None,
    dns: Annotated[list[str] | None, typer.Option(help="A DNS server (repeatable).")] = None,
    power_on: Annotated[bool, typer.Option("--power-on", help="Start the new VM.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """A new VM from a template, customized through a NoCloud (cloud-init) seed."""
    keys = [_key(k) for k in ssh_key or []]
    custom: dict[str, Any] = {"hostname": hostname, "ssh_authorized_keys": keys}
    if ip or gateway or dns:
        custom["network"] = {"address": ip, "gateway": gateway, "dns": dns or []}
    customized = hostname is not None or keys or "network" in custom

    def request() -> CloneRequest:
        data = {
            "name": new_name,
            "linked": linked,
            "datastore": datastore,
            "power_on": power_on,
            "customization": validate(Customization, custom) if customized else None,
        }
        return validate(CloneRequest, data)

    req = common.guard(request)
    _made(
        common.run_on_host(lambda h: h.deploy(template, req)), "deployed from", template, json_out
    )


def _key(text: str) -> str:
    if not text.startswith("@"):
        return text
    try:
        return Path(text[1:]).read_text().strip()
    except OSError as exc:
        common.fail(f"ssh_key: cannot read {text[1:]}: {exc.strerror}")


def _made(info: Any, verb: str, source: str, json_out: bool) -> None:
    if json_out:
        common.print_json(info.to_dict())
    else:
        typer.echo(f"{info.name}: {verb} {source} ({info.state})")


@template_app.command("mark")
def template_mark(name: NameArg) -> None:
    """Mark a stopped VM as a template: it is never powered on; deploy VMs from it."""
    common.run_on_host(lambda h: h.set_template(name, True))
    typer.echo(f"{name}: marked as a template")


@template_app.command("unmark")
def template_unmark(name: NameArg) -> None:
    """Make a template a VM again (refused while linked clones use its disks)."""
    common.run_on_host(lambda h: h.set_template(name, False))
    typer.echo(f"{name}: converted to a VM")


# --- OVF / OVA ------------------------------------------------------------------------


def export(
    name: NameArg,
    target: Annotated[str, typer.Argument(help="DATASTORE/PATH of the .ova to write.")],
) -> None:
    """Export a stopped VM as an OVA (OVF 1.0, stream-optimized VMDK disks)."""
    datastore, path = common.guard(lambda: split_path(target))

    async def go(host: common.Host) -> Any:
        if isinstance(host, HostService):
            return await host.export_ova(name, local_path(host, datastore, path))
        return await host.export_ova(name, datastore, path)

    common.run_on_host(go)
    typer.echo(f"{name}: exported to {target}")


def import_ova(
    source: Annotated[str, typer.Argument(help="DATASTORE/PATH of an .ova or .ovf directory.")],
    name: Annotated[
        str | None, typer.Option(help="The new VM's name (default: the OVF's).")
    ] = None,
    datastore: Annotated[str | None, typer.Option(help="Where the new VM goes.")] = None,
    network: Annotated[str, typer.Option(help="The port group of every NIC.")] = "user",
    json_out: JsonOpt = False,
) -> None:
    """Create a VM from an OVA or OVF (VMware, VirtualBox or thinvisor)."""
    src_ds, src_path = common.guard(lambda: split_path(source))

    async def go(host: common.Host) -> Any:
        if isinstance(host, HostService):
            path = local_path(host, src_ds, src_path)
            return await host.import_ovf(path, name=name, datastore=datastore, network=network)
        return await host.import_ovf(src_ds, src_path, name=name, target=datastore, network=network)

    _made(common.run_on_host(go), "imported from", source, json_out)


# --- Disks ----------------------------------------------------------------------------


def disk_move(
    name: NameArg,
    disk: DiskArg,
    datastore: Annotated[str, typer.Argument(help="The datastore the disk moves to.")],
) -> None:
    """Move a disk to another datastore (mirrored live while the VM runs)."""
    moved = common.run_on_host(lambda h: h.move_disk(name, disk, datastore))
    typer.echo(f"{name}: {disk} moved to {datastore} ({moved.path})")


def disk_provision(
    name: NameArg,
    disk: DiskArg,
    provisioning: Annotated[str, typer.Argument(help="thin or thick.")],
) -> None:
    """Rewrite a stopped VM's disk thick (every block allocated) or thin."""
    if provisioning not in ("thin", "thick"):
        common.fail("provisioning: must be thin or thick")
    common.run_on_host(lambda h: h.set_provisioning(name, disk, provisioning))
    typer.echo(f"{name}: {disk} is now {provisioning}")


def storage(name: NameArg, json_out: JsonOpt = False) -> None:
    """A VM's disks: where they are, their chains, provisioned and used space."""
    usage = common.run_on_host(lambda h: h.datastores.vm_storage(name))
    data = usage.model_dump(mode="json")
    if json_out:
        common.print_json(data)
        return
    for disk in data["disks"]:
        size = disk["virtual_size_bytes"]
        typer.echo(
            f"{disk['name']}: {disk['path']} ({disk['format']}, {disk['provisioning']}) "
            f"{format_size(size) if size else '?'} provisioned, {disk['used_bytes']} bytes used"
        )
        for image in disk["chain"][1:]:
            typer.echo(f"  on {image['path']}")
    typer.echo(
        f"total: {data['provisioned_bytes']} bytes provisioned, {data['used_bytes']} bytes used"
    )


def register(vm_app: typer.Typer, disk_app: typer.Typer) -> None:
    """Add these commands to ``thinvisor vm`` and ``thinvisor vm disk``."""
    vm_app.add_typer(snapshot_app, name="snapshot")
    vm_app.add_typer(template_app, name="template")
    vm_app.command("clone")(clone)
    vm_app.command("deploy")(deploy)
    vm_app.command("export")(export)
    vm_app.command("import")(import_ova)
    vm_app.command("storage")(storage)
    disk_app.command("move")(disk_move)
    disk_app.command("provision")(disk_provision)
