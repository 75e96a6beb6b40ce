"""``thinvisor center rule``: affinity and anti-affinity rules over a cluster's VMs.

An affinity rule keeps its VMs on one host; an anti-affinity rule never lets two of them
share one. The center keeps them when it places, evacuates and balances VMs. Clusters
are named by path or id, VMs by path, id or unique name.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from thinvisor.center.placement import RuleKind
from thinvisor.cli import common
from thinvisor.cli.center_client import CenterClient, on_center, print_table

app = typer.Typer(
    help="Affinity and anti-affinity rules over a cluster's VMs.", no_args_is_help=True
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@app.command("list")
def rule_list(
    cluster: Annotated[
        str | None, typer.Option(help="Only this cluster's rules: its path or id.")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """The rules, by cluster and name, with their VMs."""

    async def go(center: CenterClient) -> list[dict[str, Any]]:
        cluster_id = None if cluster is None else (await center.node(cluster))["id"]
        found: list[dict[str, Any]] = await center.get("/rules", cluster=cluster_id)
        return found

    rules = on_center(go)
    if json_out:
        common.print_json(rules)
        return
    rows = [[r["id"], r["cluster"], r["name"], r["kind"], ", ".join(r["vms"])] for r in rules]
    print_table(["ID", "CLUSTER", "NAME", "KIND", "VMS"], rows)


@app.command("create")
def rule_create(
    cluster: Annotated[str, typer.Argument(help="The cluster: its path or id.")],
    name: Annotated[str, typer.Argument(help="The rule's name (unique in the cluster).")],
    vms: Annotated[
        list[str], typer.Argument(help="Two VMs or more of the cluster: path, id or name.")
    ],
    kind: Annotated[
        RuleKind,
        typer.Option("--kind", help="affinity: on one host; anti-affinity: never two on one host."),
    ],
) -> None:
    """Make a rule over VMs of a cluster."""

    async def go(center: CenterClient) -> dict[str, Any]:
        cluster_id = (await center.node(cluster))["id"]
        vm_ids = [(await center.vm(ref))["id"] for ref in vms]
        body = {"cluster": cluster_id, "name": name, "kind": kind.value, "vms": vm_ids}
        created: dict[str, Any] = (await center.call("POST", "/rules", body=body)).json()
        return created

    rule = on_center(go)
    typer.echo(
        f"created {rule['kind']} rule {rule['name']!r} (id {rule['id']}) on "
        f"{rule['cluster']}: {', '.join(rule['vms'])}"
    )


@app.command("delete")
def rule_delete(rule_id: Annotated[int, typer.Argument(help="The rule's id.")]) -> None:
    """Delete a rule: the center no longer keeps it."""

    async def go(center: CenterClient) -> dict[str, Any]:
        rule: dict[str, Any] = await center.get(f"/rules/{rule_id}")
        await center.call("DELETE", f"/rules/{rule_id}")
        return rule

    rule = on_center(go)
    typer.echo(f"deleted {rule['kind']} rule {rule['name']!r} of {rule['cluster']}")
