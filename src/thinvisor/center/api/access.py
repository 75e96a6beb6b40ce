"""What every center route shares: the agent, who is asking, and may they do it there.

Permissions are checked on the object a route acts on: the user's own role applies at
the root of the inventory, a role granted on a folder, cluster or host applies to
everything under it, and the nearest grant wins (``thinvisor.center.permissions``).

What a user sees: the objects they may read, and the objects above those (the path to
each, with nothing else that is in them). Lists show just that. An object a user does
not see is answered as if it did not exist, as vCenter does: the same 404 as a missing
one (400 naming the field, when a request body names it), with the same message, so
that neither its name nor its existence leaks. An object they see but may not act on
as asked answers 403, naming the object, the permission and their role there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from enum import Enum
from typing import Annotated, Any, ParamSpec, TypeVar

from fastapi import Depends, HTTPException, Request, WebSocket
from pydantic import BaseModel

from thinvisor.api.auth import authenticated
from thinvisor.auth import Permission, Role, User, allows
from thinvisor.center.agent import CenterAgent
from thinvisor.center.inventory import Node
from thinvisor.errors import InvalidArgument, NotFound

P = ParamSpec("P")
T = TypeVar("T")
OutT = TypeVar("OutT", bound=BaseModel)

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


def check(
    agent: CenterAgent,
    user: User,
    node_id: int | None,
    permission: Permission,
    absent: str | None = None,
) -> None:
    """Return if ``user`` holds ``permission`` on the node (None: the inventory root,
    where datacenters are made); else 403 naming the object, the permission and the
    user's role there, or ``NotFound`` (``absent``: its message, for routes whose
    missing objects say more than "no inventory object") if the user does not see it."""
    role = agent.permissions.effective_role(user.name, node_id, user.role)
    if role is not None and allows(role, permission):
        return
    if node_id is not None and not _sees(agent, user, node_id, role):
        raise NotFound(absent or f"no inventory object with id {node_id}")
    where = "the inventory root" if node_id is None else agent.inventory.get(node_id).path
    held = f"role there: {role}" if role is not None else "no role there"
    raise HTTPException(403, f"user {user.name!r} may not {permission.value} {where} ({held})")


def sees(agent: CenterAgent, user: User, node_id: int) -> bool:
    """Whether ``user`` may read the node or something below it (``NotFound`` if there
    is no such node)."""
    role = agent.permissions.effective_role(user.name, node_id, user.role)
    return _sees(agent, user, node_id, role)


def _sees(agent: CenterAgent, user: User, node_id: int, role: Role | None) -> bool:
    """``sees``, knowing the user's ``role`` on the node."""
    if role is not None and allows(role, Permission.READ):
        return True
    shown = agent.permissions.shown(user.name, user.role)
    return shown is None or node_id in shown


async def authorize(
    conn: Request | WebSocket, user: User, node_id: int | None, permission: Permission
) -> None:
    """``check`` in a worker thread."""
    await in_thread(check, center_of(conn), user, node_id, permission)


def node_of(agent: CenterAgent, user: User, ref: NodeRef, field: str) -> Node:
    """The object a request body names by id or path, if ``user`` sees it;
    ``InvalidArgument`` naming ``field`` if there is none, or none they see (a body naming
    nothing is bad input, not a missing page)."""
    try:
        if isinstance(ref, int):
            node = agent.inventory.get(ref)
            absent = f"no inventory object with id {ref}"
        elif ref.startswith("/"):
            node = agent.inventory.resolve(ref)
            absent = f"no inventory object at {ref}"
        else:
            raise InvalidArgument(field, f"{ref!r} is neither an id nor a path like /dc1/folder")
        if not sees(agent, user, node.id):
            raise NotFound(absent)  # the very message of a missing object
        return node
    except NotFound as exc:
        raise InvalidArgument(field, str(exc)) from None


def parent_of(agent: CenterAgent, user: User, ref: NodeRef, permission: Permission) -> Node:
    """The parent a request body names (its field ``parent``), if ``user`` holds
    ``permission`` on it (``node_of``, then ``check``)."""
    parent = node_of(agent, user, ref, "parent")
    check(agent, user, parent.id, permission)
    return parent


def row_out(model: type[OutT], row: object, **given: Any) -> OutT:
    """The API answer ``model`` for an inventory row: the row's attributes of the same
    names (enums as their values), then the ``given`` fields."""
    values = {
        name: getattr(row, name)
        for name in model.model_fields
        if name not in given and hasattr(row, name)
    }
    plain = {k: v.value if isinstance(v, Enum) else v for k, v in values.items()}
    return model(**plain, **given)


def visible_ids(agent: CenterAgent, user: User) -> set[int] | None:
    """The ids of the objects ``user`` may read; None: everything."""
    return agent.permissions.visible(user.name, user.role)


def shown_ids(agent: CenterAgent, user: User) -> set[int] | None:
    """The ids of the objects ``user`` sees (those they may read and those above them);
    None: everything."""
    return agent.permissions.shown(user.name, user.role)
