"""``thinvisor datastore``: list, add and remove datastores; browse them, copy files in
and out.

A file in a datastore is named ``DS/PATH`` (``local/iso/boot.iso``), or as ESXi writes it,
``"[DS] PATH"``. Like the ``vm`` commands, these work on the host agent of ``thinvisor
login`` when there is a login, and on the local host otherwise.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Annotated

import typer
from rich.table import Table

from thinvisor.cli import common
from thinvisor.errors import InvalidArgument
from thinvisor.storage.datastore import Datastore, FileEntry

app = typer.Typer(
    help="Datastores: list, add, remove, browse, upload and download.", no_args_is_help=True
)

NameArg = Annotated[str, typer.Argument(help="The datastore's name.")]
FileArg = Annotated[str, typer.Argument(help="DS/PATH: a datastore and a path in it.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace the target if it exists.")]

_BRACKETED = re.compile(r"\[([^\]]*)\]\s*(.*)")

out = common.console()


def split_path(text: str) -> tuple[str, str]:
    """``DS/PATH`` or ``[DS] PATH`` as (DS, PATH); PATH is '' for the datastore's root."""
    m = _BRACKETED.fullmatch(text.strip())
    if m:
        ds, path = m.group(1), m.group(2)
    else:
        ds, _, path = text.strip().partition("/")
    if not ds.strip():
        raise InvalidArgument("path", f"{text!r} does not name a datastore: give DS/PATH")
    return ds.strip(), path.strip().strip("/")


def upload_path(text: str, local: Path) -> tuple[str, str]:
    """Where an upload goes: ``DS/DIR/`` (or just ``DS``) keeps the local file's name."""
    ds, path = split_path(text)
    if not path or text.rstrip().endswith("/"):
        path = str(PurePosixPath(path) / local.name) if path else local.name
    return ds, path


def size_text(size: int | None) -> str:
    """Bytes for people: 512 B, 1.5 KiB, 20.0 GiB; '-' for unknown."""
    if size is None:
        return "-"
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift:
            return f"{size / (1 << shift):.1f} {unit}"
    return f"{size} B"


def _filesystem(d: Datastore) -> str:
    if d.filesystem is None:
        return "-"
    return f"{d.filesystem} (shared)" if d.shared else d.filesystem


def _kv_table(rows: list[tuple[str, str]]) -> Table:
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    return table


def _print_datastore(d: Datastore, json_out: bool) -> None:
    if json_out:
        common.print_json(d.model_dump(mode="json"))
        return
    rows = [
        ("name", d.name),
        ("path", d.path + ("" if d.accessible else " (not accessible)")),
        ("defined in", "host.toml" if d.origin == "host.toml" else "datastores.toml (added)"),
        ("filesystem", _filesystem(d)),
        ("mounted from", d.mount_source or "-"),
        ("capacity", size_text(d.capacity_bytes)),
        ("free", size_text(d.free_bytes)),
        ("provisioned", size_text(d.provisioned_bytes)),
        ("used by VMs", size_text(d.vm_used_bytes)),
    ]
    for vm in d.vms:
        usage = f"provisioned {size_text(vm.provisioned_bytes)}, used {size_text(vm.used_bytes)}"
        rows.append((f"vm {vm.name}", usage))
    out.print(_kv_table(rows))


@app.command("list")
def list_datastores(json_out: JsonOpt = False) -> None:
    """List the datastores with their space, filesystem and VMs."""
    stores: list[Datastore] = common.run_on_host(lambda h: h.datastores.list_datastores())
    if json_out:
        common.print_json([d.model_dump(mode="json") for d in stores])
        return
    table = Table(box=None, header_style="bold")
    for col in ("NAME", "FILESYSTEM", "CAPACITY", "FREE", "PROVISIONED", "VMS", "ORIGIN"):
        table.add_column(col, no_wrap=True)
    table.add_column("PATH", overflow="fold")
    for d in stores:
        table.add_row(
            d.name,
            _filesystem(d),
            size_text(d.capacity_bytes),
            size_text(d.free_bytes),
            size_text(d.provisioned_bytes),
            str(len(d.vms)),
            d.origin,
            d.path if d.accessible else f"{d.path} (not accessible)",
        )
    out.print(table)


