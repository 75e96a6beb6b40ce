"""``thinvisor vm``: create, inspect, power and change VMs."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from thinvisor.cli import common, remote, resources, stats, vmstorage
from thinvisor.cli.remote import VmView
from thinvisor.console import serial
from thinvisor.errors import InvalidArgument, ThinvisorError
from thinvisor.host.service import HostService, VmInfo
from thinvisor.model.create import NewDiskSpec, NewNicSpec, NicUpdate, VmCreate
from thinvisor.model.vm import (
    Bandwidth,
    KernelBoot,
    NicShaping,
    NicSpec,
    VmSpec,
    VmUpdate,
    validate,
)
from thinvisor.storage.disk import format_size, parse_size

app = typer.Typer(help="Create, inspect, power and change VMs.", no_args_is_help=True)
disk_app = typer.Typer(help="Add, remove and resize a VM's disks.", no_args_is_help=True)
cdrom_app = typer.Typer(
    help="Insert an ISO into a VM's CD-ROM drive, or eject it.", no_args_is_help=True
)
nic_app = typer.Typer(
    help="Add, remove, connect and change a VM's network cards.", no_args_is_help=True
)
app.add_typer(disk_app, name="disk")
app.add_typer(cdrom_app, name="cdrom")
app.add_typer(nic_app, name="nic")
vmstorage.register(app, disk_app)
resources.register(app, disk_app)

NameArg = Annotated[str, typer.Argument(help="The VM's name.")]
NicArg = Annotated[str, typer.Argument(help="The NIC's name, like net0.")]
BANDWIDTH_HELP = "AVG[:PEAK[:BURST]] in kbit/s, kbit/s and KiB"
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

out = common.console()


def parse_memory(text: str) -> int:
    """Memory in MiB: a plain number is MiB, or a size like 512M or 2G."""
    if text.strip().isdigit():
        return int(text)
    size = parse_size(text, "memory")
    if size % (1 << 20):
        raise InvalidArgument("memory", "must be a whole number of MiB")
    return size >> 20


@app.command()
def create(
    name: NameArg,
    memory: Annotated[str, typer.Option(help="Memory: MiB, or a size like 1G.")] = "256",
    vcpus: Annotated[int, typer.Option(help="Virtual CPUs.")] = 1,
    machine: Annotated[str, typer.Option(help="Machine type: q35, pc or microvm.")] = "q35",
    appliance: Annotated[
        bool, typer.Option("--appliance", help="Boot the quick-start appliance (built if needed).")
    ] = False,
    kernel: Annotated[
        Path | None,
        typer.Option(help="Boot this kernel directly (on a remote host: a file in a datastore)."),
    ] = None,
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
        list[str] | None,
        typer.Option(
            "--network",
            "--nic",
            help="A NIC on this port group, or user (repeatable; default: one on user).",
        ),
    ] = None,
    no_nic: Annotated[bool, typer.Option("--no-nic", help="No network card.")] = False,
    parallel: Annotated[bool, typer.Option("--parallel", help="Add a parallel port.")] = False,
    graphics: Annotated[str, typer.Option(help="Graphical console: vnc or none.")] = "vnc",
    autostart: Annotated[bool, typer.Option("--autostart", help="Start with the host.")] = False,
    datastore: Annotated[str | None, typer.Option(help="Datastore [default: the first].")] = None,
    from_file: Annotated[
        Path | None,
        typer.Option("--from-file", help="Take the whole creation request from this TOML file."),
    ] = None,
    start: Annotated[bool, typer.Option("--start", help="Power the VM on once created.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Create a VM (and its disks) in a datastore."""
    local = common.remote_login() is None
    # A local kernel is copied into the VM's directory; a remote one is a file on the host.
    local_kernel = kernel if local and kernel is not None and not appliance else None

    def build() -> dict[str, Any]:
        if from_file is not None:
            data = _read_request(from_file)
            data["name"] = name
            if datastore is not None:
                data["datastore"] = datastore
            return data
        data = {
            "name": name,
            "vcpus": vcpus,
            "memory_mib": parse_memory(memory),
            "machine": machine,
            "graphics": {"kind": graphics},
            "autostart": autostart,
        }
        if datastore is not None:
            data["datastore"] = datastore
        if appliance:
            data["appliance"] = True
        elif kernel is not None and not local:
            data["boot"] = {"kind": "kernel", "kernel": str(kernel), "cmdline": cmdline}
            if initrd is not None:
                data["boot"]["initrd"] = str(initrd)
        if boot_order is not None:
            if appliance or kernel is not None:
                raise InvalidArgument("boot-order", "applies to firmware boot, not a kernel")
            data["boot"] = {"kind": "firmware", "order": boot_order.split(",")}
        if not no_cdrom and machine != "microvm":
            data["cdrom"] = {"path": _host_path(cdrom, local) if cdrom else None}
        if parallel:
            data["parallel"] = {"enabled": True}
        new: list[dict[str, Any]] = [{"size": parse_size(s, "disk")} for s in disk or []]
        new += [{"source": _host_path(p, local)} for p in import_disk or []]
        data["disks"] = [
            validate(NewDiskSpec, {**d, "bus": disk_bus, "format": disk_format}).model_dump(
                mode="json", exclude_none=True
            )
            for d in new
        ]
        if not no_nic:
            data["nics"] = [{"network": network} for network in nic or ["user"]]
        return data

    req: VmCreate = common.guard(lambda: validate(VmCreate, build()))

    async def go(host: common.Host) -> VmView:
        if local_kernel is not None:
            _check_files(local_kernel, initrd)
        info: VmView = await host.create_from(req)
        if local_kernel is not None:
            info = await _finish(
                host, name, _boot_local_kernel(host, info, local_kernel, initrd, cmdline)
            )
        elif appliance and cmdline and info.spec and isinstance(info.spec.boot, KernelBoot):
            extra = f"{info.spec.boot.cmdline} {cmdline}"
            boot = _kernel_boot(info.spec.boot.kernel, info.spec.boot.initrd, extra)
            info = await _finish(host, name, host.update_vm(name, VmUpdate(boot=boot)))
        return await host.start(name) if start else info

    info = common.run_on_host(go)
    _print_info(info, json_out)


