"""``/tags``: labels on any inventory object, and the objects that carry one.

Making and deleting tags needs configure at the root; putting one on an object or taking
it off needs configure on that object.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel

from thinvisor.api.errors import ERROR_RESPONSES
from thinvisor.auth import Permission
from thinvisor.center.api.access import Caller, center_of, check, in_thread, visible_ids
from thinvisor.center.api.tree import NodeOut, node_out
from thinvisor.center.inventory import Tag
from thinvisor.errors import NotFound
from thinvisor.model.base import StrictModel

router = APIRouter(tags=["tags"], responses=ERROR_RESPONSES)


class TagIn(StrictModel):
    name: str
    category: str | None = None


class TagOut(BaseModel):
    id: int
    name: str
    category: str | None


class TaggedOut(TagOut):
    nodes: list[NodeOut]


def tag_out(tag: Tag) -> TagOut:
    return TagOut(id=tag.id, name=tag.name, category=tag.category)


@router.get("/tags", response_model=list[TagOut])
async def list_tags(request: Request, user: Caller) -> list[TagOut]:
    return [tag_out(t) for t in await in_thread(center_of(request).inventory.tags)]


@router.post("/tags", status_code=201, response_model=TagOut)
async def create_tag(body: TagIn, request: Request, user: Caller) -> TagOut:
    agent = center_of(request)

    def write() -> Tag:
        check(agent, user, None, Permission.CONFIGURE)
        return agent.inventory.create_tag(body.name, body.category)

    tag = await in_thread(write)
    agent.events.emit("tag.created", f"tag {tag.name!r} created", user=user.name)
    return tag_out(tag)


@router.get("/tags/{name}", response_model=TaggedOut)
async def get_tag(name: str, request: Request, user: Caller) -> TaggedOut:
    """A tag and the objects (that the user may read) carrying it."""
    agent = center_of(request)

    def read() -> TaggedOut:
        tag = _tag(agent.inventory.tags(), name)
        visible = visible_ids(agent, user)
        nodes = [n for n in agent.inventory.tagged(name) if visible is None or n.id in visible]
        return TaggedOut(**tag_out(tag).model_dump(), nodes=[node_out(n) for n in nodes])

    return await in_thread(read)


def _tag(tags: list[Tag], name: str) -> Tag:
    for tag in tags:
        if tag.name == name:
            return tag
    raise NotFound(f"no tag {name!r}")


@router.delete("/tags/{name}", status_code=204, response_class=Response)
async def delete_tag(name: str, request: Request, user: Caller) -> Response:
    """Delete a tag; it leaves every object carrying it."""
    agent = center_of(request)

    def write() -> None:
        check(agent, user, None, Permission.CONFIGURE)
        agent.inventory.delete_tag(name)

    await in_thread(write)
    agent.events.emit("tag.deleted", f"tag {name!r} deleted", user=user.name)
    return Response(status_code=204)


@router.put("/nodes/{node_id}/tags/{name}", response_model=list[TagOut])
async def tag_node(node_id: int, name: str, request: Request, user: Caller) -> list[TagOut]:
    """Put a tag on an object; its tags now."""
    agent = center_of(request)

    def write() -> list[Tag]:
        check(agent, user, node_id, Permission.CONFIGURE)
        agent.inventory.tag(node_id, name)
        return agent.inventory.tags_of(node_id)

    return [tag_out(t) for t in await in_thread(write)]


@router.delete("/nodes/{node_id}/tags/{name}", status_code=204, response_class=Response)
async def untag_node(node_id: int, name: str, request: Request, user: Caller) -> Response:
    """Take a tag off an object (404 if it does not carry it)."""
    agent = center_of(request)

    def write() -> None:
        check(agent, user, node_id, Permission.CONFIGURE)
        if not agent.inventory.untag(node_id, name):
            path = agent.inventory.get(node_id).path
            raise NotFound(f"{path} does not carry tag {name!r}")

    await in_thread(write)
    return Response(status_code=204)