@app.command("show")
def show(name: NameArg, json_out: JsonOpt = False) -> None:
    """Show a datastore: its space, filesystem, and the space of each VM in it."""
    _print_datastore(common.run_on_host(lambda h: h.datastores.get_datastore(name)), json_out)


@app.command("add")
def add(
    name: NameArg,
    path: Annotated[
        str, typer.Argument(help="An existing directory, absolute; a mounted share too.")
    ],
    json_out: JsonOpt = False,
) -> None:
    """Add an existing directory (an NFS or CIFS mount too) as a datastore."""
    _print_datastore(common.run_on_host(lambda h: h.datastores.add_datastore(name, path)), json_out)


@app.command("remove")
def remove(name: NameArg) -> None:
    """Remove an added datastore that no VM uses; its files are not deleted."""
    common.run_on_host(lambda h: h.datastores.remove_datastore(name))
    typer.echo(f"{name}: removed; its files were kept")


@app.command("ls")
def ls(
    target: Annotated[str, typer.Argument(help="DS or DS/PATH: a directory or a file.")],
    json_out: JsonOpt = False,
) -> None:
    """List a directory of a datastore (name, kind, size, modified)."""
    ds, path = common.guard(lambda: split_path(target))
    entries: list[FileEntry] = common.run_on_host(lambda h: h.datastores.list_dir(ds, path))
    if json_out:
        common.print_json([e.model_dump(mode="json") for e in entries])
        return
    table = Table(box=None, header_style="bold")
    for col in ("NAME", "KIND", "SIZE", "MODIFIED"):
        table.add_column(col)
    for e in entries:
        modified = e.modified[:19].replace("T", " ")
        size = size_text(e.size) if e.kind == "file" else "-"
        table.add_row(e.name + ("/" if e.kind == "dir" else ""), e.kind, size, modified)
    out.print(table)


@app.command("mkdir")
def mkdir(target: FileArg) -> None:
    """Create a directory in a datastore, and its missing parents."""
    ds, path = common.guard(lambda: split_path(target))
    entry: FileEntry = common.run_on_host(lambda h: h.datastores.make_dir(ds, path))
    typer.echo(f"{ds}/{entry.path}: created")


@app.command("rm")
def rm(target: FileArg) -> None:
    """Delete a file or an empty directory (never inside a VM's directory)."""
    ds, path = common.guard(lambda: split_path(target))
    common.run_on_host(lambda h: h.datastores.delete(ds, path))
    typer.echo(f"{ds}/{path}: deleted")


@app.command("upload")
def upload(
    local: Annotated[Path, typer.Argument(help="The local file to copy.")],
    target: Annotated[
        str, typer.Argument(help="DS/PATH; DS/DIR/ or DS keeps the local file's name.")
    ],
    overwrite: OverwriteOpt = False,
) -> None:
    """Copy a local file into a datastore (an ISO, an image to import)."""
    source = local.absolute()
    ds, path = common.guard(lambda: upload_path(target, source))
    entry: FileEntry = common.run_on_host(
        lambda h: h.datastores.upload(ds, path, source, overwrite=overwrite)
    )
    typer.echo(f"{ds}/{entry.path}: uploaded ({entry.size} bytes)")


@app.command("download")
def download(
    source: FileArg,
    local: Annotated[Path, typer.Argument(help="A local file, or a directory to put it in.")],
    overwrite: OverwriteOpt = False,
) -> None:
    """Copy a file of a datastore to this machine."""
    ds, path = common.guard(lambda: split_path(source))
    written: Path = common.run_on_host(
        lambda h: h.datastores.download(ds, path, local.absolute(), overwrite=overwrite)
    )
    typer.echo(f"{ds}/{path}: downloaded to {written} ({written.stat().st_size} bytes)")