def _read_request(path: Path) -> dict[str, Any]:
    import tomllib

    try:
        data: dict[str, Any] = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InvalidArgument("from-file", str(exc)) from exc
    return data


def _host_path(path: Path, local: bool) -> str:
    """A path on the host: a local one made absolute, a remote one as given."""
    return str(path.absolute()) if local else str(path)


def _check_files(kernel: Path, initrd: Path | None) -> None:
    for field_name, path in (("kernel", kernel), ("initrd", initrd)):
        if path is not None and not path.is_file():
            raise InvalidArgument(field_name, f"{path} does not exist")


async def _finish(host: common.Host, name: str, step: Awaitable[VmView]) -> VmView:
    """The last step of a creation; the new VM is deleted if it fails (all or nothing)."""
    try:
        return await step
    except BaseException:
        with contextlib.suppress(ThinvisorError):
            await host.delete_vm(name)
        raise


async def _boot_local_kernel(
    host: common.Host, info: VmView, kernel: Path, initrd: Path | None, cmdline: str
) -> VmView:
    """Copy a kernel (and initrd) into a new local VM's directory and boot it directly."""
    copies = [("kernel", kernel, "vmlinuz"), ("initrd", initrd, "initrd.img")]
    for field_name, source, target in copies:
        try:
            if source is not None:
                await asyncio.to_thread(shutil.copyfile, source, info.paths.vm_dir / target)
        except OSError as exc:
            raise InvalidArgument(field_name, f"cannot copy {source}: {exc.strerror}") from exc
    boot = _kernel_boot("vmlinuz", "initrd.img" if initrd else None, cmdline)
    return await host.update_vm(info.name, VmUpdate(boot=boot))


def _kernel_boot(kernel: str, initrd: str | None, cmdline: str) -> KernelBoot:
    # Every field given: VmUpdate applies only the fields set, nested ones too.
    return KernelBoot(kind="kernel", kernel=kernel, initrd=initrd, cmdline=cmdline)


@app.command("list")
def list_vms(json_out: JsonOpt = False) -> None:
    """List the host's VMs with their state."""
    vms: list[VmView] = common.run_on_host(lambda s: s.list_vms())
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


def _print_info(v: VmView, json_out: bool) -> None:
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
        rows += [(f"nic {n.name}", _nic_text(n)) for n in s.nics]
        rows += [(f"serial {p.name}", str(v.paths.serial_log(p.name))) for p in s.serials]
        rows.append(("graphics", s.graphics.kind))
    rows += [("datastore", v.datastore), ("directory", str(v.paths.vm_dir))]
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)


