"""What every center route shares: the agent, who is asking, and may they do it there.

Permissions are checked on the object a route acts on: the user's own role applies at
the root of the inventory, a role granted on a folder, cluster or host applies to
everything under it, and the nearest grant wins (``thinvisor.center.permissions``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, ParamSpec, TypeVar

from fastapi import Depends, HTTPException, Request, WebSocket

from thinvisor.api.auth import authenticated
from thinvisor.auth import Permission, User
from thinvisor.center.agent import CenterAgent
from thinvisor.center.inventory import Node
from thinvisor.errors import InvalidArgument, NotFound

P = ParamSpec("P")
T = TypeVar("T")

#: A route's authenticated user, whatever their role: the route checks the object.
Caller = Annotated[User, Depends(authenticated)]

#: How a request names an inventory object: its id, or its path (``/dc1/prod``).
NodeRef = int | str


def center_of(conn: Request | WebSocket) -> CenterAgent:
    agent: CenterAgent = conn.app.state.agent
    return agent


async def in_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run a database call off the event loop."""
    return await asyncio.to_thread(fn, *args, **kwargs)


def check(agent: CenterAgent, user: User, node_id: int | None, permission: Permission) -> None:
    """403 naming the object, the permission and the user's role there, unless allowed.

    ``node_id`` None is the root of the inventory (where datacenters are made)."""
    if agent.permissions.allowed(user.name, user.role, node_id, permission):
        return
    role = agent.permissions.effective_role(user.name, node_id, user.role)
    where = "the inventory root" if node_id is None else agent.inventory.get(node_id).path
    held = f"role there: {role}" if role is not None else "no role there"
    raise HTTPException(403, f"user {user.name!r} may not {permission.value} {where} ({held})")


async def authorize(
    conn: Request | WebSocket, user: User, node_id: int | None, permission: Permission
) -> None:
    """``check`` in a worker thread."""
    await in_thread(check, center_of(conn), user, node_id, permission)


def node_of(agent: CenterAgent, ref: NodeRef, field: str) -> Node:
    """The object a request body names by id or path; ``InvalidArgument`` naming
    ``field`` if there is none (a body naming nothing is bad input, not a missing page)."""
    try:
        if isinstance(ref, int):
            return agent.inventory.get(ref)
        if not ref.startswith("/"):
            raise InvalidArgument(field, f"{ref!r} is neither an id nor a path like /dc1/folder")
        return agent.inventory.resolve(ref)
    except NotFound as exc:
        raise InvalidArgument(field, str(exc)) from None


def visible_ids(agent: CenterAgent, user: User) -> set[int] | None:
    """The ids of the objects ``user`` may read; None: everything."""
    return agent.permissions.visible(user.name, user.role)
