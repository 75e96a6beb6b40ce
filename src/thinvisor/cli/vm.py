"""``thinvisor vm``: create, inspect, power and change VMs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from thinvisor.cli import common
from thinvisor.console import serial
from thinvisor.errors import InvalidArgument
from thinvisor.host.service import CreateOptions, HostService, NewDisk, VmInfo
from thinvisor.model.vm import NicSpec, VmSpec, invalid_argument, validate
from thinvisor.storage.disk import format_size, parse_size

app = typer.Typer(help="Create, inspect, power and change VMs.", no_args_is_help=True)
disk_app = typer.Typer(help="Add, remove and resize a VM's disks.", no_args_is_help=True)
cdrom_app = typer.Typer(
    help="Insert an ISO into a VM's CD-ROM drive, or eject it.", no_args_is_help=True
)
app.add_typer(disk_app, name="disk")
app.add_typer(cdrom_app, name="cdrom")

NameArg = Annotated[str, typer.Argument(help="The VM's name.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

out = Console()


def parse_memory(text: str) -> int:
    """Memory in MiB: a plain number is MiB, or a size like 512M or 2G."""
    if text.strip().isdigit():
        return int(text)
    size = parse_size(text, "memory")
    if size % (1 << 20):
        raise InvalidArgument("memory", "must be a whole number of MiB")
    return size >> 20


def _appliance_boot(cmdline_extra: str) -> tuple[dict[str, Any], Path, Path]:
    from thinvisor.appliance import build_appliance, find_appliance

    cache = common.config().cache_dir
    image = find_appliance(cache) or build_appliance(cache)
    cmdline = f"{image.cmdline} {cmdline_extra}".strip()
    return (
        {"kind": "kernel", "kernel": "vmlinuz", "initrd": "initrd.img", "cmdline": cmdline},
        (image.kernel),
        image.initrd,
    )


@app.command()
def create(
    name: NameArg,
    memory: Annotated[str, typer.Option(help="Memory: MiB, or a size like 1G.")] = "256",
    vcpus: Annotated[int, typer.Option(help="Virtual CPUs.")] = 1,
    machine: Annotated[str, typer.Option(help="Machine type: q35, pc or microvm.")] = "q35",
    appliance: Annotated[
        bool, typer.Option("--appliance", help="Boot the quick-start appliance (built if needed).")
    ] = False,
    kernel: Annotated[Path | None, typer.Option(help="Boot this kernel directly.")] = None,
    initrd: Annotated[Path | None, typer.Option(help="The initrd for --kernel.")] = None,
    boot_order: Annotated[
        str | None,
        typer.Option(help="Firmware boot order without a kernel, like cdrom,disk [disk,cdrom]."),
    ] = None,
    cmdline: Annotated[
        str, typer.Option(help="Kernel command line (added to the appliance's).")
    ] = "",
    disk: Annotated[
        list[str] | None,
        typer.Option("--disk", help="Add a new thin disk of this size (repeatable)."),
    ] = None,
    import_disk: Annotated[
        list[Path] | None,
        typer.Option("--import-disk", help="Add a copy of this image as a disk (repeatable)."),
    ] = None,
    disk_bus: Annotated[
        str, typer.Option(help="Bus of new disks: virtio, scsi or ide.")
    ] = "virtio",
    disk_format: Annotated[str, typer.Option(help="Format of new disks: qcow2 or raw.")] = "qcow2",
    cdrom: Annotated[
        Path | None, typer.Option(help="An ISO in a datastore for the CD-ROM.")
    ] = None,
    no_cdrom: Annotated[bool, typer.Option("--no-cdrom", help="No CD-ROM drive.")] = False,
    nic: Annotated[
        list[str] | None, typer.Option("--nic", help="A NIC on this network [default: user].")
    ] = None,
    no_nic: Annotated[bool, typer.Option("--no-nic", help="No network card.")] = False,
    parallel: Annotated[bool, typer.Option("--parallel", help="Add a parallel port.")] = False,
    graphics: Annotated[str, typer.Option(help="Graphical console: vnc or none.")] = "vnc",
    autostart: Annotated[bool, typer.Option("--autostart", help="Start with the host.")] = False,
    datastore: Annotated[str | None, typer.Option(help="Datastore [default: the first].")] = None,
    from_file: Annotated[
        Path | None, typer.Option("--from-file", help="Take the whole spec from this vm.toml.")
    ] = None,
    start: Annotated[bool, typer.Option("--start", help="Power the VM on once created.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Create a VM (and its disks) in a datastore."""
    options = CreateOptions(datastore=datastore)

    def build() -> dict[str, Any]:
        if from_file is not None:
            import tomllib

            try:
                data: dict[str, Any] = tomllib.loads(from_file.read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise InvalidArgument("from-file", str(exc)) from exc
            data["name"] = name
            return data
        data = {
            "name": name,
            "vcpus": vcpus,
            "memory_mib": parse_memory(memory),
            "machine": machine,
            "graphics": {"kind": graphics},
            "autostart": autostart,
        }
        if appliance:
            data["boot"], options.kernel_source, options.initrd_source = _appliance_boot(cmdline)
        elif kernel is not None:
            data["boot"] = {"kind": "kernel", "kernel": "vmlinuz", "cmdline": cmdline}
            options.kernel_source = kernel.absolute()
            if initrd is not None:
                data["boot"]["initrd"] = "initrd.img"
                options.initrd_source = initrd.absolute()
        if boot_order is not None:
            if "boot" in data:
                raise InvalidArgument("boot-order", "applies to firmware boot, not a kernel")
            data["boot"] = {"kind": "firmware", "order": boot_order.split(",")}
        if not no_cdrom and machine != "microvm":
            data["cdrom"] = {"path": str(cdrom.absolute()) if cdrom else None}
            if appliance:
                # The appliance's kernel has no AHCI driver: its CD-ROM sits on virtio-scsi.
                data["cdrom"]["bus"] = "scsi"
        if parallel:
            data["parallel"] = {"enabled": True}
        new: list[dict[str, Any]] = [{"size": parse_size(s, "disk")} for s in disk or []]
        new += [{"source": p.absolute()} for p in import_disk or []]
        options.new_disks = [
            validate(NewDisk, {**d, "bus": disk_bus, "format": disk_format}) for d in new
        ]
        return data

    data = common.guard(build)

    async def go(svc: HostService) -> VmInfo:
        spec = _validated(data)
        if from_file is None and not no_nic:
            nics: list[NicSpec] = []
            for network in nic or ["user"]:
                probe = spec.model_copy(update={"nics": nics})
                nics.append(svc.new_nic(probe, network))
            spec = _validated({**spec.model_dump(), "nics": [n.model_dump() for n in nics]})
        info = await svc.create_vm(spec, options)
        return await svc.start(name) if start else info

    info = common.run(go)
    _print_info(info, json_out)


def _validated(data: dict[str, Any]) -> VmSpec:
    from pydantic import ValidationError

    try:
        return VmSpec.model_validate(data)
    except ValidationError as exc:
        raise invalid_argument(exc) from None


@app.command("list")
def list_vms(json_out: JsonOpt = False) -> None:
    """List the host's VMs with their state."""
    vms: list[VmInfo] = common.run(lambda s: s.list_vms())
    if json_out:
        common.print_json([v.to_dict() for v in vms])
        return
    table = Table(box=None, header_style="bold")
    for col in ("NAME", "STATE", "VCPUS", "MEMORY", "DATASTORE", "NOTE"):
        table.add_column(col)
    for v in vms:
        note = v.error or (v.stop_reason if v.state in ("stopped", "suspended") else "") or ""
        cpus = str(v.spec.vcpus) if v.spec else "-"
        mem = f"{v.spec.memory_mib} MiB" if v.spec else "-"
        table.add_row(v.name, v.state, cpus, mem, v.datastore, note)
    out.print(table)


def _print_info(v: VmInfo, json_out: bool) -> None:
    if json_out:
        common.print_json(v.to_dict())
        return
    rows: list[tuple[str, str]] = [("name", v.name), ("state", v.state)]
    if v.error:
        rows.append(("error", v.error))
    if v.stop_reason and v.state in ("stopped", "suspended"):
        rows.append(("last stop", v.stop_reason))
    if v.pid:
        rows.append(("pid", str(v.pid)))
    if v.spec is not None:
        s = v.spec
        rows += [
            ("uuid", s.uuid),
            ("vcpus", str(s.vcpus)),
            ("memory", f"{s.memory_mib} MiB"),
            ("machine", s.machine),
            ("boot", _boot_text(s)),
            ("autostart", str(s.autostart)),
        ]
        rows += [(f"disk {d.name}", f"{d.path} ({d.format}, {d.bus})") for d in s.disks]
        if s.cdrom is not None:
            rows.append(("cdrom", s.cdrom.path or "(empty)"))
        rows += [(f"nic {n.name}", f"{n.model} {n.mac} on {n.network}") for n in s.nics]
        rows += [(f"serial {p.name}", str(v.paths.serial_log(p.name))) for p in s.serials]
        rows.append(("graphics", s.graphics.kind))
    rows += [("datastore", v.datastore), ("directory", str(v.paths.vm_dir))]
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)


