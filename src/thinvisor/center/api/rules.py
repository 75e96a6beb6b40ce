"""``/rules``: affinity and anti-affinity rules over a cluster's VMs, which the center's
placement keeps (``thinvisor.center.placement``, stored by ``thinvisor.center.rules``).

Listing shows the rules of the clusters the user may read, with the VMs of each that they
may read. Creating and deleting a rule needs the configure permission on its cluster; the
VMs a new rule names must be ones the user sees (any other is answered as a missing one:
400 naming ``vms``). A rule on a cluster the user does not see answers 404, as a missing
one does.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, Field

from thinvisor.api.errors import ERROR_RESPONSES
from thinvisor.auth import Permission, User
from thinvisor.center.agent import CenterAgent
from thinvisor.center.api.access import (
    Caller,
    NodeRef,
    center_of,
    check,
    in_thread,
    node_of,
    visible_ids,
)
from thinvisor.center.inventory import Node
from thinvisor.center.models import NodeKind
from thinvisor.center.placement import RuleKind
from thinvisor.center.rules import RuleRow, Rules
from thinvisor.errors import InvalidArgument
from thinvisor.model.base import StrictModel

router = APIRouter(prefix="/rules", tags=["rules"], responses=ERROR_RESPONSES)


class RuleIn(StrictModel):
    cluster: NodeRef
    """The cluster whose VMs it binds: its id, or its path."""
    name: str
    kind: RuleKind = Field(description="affinity: on one host; anti-affinity: never on one")
    vms: list[NodeRef] = Field(description="two VMs or more of the cluster: ids or paths")


class RuleOut(BaseModel):
    id: int
    cluster_id: int
    cluster: str
    """The cluster's path."""
    name: str
    kind: str
    vm_ids: list[int]
    vms: list[str]
    """The VMs' paths, in the order of ``vm_ids``."""


def rules_of(agent: CenterAgent) -> Rules:
    """The rules store of ``agent``'s database."""
    return Rules(agent.database)


def rule_out(rule: RuleRow, visible: set[int] | None = None) -> RuleOut:
    """``rule`` as the API shows it, with only the VMs among ``visible`` (None: all)."""
    pairs = [
        (vm_id, path)
        for vm_id, path in zip(rule.vm_ids, rule.vm_paths, strict=True)
        if visible is None or vm_id in visible
    ]
    return RuleOut(
        id=rule.id,
        cluster_id=rule.cluster_id,
        cluster=rule.cluster_path,
        name=rule.name,
        kind=rule.kind.value,
        vm_ids=[vm_id for vm_id, _ in pairs],
        vms=[path for _, path in pairs],
    )


def _of_kind(agent: CenterAgent, user: User, ref: NodeRef, kind: NodeKind, field: str) -> Node:
    """The object a request names, if the user sees it and it is a ``kind``."""
    node = node_of(agent, user, ref, field)
    if node.kind != kind:
        raise InvalidArgument(field, f"{node.kind} {node.path} is not a {kind}")
    return node


def _query_ref(text: str) -> NodeRef:
    """An object named in a query string: digits are an id, else a path."""
    return int(text) if text.isdecimal() else text


@router.get("", response_model=list[RuleOut])
async def list_rules(
    request: Request,
    user: Caller,
    cluster: Annotated[str | None, Query(description="only this cluster's: its id or path")] = None,
) -> list[RuleOut]:
    """The rules of the clusters the user may read, by cluster path and name."""
    agent = center_of(request)

    def read() -> list[RuleOut]:
        ref = None if cluster is None else _query_ref(cluster)
        cluster_id = (
            None if ref is None else _of_kind(agent, user, ref, NodeKind.CLUSTER, "cluster").id
        )
        visible = visible_ids(agent, user)
        found = rules_of(agent).list(cluster_id)
        return [
            rule_out(rule, visible)
            for rule in found
            if visible is None or rule.cluster_id in visible
        ]

    return await in_thread(read)


@router.post("", status_code=201, response_model=RuleOut)
async def create_rule(body: RuleIn, request: Request, user: Caller) -> RuleOut:
    """A new rule over two VMs or more of a cluster."""
    agent = center_of(request)

    def write() -> RuleRow:
        node = _of_kind(agent, user, body.cluster, NodeKind.CLUSTER, "cluster")
        check(agent, user, node.id, Permission.CONFIGURE)
        vm_ids = [_of_kind(agent, user, ref, NodeKind.VM, "vms").id for ref in body.vms]
        return rules_of(agent).create(node.id, body.name, body.kind, vm_ids)

    rule = await in_thread(write)
    agent.events.emit(
        "rule.created",
        f"{rule.kind} rule {rule.name!r} on {rule.cluster_path}: {', '.join(rule.vm_paths)}",
        object=f"{NodeKind.CLUSTER}{rule.cluster_path}",
        user=user.name,
        data={"rule": rule.id, "kind": str(rule.kind), "vms": list(rule.vm_ids)},
    )
    return rule_out(rule)


@router.get("/{rule_id}", response_model=RuleOut)
async def get_rule(rule_id: int, request: Request, user: Caller) -> RuleOut:
    agent = center_of(request)

    def read() -> RuleOut:
        rule = _rule(agent, user, rule_id, Permission.READ)
        return rule_out(rule, visible_ids(agent, user))

    return await in_thread(read)


@router.delete("/{rule_id}", status_code=204, response_class=Response)
async def delete_rule(rule_id: int, request: Request, user: Caller) -> Response:
    """Delete a rule: placement no longer keeps it."""
    agent = center_of(request)

    def write() -> RuleRow:
        _rule(agent, user, rule_id, Permission.CONFIGURE)
        return rules_of(agent).delete(rule_id)

    rule = await in_thread(write)
    agent.events.emit(
        "rule.deleted",
        f"{rule.kind} rule {rule.name!r} on {rule.cluster_path} deleted",
        object=f"{NodeKind.CLUSTER}{rule.cluster_path}",
        user=user.name,
        data={"rule": rule.id},
    )
    return Response(status_code=204)


def _rule(agent: CenterAgent, user: User, rule_id: int, permission: Permission) -> RuleRow:
    """The rule, if the user holds ``permission`` on its cluster (``NotFound`` for a
    rule of a cluster they do not see, as for a missing one)."""
    rule = rules_of(agent).get(rule_id)
    check(agent, user, rule.cluster_id, permission, absent=f"no rule with id {rule_id}")
    return rule
