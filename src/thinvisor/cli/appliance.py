"""``thinvisor appliance``: build and show the quick-start guest."""

from __future__ import annotations

import json
from typing import Annotated, NoReturn

import typer

from thinvisor.appliance import Appliance, build_appliance, find_appliance
from thinvisor.cli import common
from thinvisor.errors import ThinvisorError

app = typer.Typer(
    help="The quick-start appliance: Debian's cloud kernel and a busybox initramfs.",
    no_args_is_help=True,
)

JsonOption = Annotated[bool, typer.Option("--json", help="Print a JSON object.")]


@app.command()
def build(
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if cached.")] = False,
    json_output: JsonOption = False,
) -> None:
    """Build the appliance into the cache directory, or reuse the cached build."""
    try:
        # common.config() honours the global --config (and THINVISOR_CONFIG).
        cache_dir = common.config().cache_dir
        appliance = build_appliance(cache_dir, force=force, progress=_progress)
    except ThinvisorError as exc:
        _fail(exc)
    _print(appliance, json_output)


@app.command()
def show(json_output: JsonOption = False) -> None:
    """Show the last build, without building anything."""
    try:
        appliance = find_appliance(common.config().cache_dir)
    except ThinvisorError as exc:
        _fail(exc)
    if appliance is None:
        typer.echo("error: no appliance has been built; run `thinvisor appliance build`", err=True)
        raise typer.Exit(1)
    _print(appliance, json_output)


def _progress(message: str) -> None:
    typer.echo(message, err=True)


def _fail(exc: ThinvisorError) -> NoReturn:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(1) from exc


def _print(appliance: Appliance, json_output: bool) -> None:
    fields = {
        "version": appliance.version,
        "kernel": str(appliance.kernel),
        "initrd": str(appliance.initrd),
        "cmdline": appliance.cmdline,
    }
    if json_output:
        typer.echo(json.dumps(fields, indent=2))
    else:
        for key, value in fields.items():
            typer.echo(f"{key + ':':9}{value}")
