"""``thinvisor center ha``: high availability of a cluster's VMs.

With HA on, the center heartbeats every host of the cluster; when one fails (silent for
longer than the cluster's timeout, and no longer writing its datastore heartbeat), its
running VMs are restarted on the cluster's other hosts from their shared datastores,
``high`` priority first, then ``medium`` (every VM's default), then ``low``; ``disabled``
VMs stay where they were. A host that is silent but still writes its heartbeat is
isolated, not failed: its VMs run on there. Clusters are named by path or id, VMs by
path, id or unique name.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

import typer

from thinvisor.center.models import HaPriority
from thinvisor.cli import common
from thinvisor.cli.center_client import CenterClient, on_center, print_table
from thinvisor.errors import InvalidArgument

app = typer.Typer(help="High availability: restart the VMs of failed hosts.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
ClusterArg = Annotated[str, typer.Argument(help="The cluster: its path or id.")]


class Switch(StrEnum):
    ON = "on"
    OFF = "off"


async def cluster_id(center: CenterClient, ref: str) -> int:
    """The id of the cluster at a path, or of that id."""
    node = await center.node(ref)
    if node["kind"] != "cluster":
        raise InvalidArgument("cluster", f"{node['kind']} {node['path']} is not a cluster")
    found: int = node["id"]
    return found


def cluster_line(settings: dict[str, Any]) -> str:
    """``HA on for cluster /dc1/c1 (timeout 15 s)``, or ``HA off for cluster /dc1/c1``."""
    line = f"HA {'on' if settings['enabled'] else 'off'} for cluster {settings['cluster']}"
    return f"{line} (timeout {settings['timeout_s']:g} s)" if settings["enabled"] else line


def vm_line(vm: dict[str, Any]) -> str:
    """A VM's priority, and why it is not protected where it is not."""
    line = f"vm {vm['vm']}: HA priority {vm['priority']}"
    if vm["priority"] == HaPriority.DISABLED:
        return f"{line} (never restarted elsewhere)"
    if vm["cluster"] is None:
        return f"{line} (not protected: its host is in no cluster)"
    if not vm["protected"]:
        return f"{line} (not protected: cluster {vm['cluster']} has HA off)"
    return line


@app.command("cluster")
def ha_cluster(
    cluster: ClusterArg,
    state: Annotated[Switch, typer.Argument(help="on: protect its VMs; off: do not.")],
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            help="Seconds a host may stay silent before it counts as failed "
            "(5 to 3600; default: the cluster's own, 15 unless set).",
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Turn HA on or off for a cluster."""

    async def go(center: CenterClient) -> dict[str, Any]:
        path = f"/clusters/{await cluster_id(center, cluster)}/ha"
        body = {"enabled": state == Switch.ON, "timeout_s": timeout}
        settings: dict[str, Any] = (await center.call("PUT", path, body=body)).json()
        return settings

    settings = on_center(go)
    if json_out:
        common.print_json(settings)
        return
    typer.echo(cluster_line(settings))


@app.command("vm")
def ha_vm(
    vm: Annotated[str, typer.Argument(help="The VM: its path, id or unique name.")],
    priority: Annotated[
        HaPriority | None,
        typer.Option(
            "--priority",
            help="high, medium, low: restarted in that order when its host fails; "
            "disabled: never. Without it, the VM's priority is shown.",
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Set (or show) when a VM is restarted if its host fails."""

    async def go(center: CenterClient) -> dict[str, Any]:
        path = f"/vms/{(await center.vm(vm))['id']}/ha"
        if priority is None:
            shown: dict[str, Any] = await center.get(path)
            return shown
        body = {"priority": priority.value}
        changed: dict[str, Any] = (await center.call("PUT", path, body=body)).json()
        return changed

    settings = on_center(go)
    if json_out:
        common.print_json(settings)
        return
    typer.echo(vm_line(settings))


@app.command("status")
def ha_status(
    cluster: Annotated[
        str | None, typer.Option("--cluster", help="Only this cluster: its path or id.")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Each cluster's HA: its hosts as HA sees them (heard, isolated, failed, ...) and
    the VMs it restarted."""

    async def go(center: CenterClient) -> list[dict[str, Any]]:
        only = None if cluster is None else await cluster_id(center, cluster)
        found: list[dict[str, Any]] = await center.get("/ha", cluster=only)
        return found

    clusters = on_center(go)
    if json_out:
        common.print_json(clusters)
        return
    if not clusters:
        typer.echo("no clusters; make one with 'thinvisor center cluster create'")
        return
    for index, settings in enumerate(clusters):
        if index:
            typer.echo("")
        print_cluster(settings)


def print_cluster(settings: dict[str, Any]) -> None:
    """One cluster's status: its settings, its hosts, and the VMs restarted."""
    typer.echo(cluster_line(settings))
    hosts = [
        [
            h["name"],
            h["state"],
            _yes(h["connected"]),
            _yes(h["heard"]),
            None if h["silent_s"] is None else f"{h['silent_s']:.0f} s",
            h["error"],
        ]
        for h in settings["hosts"]
    ]
    if hosts:
        print_table(["HOST", "STATE", "CONNECTED", "HEARD", "SILENT", "ERROR"], hosts)
    restarts = [
        [r["vm"], r["source"], r["target"], r["priority"], _seconds(r["time"])]
        for r in settings["restarted"]
    ]
    if restarts:
        typer.echo("restarted:")
        print_table(["VM", "FROM", "TO", "PRIORITY", "TIME"], restarts)


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def _seconds(stamp: str) -> str:
    """An ISO 8601 time to the second: ``2026-11-28 16:36:17``."""
    return stamp[:19].replace("T", " ")
