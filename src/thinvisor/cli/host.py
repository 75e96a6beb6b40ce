"""``thinvisor host``: run the host agent, set up its users, show and stop the host."""

from __future__ import annotations

import asyncio
import socket
from typing import Annotated

import typer
from rich.table import Table

from thinvisor import __version__
from thinvisor.cli import common, stats, users
from thinvisor.host import hostinfo

app = typer.Typer(
    help="The host: its agent, users, information and shutdown.", no_args_is_help=True
)
for command in users.app.registered_commands:
    app.registered_commands.append(command)
for group in users.app.registered_groups:
    app.registered_groups.append(group)

out = common.console()


@app.command()
def serve(
    listen: Annotated[str | None, typer.Option(help="Address to listen on [config].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [config: 8443].")] = None,
) -> None:
    """Run the host agent: the REST API, events, tasks, consoles and autostart."""
    from thinvisor.api.server import serve as run_server

    common.guard(lambda: run_server(common.config(), listen=listen, port=port))


@app.command()
def info(json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """This host: CPU, memory, accelerator and why, datastores, TLS fingerprint."""
    from thinvisor.api.host import qemu_version
    from thinvisor.api.server import tls_files
    from thinvisor.tls import fingerprint

    config = common.config()
    facts = hostinfo.host_facts()
    service = common.service()
    accel = common.guard(service.accel)
    cert, _ = tls_files(config)
    data = {
        "hostname": socket.gethostname(),
        "cpu_model": facts.cpu_model,
        "cpus": facts.cpus,
        "memory_total_mib": facts.memory_total_mib,
        "memory_available_mib": facts.memory_available_mib,
        "accelerator": {"name": accel.name, "reason": accel.reason},
        "thinvisor_version": __version__,
        "qemu_version": qemu_version(config.qemu_binary),
        "datastores": [{"name": d.name, "path": str(d.path)} for d in config.all_datastores()],
        "tls_fingerprint": common.guard(lambda: fingerprint(cert)) if cert.exists() else None,
    }
    if json_out:
        common.print_json(data)
        return
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key in ("hostname", "cpu_model", "cpus"):
        table.add_row(key.replace("_", " "), str(data[key]))
    table.add_row("memory", f"{facts.memory_available_mib} MiB free of {facts.memory_total_mib}")
    table.add_row("accelerator", f"{accel.name} ({accel.reason})")
    table.add_row("versions", f"thinvisor {__version__}, QEMU {data['qemu_version']}")
    for d in config.all_datastores():
        table.add_row(f"datastore {d.name}", str(d.path))
    table.add_row("TLS fingerprint", str(data["tls_fingerprint"] or "(no certificate yet)"))
    out.print(table)


app.command("stats")(stats.host_stats)


@app.command()
def shutdown(
    timeout: Annotated[float | None, typer.Option(help="Seconds per VM before power off.")] = None,
) -> None:
    """Shut the autostart VMs down in reverse autostart order."""
    from thinvisor.host.agent import HostAgent

    async def go() -> list[str]:
        agent = HostAgent(common.config())
        return await agent.shutdown_autostart_vms(timeout)

    stopped: list[str] = common.guard(lambda: asyncio.run(go()))
    typer.echo(f"shut down: {', '.join(stopped) or 'nothing was running'}")
