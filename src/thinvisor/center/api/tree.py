"""The inventory tree: datacenters, folders and clusters, looked up by id or path,
renamed, moved and deleted.

Making and changing the tree needs the configure permission where the change happens:
on the parent for a new object (at the root for a datacenter), on the object itself to
rename or delete it, and on both the object and its new parent to move it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel

from thinvisor.api.errors import ERROR_RESPONSES
from thinvisor.auth import Permission, User
from thinvisor.center.agent import CenterAgent
from thinvisor.center.api.access import (
    Caller,
    NodeRef,
    center_of,
    check,
    in_thread,
    parent_of,
    row_out,
    shown_ids,
    visible_ids,
)
from thinvisor.center.inventory import Node, path_segment
from thinvisor.errors import InvalidArgument, NotFound, ThinvisorError
from thinvisor.model.base import StrictModel

router = APIRouter(tags=["inventory"], responses=ERROR_RESPONSES)


class NodeOut(BaseModel):
    id: int
    kind: str
    name: str
    parent_id: int | None
    path: str


class NodeDetail(NodeOut):
    tags: list[str]


class TreeNode(BaseModel):
    id: int
    kind: str
    name: str
    path: str
    state: str | None = None
    """A host's connection state."""
    power_state: str | None = None
    template: bool | None = None
    children: list[TreeNode]


class DatacenterIn(StrictModel):
    name: str


class ContainerIn(StrictModel):
    parent: NodeRef
    """The datacenter or folder to make it in: its id, or its path."""
    name: str


class NodeChange(StrictModel):
    name: str | None = None
    parent: NodeRef | None = None


def node_out(node: Node) -> NodeOut:
    return row_out(NodeOut, node)


def _detail(agent: CenterAgent, node: Node) -> NodeDetail:
    tags = [t.name for t in agent.inventory.tags_of(node.id)]
    return NodeDetail(**node_out(node).model_dump(), tags=tags)


@router.get("/inventory", response_model=list[TreeNode], response_model_exclude_none=True)
async def inventory_tree(request: Request, user: Caller) -> list[TreeNode]:
    """The whole tree as the user may see it: what they may read, and the objects above
    it (so that each is shown where it is), without anything else in those."""
    agent = center_of(request)

    def read() -> list[TreeNode]:
        return pruned_tree(agent.inventory.tree(), "/", visible_ids(agent, user))

    return await in_thread(read)


def pruned_tree(
    entries: list[dict[str, Any]], base: str, visible: set[int] | None
) -> list[TreeNode]:
    """``Inventory.tree`` entries under the path ``base`` that are ``visible`` (None: all),
    with their paths, and the entries above each of them: the way to them, which shows
    no state of its own."""
    kept = []
    for entry in entries:
        path = f"{base.rstrip('/')}/{path_segment(entry['name'])}"
        children = pruned_tree(entry["children"], path, visible)
        if visible is None or entry["id"] in visible:
            kept.append(TreeNode(**{**entry, "path": path, "children": children}))
        elif children:
            way = {key: entry[key] for key in ("id", "kind", "name")}
            kept.append(TreeNode(**way, path=path, children=children))
    return kept


@router.post("/datacenters", status_code=201, response_model=NodeOut)
async def create_datacenter(body: DatacenterIn, request: Request, user: Caller) -> NodeOut:
    """A new datacenter, at the root of the inventory."""
    agent = center_of(request)

    def write() -> Node:
        check(agent, user, None, Permission.CONFIGURE)
        return agent.inventory.create_datacenter(body.name)

    return _created(agent, await in_thread(write), user)


@router.post("/folders", status_code=201, response_model=NodeOut)
async def create_folder(body: ContainerIn, request: Request, user: Caller) -> NodeOut:
    """A new folder in a datacenter or a folder."""
    agent = center_of(request)
    return await _create_in(agent, body, user, agent.inventory.create_folder)


@router.post("/clusters", status_code=201, response_model=NodeOut)
async def create_cluster(body: ContainerIn, request: Request, user: Caller) -> NodeOut:
    """A new cluster in a datacenter or a folder."""
    agent = center_of(request)
    return await _create_in(agent, body, user, agent.inventory.create_cluster)


