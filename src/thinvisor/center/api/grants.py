"""``/permissions``: roles granted to users on inventory objects (and all below them).

Granting and revoking need the admin permission on the object; so does listing the
grants on it (without ``node``: every grant, admin at the root).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel

from thinvisor.api.errors import ERROR_RESPONSES
from thinvisor.auth import Permission, Role
from thinvisor.center.agent import CenterAgent
from thinvisor.center.api.access import Caller, center_of, check, in_thread
from thinvisor.center.permissions import Grant
from thinvisor.errors import InvalidArgument, NotFound
from thinvisor.model.base import StrictModel

router = APIRouter(tags=["permissions"], responses=ERROR_RESPONSES)


class GrantIn(StrictModel):
    role: Role


class GrantOut(BaseModel):
    node_id: int
    path: str
    user: str
    role: str


def grant_out(grant: Grant) -> GrantOut:
    return GrantOut(node_id=grant.node_id, path=grant.path, user=grant.principal, role=grant.role)


@router.get("/permissions", response_model=list[GrantOut])
async def list_grants(
    request: Request,
    user: Caller,
    node: Annotated[int | None, Query(description="only the grants on this object")] = None,
    principal: Annotated[str | None, Query(alias="user", description="only this user's")] = None,
) -> list[GrantOut]:
    """Grants, by path and user."""
    agent = center_of(request)

    def read() -> list[Grant]:
        check(agent, user, node, Permission.ADMIN)
        return agent.permissions.grants(node, principal)

    return [grant_out(g) for g in await in_thread(read)]


@router.put("/nodes/{node_id}/permissions/{name}", response_model=GrantOut)
async def grant(node_id: int, name: str, body: GrantIn, request: Request, user: Caller) -> GrantOut:
    """Give a user a role on an object and everything below it (replacing theirs there)."""
    agent = center_of(request)

    def write() -> Grant:
        check(agent, user, node_id, Permission.ADMIN)
        _check_user(agent, name)
        return agent.permissions.grant(node_id, name, body.role)

    done = await in_thread(write)
    agent.events.emit(
        "permission.granted",
        f"{name} is {done.role} on {done.path}",
        object=f"user/{name}",
        user=user.name,
        data={"node": node_id, "path": done.path, "role": str(done.role)},
    )
    return grant_out(done)


def _check_user(agent: CenterAgent, name: str) -> None:
    try:
        agent.users.get(name)
    except NotFound:
        raise InvalidArgument("user", f"no user {name!r} in this center") from None


@router.delete("/nodes/{node_id}/permissions/{name}", status_code=204, response_class=Response)
async def revoke(node_id: int, name: str, request: Request, user: Caller) -> Response:
    """Take a user's grant on an object away (404 if they had none there)."""
    agent = center_of(request)

    def write() -> str:
        check(agent, user, node_id, Permission.ADMIN)
        path = agent.inventory.get(node_id).path
        if not agent.permissions.revoke(node_id, name):
            raise NotFound(f"{name!r} has no role granted on {path}")
        return path

    path = await in_thread(write)
    agent.events.emit(
        "permission.revoked",
        f"{name} no longer has a role granted on {path}",
        object=f"user/{name}",
        user=user.name,
        data={"node": node_id, "path": path},
    )
    return Response(status_code=204)
