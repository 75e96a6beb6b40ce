"""``thinvisor``: the command line of a thinvisor host."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

# typer vendors click; its exception types are only reachable here (typer is pinned).
from typer._click.exceptions import ClickException

from thinvisor import __version__
from thinvisor.cli import appliance, center, common, datastore, host, login, network, vm

app = typer.Typer(
    help="thinvisor: a thin hypervisor host.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(vm.app, name="vm")
app.add_typer(host.app, name="host")
app.add_typer(network.app, name="network")
app.add_typer(datastore.app, name="datastore")
app.add_typer(appliance.app, name="appliance")
app.add_typer(center.app, name="center")
login.register(app)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"thinvisor {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            envvar="THINVISOR_CONFIG",
            help="Host configuration file [default: /etc/thinvisor/host.toml].",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    common.set_config_path(config)
    common.setup_logging(verbose)


def main() -> None:
    """Run the CLI; every error, usage errors included, is one line and a non-zero exit."""
    try:
        result = app(standalone_mode=False)
    except ClickException as exc:
        sys.stderr.write(f"error: {exc.format_message()}\n")
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.stderr.write("error: aborted\n")
        sys.exit(1)
    sys.exit(result if isinstance(result, int) else 0)