def _boot_text(spec: VmSpec) -> str:
    if spec.boot.kind == "kernel":
        return f"kernel {spec.boot.kernel} ({spec.boot.cmdline})"
    return "firmware: " + ", ".join(spec.boot.order)


@app.command()
def show(name: NameArg, json_out: JsonOpt = False) -> None:
    """Show a VM's configuration and state."""
    _print_info(common.run(lambda s: s.get_vm(name)), json_out)


def _power(verb: str, help_text: str) -> None:
    def command(name: NameArg, json_out: JsonOpt = False) -> None:
        info = common.run(lambda s: getattr(s, verb)(name))
        if json_out:
            common.print_json(info.to_dict())
        else:
            typer.echo(f"{name}: {info.state}")

    command.__doc__ = help_text
    app.command(name=verb)(command)


_power("start", "Power a VM on (a suspended VM resumes from disk).")
_power("stop", "Power a VM off at once, like pulling the plug.")
_power("reset", "Reset a VM, like pressing its reset button.")
_power("pause", "Pause a VM's CPUs.")
_power("resume", "Resume a paused VM, or a suspended one from disk.")
_power("suspend", "Save a VM's memory to disk and stop it.")


@app.command()
def shutdown(
    name: NameArg,
    timeout: Annotated[
        float | None, typer.Option(help="Seconds before a hard power off [default: 60].")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Shut a VM down through ACPI; powered off hard if the guest does not within --timeout."""
    info = common.run(lambda s: s.shutdown(name, timeout))
    if json_out:
        common.print_json(info.to_dict())
    else:
        typer.echo(f"{name}: {info.state} ({info.stop_reason})")


@app.command()
def delete(name: NameArg) -> None:
    """Delete a VM and all the files in its directory (refused while it runs)."""
    common.run(lambda s: s.delete_vm(name))
    typer.echo(f"{name}: deleted")


@app.command()
def console(
    name: NameArg,
    port: Annotated[str, typer.Option("--serial", help="Which serial port.")] = "serial0",
    history: Annotated[int, typer.Option(help="Print this many lines of history first.")] = 0,
) -> None:
    """Attach to a VM's serial console. Detach with Ctrl-]."""
    info: VmInfo = common.run(lambda s: s.get_vm(name))
    if info.state not in ("running", "paused"):
        common.fail(f"vm {name!r}: cannot attach the console while {info.state}")
    if info.spec is None or all(p.name != port for p in info.spec.serials):
        common.fail(f"serial: vm {name!r} has no serial port {port!r}")
    if history:
        sys.stdout.buffer.write(serial.history(info.paths.serial_log(port), history))
        sys.stdout.buffer.flush()
    if serial.is_terminal():
        typer.echo(f"Connected to {name} ({port}). Detach with {serial.DETACH_KEY_NAME}.", err=True)
    common.guard(
        lambda: serial.attach(info.paths.serial_socket(port), sys.stdin.buffer, sys.stdout.buffer)
    )
    if serial.is_terminal():
        typer.echo("\r\nDetached.", err=True)


@disk_app.command("add")
def disk_add(
    name: NameArg,
    size: Annotated[str | None, typer.Option(help="Size of a new thin disk, like 10G.")] = None,
    import_image: Annotated[
        Path | None, typer.Option("--import", help="Copy this image in as the new disk.")
    ] = None,
    bus: Annotated[str, typer.Option(help="virtio, scsi or ide (running VMs: virtio).")] = "virtio",
    fmt: Annotated[str, typer.Option("--format", help="qcow2 or raw.")] = "qcow2",
    json_out: JsonOpt = False,
) -> None:
    """Add a disk; hot-plugged when the VM is running."""
    if size is None and import_image is None:
        common.fail("size: give --size or --import")
    new = common.guard(
        lambda: validate(
            NewDisk,
            {
                "size": parse_size(size, "size") if size else None,
                "source": import_image.absolute() if import_image else None,
                "bus": bus,
                "format": fmt,
            },
        )
    )
    disk = common.run(lambda s: s.add_disk(name, new))
    if json_out:
        common.print_json(disk.model_dump(mode="json"))
    else:
        typer.echo(f"{name}: added {disk.name} ({disk.path}, {disk.format}, {disk.bus})")


@disk_app.command("remove")
def disk_remove(
    name: NameArg,
    disk: Annotated[str, typer.Argument(help="The disk's name, like disk1.")],
    keep_file: Annotated[bool, typer.Option("--keep-file", help="Keep the image file.")] = False,
) -> None:
    """Remove a disk; hot-unplugged when the VM is running."""
    common.run(lambda s: s.remove_disk(name, disk, keep_file=keep_file))
    typer.echo(f"{name}: removed {disk}")


@disk_app.command("resize")
def disk_resize(
    name: NameArg,
    disk: Annotated[str, typer.Argument(help="The disk's name, like disk0.")],
    size: Annotated[str, typer.Argument(help="The new size, like 20G, or +5G to grow by.")],
) -> None:
    """Grow a disk (also while the VM runs)."""

    async def go(svc: HostService) -> int:
        target = parse_size(size.lstrip("+"), "size")
        if size.startswith("+"):
            entry, spec = svc.inventory.get_valid(name)
            d = spec.disk(disk)
            if d is not None:
                target += (await svc.images.info(entry.paths.resolve(d.path))).virtual_size
        await svc.resize_disk(name, disk, target)
        return target

    target = common.run(go)
    typer.echo(f"{name}: {disk} is now {format_size(target)}")


@cdrom_app.command("insert")
def cdrom_insert(
    name: NameArg,
    iso: Annotated[Path, typer.Argument(help="An ISO image in a datastore.")],
) -> None:
    """Insert an ISO into the CD-ROM drive (also while the VM runs)."""
    common.run(lambda s: s.insert_cdrom(name, iso.absolute()))
    typer.echo(f"{name}: inserted {iso}")


@cdrom_app.command("eject")
def cdrom_eject(name: NameArg) -> None:
    """Eject the CD-ROM drive's medium."""
    common.run(lambda s: s.eject_cdrom(name))
    typer.echo(f"{name}: ejected")