async def _create_in(
    agent: CenterAgent, body: ContainerIn, user: User, create: Callable[[int, str], Node]
) -> NodeOut:
    """``create`` the object ``body`` names in its parent, where ``user`` must hold the
    configure permission."""

    def write() -> Node:
        parent = parent_of(agent, user, body.parent, Permission.CONFIGURE)
        return create(parent.id, body.name)

    return _created(agent, await in_thread(write), user)


def _created(agent: CenterAgent, node: Node, user: User) -> NodeOut:
    emit(agent, "inventory.created", f"{node.kind} {node.path} created", node, user)
    return node_out(node)


@router.get("/nodes", response_model=NodeDetail)
async def node_at(
    request: Request,
    user: Caller,
    path: Annotated[str, Query(description="the object's path, like /dc1/prod/host1/vm1")],
) -> NodeDetail:
    """The object at a path."""
    agent = center_of(request)

    def read() -> NodeDetail:
        node = agent.inventory.resolve(path)
        check(agent, user, node.id, Permission.READ, absent=f"no inventory object at {path}")
        return _detail(agent, node)

    return await in_thread(read)


@router.get("/nodes/{node_id}", response_model=NodeDetail)
async def get_node(node_id: int, request: Request, user: Caller) -> NodeDetail:
    agent = center_of(request)

    def read() -> NodeDetail:
        check(agent, user, node_id, Permission.READ)
        return _detail(agent, agent.inventory.get(node_id))

    return await in_thread(read)


@router.get("/nodes/{node_id}/children", response_model=list[NodeOut])
async def node_children(node_id: int, request: Request, user: Caller) -> list[NodeOut]:
    """What is directly in an object, as far as the user sees it: on the path to what
    they may read, only what is on that path."""
    agent = center_of(request)

    def read() -> list[NodeOut]:
        shown = shown_ids(agent, user)
        if shown is not None and node_id not in shown:
            agent.inventory.get(node_id)  # a missing object: the same 404 as a hidden one
            raise NotFound(f"no inventory object with id {node_id}")
        found = agent.inventory.children(node_id)
        return [node_out(n) for n in found if shown is None or n.id in shown]

    return await in_thread(read)


@router.patch("/nodes/{node_id}", response_model=NodeOut)
async def change_node(node_id: int, body: NodeChange, request: Request, user: Caller) -> NodeOut:
    """Rename a datacenter, folder, cluster or host, or move it into another parent."""
    if body.name is None and body.parent is None:
        raise InvalidArgument("body", "give a new name, a new parent, or both")
    agent = center_of(request)

    def write() -> tuple[Node, Node]:
        check(agent, user, node_id, Permission.CONFIGURE)
        before = agent.inventory.get(node_id)
        parent: Node | None = None
        if body.parent is not None:
            parent = parent_of(agent, user, body.parent, Permission.CONFIGURE)
        return before, _move_and_rename(agent, before, parent, body.name)

    before, node = await in_thread(write)
    emit(agent, "inventory.changed", f"{before.kind} {before.path} is now {node.path}", node, user)
    return node_out(node)


def _move_and_rename(agent: CenterAgent, node: Node, parent: Node | None, name: str | None) -> Node:
    """Move, then rename; a refused rename moves the object back (nothing changed)."""
    moved = node if parent is None else agent.inventory.move(node.id, parent.id)
    if name is None:
        return moved
    try:
        return agent.inventory.rename(node.id, name)
    except ThinvisorError:
        if moved is not node and node.parent_id is not None:
            agent.inventory.move(node.id, node.parent_id)
        raise


@router.delete("/nodes/{node_id}", status_code=204, response_class=Response)
async def delete_node(node_id: int, request: Request, user: Caller) -> Response:
    """Delete an empty datacenter, folder or cluster (hosts: ``DELETE /hosts/{id}``)."""
    agent = center_of(request)

    def write() -> Node:
        check(agent, user, node_id, Permission.CONFIGURE)
        node = agent.inventory.get(node_id)
        agent.inventory.delete(node_id)
        return node

    node = await in_thread(write)
    emit(agent, "inventory.deleted", f"{node.kind} {node.path} deleted", node, user)
    return Response(status_code=204)


def emit(agent: CenterAgent, kind: str, message: str, node: Node, user: User) -> None:
    """Record a change of the inventory made by ``user``, in the center's event log."""
    agent.events.emit(kind, message, object=f"{node.kind}{node.path}", user=user.name)