def _nic_text(nic: NicSpec) -> str:
    text = f"{nic.model} {nic.mac} on {nic.network}"
    return text if nic.connected else f"{text} (disconnected)"


def _boot_text(spec: VmSpec) -> str:
    if spec.boot.kind == "kernel":
        return f"kernel {spec.boot.kernel} ({spec.boot.cmdline})"
    return "firmware: " + ", ".join(spec.boot.order)


@app.command()
def show(name: NameArg, json_out: JsonOpt = False) -> None:
    """Show a VM's configuration and state."""
    _print_info(common.run_on_host(lambda s: s.get_vm(name)), json_out)


app.command("stats")(stats.vm_stats)


@app.command("set")
def set_settings(
    name: NameArg,
    memory: Annotated[str | None, typer.Option(help="Memory: MiB, or a size like 1G.")] = None,
    vcpus: Annotated[int | None, typer.Option(help="Virtual CPUs.")] = None,
    autostart: Annotated[
        bool | None, typer.Option("--autostart/--no-autostart", help="Start with the host.")
    ] = None,
    autostart_order: Annotated[
        int | None, typer.Option(help="Autostart position (lower starts first).")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Change a stopped VM's settings; only the options given change."""
    changes: dict[str, Any] = {
        "vcpus": vcpus,
        "autostart": autostart,
        "autostart_order": autostart_order,
    }
    if memory is not None:
        changes["memory_mib"] = common.guard(lambda: parse_memory(memory))
    changes = {k: v for k, v in changes.items() if v is not None}
    if not changes:
        common.fail("settings: give at least one option to change")
    update = common.guard(lambda: validate(VmUpdate, changes))
    _print_info(common.run_on_host(lambda s: s.update_vm(name, update)), json_out)


def _power(verb: str, help_text: str) -> None:
    def command(name: NameArg, json_out: JsonOpt = False) -> None:
        info = common.run_on_host(lambda s: getattr(s, verb)(name))
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
    info = common.run_on_host(lambda s: s.shutdown(name, timeout))
    if json_out:
        common.print_json(info.to_dict())
    else:
        typer.echo(f"{name}: {info.state} ({info.stop_reason})")


@app.command()
def delete(name: NameArg) -> None:
    """Delete a VM and all the files in its directory (refused while it runs)."""
    common.run_on_host(lambda s: s.delete_vm(name))
    typer.echo(f"{name}: deleted")


@app.command()
def console(
    name: NameArg,
    port: Annotated[str, typer.Option("--serial", help="Which serial port.")] = "serial0",
    history: Annotated[int, typer.Option(help="Print this many lines of history first.")] = 0,
) -> None:
    """Attach to a VM's serial console. Detach with Ctrl-]."""
    login = common.remote_login()
    info: VmView = common.run_on_host(lambda s: s.get_vm(name))
    if info.state not in ("running", "paused"):
        common.fail(f"vm {name!r}: cannot attach the console while {info.state}")
    if info.spec is None or all(p.name != port for p in info.spec.serials):
        common.fail(f"serial: vm {name!r} has no serial port {port!r}")
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    if login is None and history:
        stdout.write(serial.history(info.paths.serial_log(port), history))
        stdout.flush()
    if serial.is_terminal():
        typer.echo(f"Connected to {name} ({port}). Detach with {serial.DETACH_KEY_NAME}.", err=True)
    if login is not None:
        common.guard(
            lambda: remote.attach_serial(login, name, port, stdin, stdout, history=history)
        )
    else:
        assert isinstance(info, VmInfo)
        common.guard(lambda: serial.attach(info.paths.serial_socket(port), stdin, stdout))
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
    local = common.remote_login() is None
    if size is None and import_image is None:
        common.fail("size: give --size or --import")
    new = common.guard(
        lambda: validate(
            NewDiskSpec,
            {
                "size": parse_size(size, "size") if size else None,
                "source": _host_path(import_image, local) if import_image else None,
                "bus": bus,
                "format": fmt,
            },
        )
    )
    disk = common.run_on_host(lambda s: s.add_disk(name, new))
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
    common.run_on_host(lambda s: s.remove_disk(name, disk, keep_file=keep_file))
    typer.echo(f"{name}: removed {disk}")


@disk_app.command("resize")
def disk_resize(
    name: NameArg,
    disk: Annotated[str, typer.Argument(help="The disk's name, like disk0.")],
    size: Annotated[str, typer.Argument(help="The new size, like 20G, or +5G to grow by.")],
) -> None:
    """Grow a disk (also while the VM runs)."""

    async def go(host: common.Host) -> int:
        target = parse_size(size.lstrip("+"), "size")
        if size.startswith("+"):
            target += await _disk_size(host, name, disk)
        await host.resize_disk(name, disk, target)
        return target

    target = common.run_on_host(go)
    typer.echo(f"{name}: {disk} is now {format_size(target)}")


async def _disk_size(host: common.Host, name: str, disk: str) -> int:
    """A disk's virtual size in bytes (0 for a disk the VM does not have)."""
    if not isinstance(host, HostService):
        raise InvalidArgument("size", "a remote host does not tell a disk's size: give it whole")
    entry, spec = host.inventory.get_valid(name)
    d = spec.disk(disk)
    if d is None:
        return 0
    return (await host.images.info(entry.paths.resolve(d.path))).virtual_size


@cdrom_app.command("insert")
def cdrom_insert(
    name: NameArg,
    iso: Annotated[Path, typer.Argument(help="An ISO image in a datastore.")],
) -> None:
    """Insert an ISO into the CD-ROM drive (also while the VM runs)."""
    login = common.remote_login()
    path = iso if login is not None else iso.absolute()
    common.run_on_host(lambda s: s.insert_cdrom(name, path))
    typer.echo(f"{name}: inserted {iso}")


@cdrom_app.command("eject")
def cdrom_eject(name: NameArg) -> None:
    """Eject the CD-ROM drive's medium."""
    common.run_on_host(lambda s: s.eject_cdrom(name))
    typer.echo(f"{name}: ejected")


def parse_bandwidth(text: str, option: str) -> dict[str, int] | None:
    """``AVG[:PEAK[:BURST]]`` (kbit/s, kbit/s, KiB) as a ``Bandwidth``'s fields; ``none``
    for no limit. PEAK may be left empty: ``1000::64``."""
    if text.strip().lower() == "none":
        return None
    parts = [p.strip() for p in text.split(":")]
    fields = ("average_kbps", "peak_kbps", "burst_kib")
    if len(parts) > len(fields) or not parts[0] or not all(p.isdigit() for p in parts if p):
        raise InvalidArgument(option, f"{text!r} is not {BANDWIDTH_HELP}")
    return {field: int(p) for field, p in zip(fields, parts, strict=False) if p}


def nic_shaping(
    inbound: str | None, outbound: str | None, current: NicShaping | None = None
) -> NicShaping | None:
    """``current`` with the directions given (``AVG[:PEAK[:BURST]]`` or ``none``) replaced;
    None when neither direction is limited."""
    limits: dict[str, Bandwidth | dict[str, int] | None] = {
        "inbound": current.inbound if current else None,
        "outbound": current.outbound if current else None,
    }
    for option, text in (("inbound", inbound), ("outbound", outbound)):
        if text is not None:
            limits[option] = parse_bandwidth(text, option)
    shaping = validate(NicShaping, limits)
    return None if shaping.inbound is None and shaping.outbound is None else shaping


def _bandwidth_text(b: Bandwidth) -> str:
    parts = [str(b.average_kbps), str(b.peak_kbps or ""), str(b.burst_kib or "")]
    return ":".join(parts).rstrip(":")


def _shaping_text(shaping: NicShaping | None) -> str:
    if shaping is None:
        return "-"
    limits = [("in", shaping.inbound), ("out", shaping.outbound)]
    return ", ".join(f"{way} {_bandwidth_text(b)}" for way, b in limits if b is not None)


InboundOpt = Annotated[
    str | None, typer.Option(help=f"Limit traffic to the guest: {BANDWIDTH_HELP}, or none.")
]
OutboundOpt = Annotated[
    str | None, typer.Option(help=f"Limit traffic from the guest: {BANDWIDTH_HELP}, or none.")
]


@nic_app.command("list")
def nic_list(name: NameArg, json_out: JsonOpt = False) -> None:
    """List a VM's NICs: port group, link, TAP while running, DHCP address, shaping."""
    nics: list[dict[str, Any]] = common.run_on_host(lambda s: s.list_nics(name))
    if json_out:
        common.print_json(nics)
        return
    table = Table(box=None, header_style="bold")
    for col in ("NAME", "MODEL", "MAC", "NETWORK", "LINK", "TAP", "IP", "SHAPING"):
        table.add_column(col)
    for n in nics:
        shaping = NicShaping.model_validate(n["shaping"]) if n.get("shaping") else None
        link = "up" if n["connected"] else "down"
        row = (n["name"], n["model"], n["mac"], n["network"], link, n["tap"], n["ip"])
        table.add_row(*(v or "-" for v in row), _shaping_text(shaping))
    out.print(table)


def _print_nic(nic: NicSpec, message: str, json_out: bool) -> None:
    if json_out:
        common.print_json(nic.model_dump(mode="json"))
    else:
        typer.echo(message)


@nic_app.command("add")
def nic_add(
    name: NameArg,
    network: Annotated[str, typer.Option("--network", help="The port group to join, or user.")],
    model: Annotated[
        str, typer.Option(help="virtio, e1000 or rtl8139 (running VMs: virtio).")
    ] = "virtio",
    mac: Annotated[str | None, typer.Option(help="The MAC (default: a new one).")] = None,
    disconnected: Annotated[
        bool, typer.Option("--disconnected", help="Add it with its cable unplugged.")
    ] = False,
    inbound: InboundOpt = None,
    outbound: OutboundOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Add a NIC; hot-plugged when the VM is running."""

    def build() -> NewNicSpec:
        data: dict[str, Any] = {"network": network, "model": model, "mac": mac}
        if disconnected:
            data["connected"] = False
        data["shaping"] = nic_shaping(inbound, outbound)
        return validate(NewNicSpec, {k: v for k, v in data.items() if v is not None})

    new = common.guard(build)
    nic: NicSpec = common.run_on_host(lambda s: s.add_nic(name, new))
    _print_nic(nic, f"{name}: added {nic.name} ({_nic_text(nic)})", json_out)


@nic_app.command("remove")
def nic_remove(name: NameArg, nic: NicArg) -> None:
    """Remove a NIC; on a running VM the guest is asked to release it first."""
    common.run_on_host(lambda s: s.remove_nic(name, nic))
    typer.echo(f"{name}: removed {nic}")


def _cable(verb: str, connected: bool, help_text: str) -> None:
    def command(name: NameArg, nic: NicArg, json_out: JsonOpt = False) -> None:
        change = NicUpdate(connected=connected)
        spec: NicSpec = common.run_on_host(lambda s: s.update_nic(name, nic, change))
        _print_nic(spec, f"{name}: {spec.name} {verb}ed", json_out)

    command.__doc__ = help_text
    nic_app.command(name=verb)(command)


_cable("connect", True, "Plug a NIC's virtual cable in (also while the VM runs).")
_cable("disconnect", False, "Unplug a NIC's virtual cable: the guest sees its link go down.")


@nic_app.command("set")
def nic_set(
    name: NameArg,
    nic: NicArg,
    network: Annotated[
        str | None, typer.Option("--network", help="Move it to this port group, or user.")
    ] = None,
    inbound: InboundOpt = None,
    outbound: OutboundOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Move a NIC to another port group or change its shaping; at once on a running VM."""
    if network is None and inbound is None and outbound is None:
        common.fail("nic: give at least one option to change")
    common.guard(lambda: nic_shaping(inbound, outbound))  # bad input fails before the host

    async def go(host: common.Host) -> NicSpec:
        changes: dict[str, Any] = {} if network is None else {"network": network}
        if inbound is not None or outbound is not None:
            current = None
            if inbound is None or outbound is None:  # the other direction is kept
                current = _current_shaping(await host.get_vm(name), nic)
            changes["shaping"] = nic_shaping(inbound, outbound, current)
        spec: NicSpec = await host.update_nic(name, nic, validate(NicUpdate, changes))
        return spec

    spec: NicSpec = common.run_on_host(go)
    shaping = f"; shaping {_shaping_text(spec.shaping)}" if spec.shaping else ""
    _print_nic(spec, f"{name}: {spec.name} is {_nic_text(spec)}{shaping}", json_out)


def _current_shaping(info: VmView, nic: str) -> NicShaping | None:
    found = next((n for n in info.spec.nics if n.name == nic), None) if info.spec else None
    return found.shaping if found else None
