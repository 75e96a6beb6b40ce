"""Who may do what where in the center's inventory.

A user has a role of their own (``thinvisor.auth``: admin, operator, read-only or
no-access, or none, which is the same as no-access); it applies at the root of the
inventory. A grant gives a user a role on one node (a datacenter, folder, cluster, host
or VM) and everything below it. On any node, the grant on the nearest node up the tree
wins, the node itself first; without one, the user's own role applies. A grant may so
raise a user's role on part of the tree (a no-access user who operates one folder) or
lower it (an admin who only reads another folder, or may not even see a third).

``Permissions`` is a small class over the database; every method is one transaction.
``visible`` answers for the whole tree at once (one query for the tree, the rest in
Python), for filtering lists; ``shown`` adds the nodes above the visible ones, which a
user sees as the path to what they may read (vCenter shows the parent folders of what one
may see in the same way), but not what else is in them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import CursorResult, delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from thinvisor.auth.roles import Permission, Role, allows
from thinvisor.center.db import Database
from thinvisor.center.inventory import ancestor_rows, check_name, node_paths, path_segment
from thinvisor.center.models import NodeModel, PermissionModel
from thinvisor.errors import AlreadyExists, InvalidArgument


@dataclass(frozen=True)
class Grant:
    """``principal`` holds ``role`` on the node ``node_id`` (at ``path``) and below."""

    node_id: int
    path: str
    principal: str
    role: Role


def _role(role: Role | str) -> Role:
    try:
        return Role(role)
    except ValueError:
        choices = ", ".join(r.value for r in Role)
        raise InvalidArgument("role", f"{role!r} is not a role (one of {choices})") from None


def _path(session: Session, node_id: int) -> str:
    return "/" + "/".join(path_segment(row.name) for row in ancestor_rows(session, node_id))


class Permissions:
    """Grants of roles on inventory nodes, and the role they give a user anywhere."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def grant(self, node_id: int, principal: str, role: Role | str) -> Grant:
        """Give ``principal`` ``role`` on a node and below (replacing their grant there)."""
        check_name(principal, "principal")
        role = _role(role)
        with self.db.write() as session:
            path = _path(session, node_id)
            query = select(PermissionModel).where(
                PermissionModel.node_id == node_id, PermissionModel.principal == principal
            )
            row = session.scalars(query).first()
            if row is None:
                session.add(PermissionModel(node_id=node_id, principal=principal, role=role.value))
            else:
                row.role = role.value
            try:
                session.flush()
            except IntegrityError:
                raise AlreadyExists(
                    f"{principal!r} was granted a role on {path} meanwhile"
                ) from None
            return Grant(node_id, path, principal, role)

    def revoke(self, node_id: int, principal: str) -> bool:
        """Take ``principal``'s grant on a node away; whether there was one."""
        with self.db.write() as session:
            query = select(PermissionModel).where(
                PermissionModel.node_id == node_id, PermissionModel.principal == principal
            )
            row = session.scalars(query).first()
            if row is None:
                return False
            session.delete(row)
            return True

    def revoke_all(self, principal: str) -> int:
        """Take every grant of ``principal`` away (their user is gone: a new user of that
        name must not inherit them); how many there were."""
        with self.db.write() as session:
            result = session.execute(
                delete(PermissionModel).where(PermissionModel.principal == principal),
                execution_options={"synchronize_session": False},
            )
            # A DELETE's result is a cursor's: it has the count of rows deleted.
            return cast(CursorResult[Any], result).rowcount

    def grants(self, node_id: int | None = None, principal: str | None = None) -> list[Grant]:
        """Grants (on one node, or of one principal, or all), by path and principal."""
        query = select(PermissionModel)
        if node_id is not None:
            query = query.where(PermissionModel.node_id == node_id)
        if principal is not None:
            query = query.where(PermissionModel.principal == principal)
        with self.db.read() as session:
            rows = session.scalars(query).all()
            paths = node_paths(session, {row.node_id for row in rows})
            found = [Grant(r.node_id, paths[r.node_id], r.principal, Role(r.role)) for r in rows]
        return sorted(found, key=lambda g: (g.path, g.principal))

    def effective_role(
        self, principal: str, node_id: int | None, default: Role | None
    ) -> Role | None:
        """``principal``'s role on a node: the nearest grant up the tree, else ``default``
        (their own role); ``node_id`` None is the root, where only ``default`` applies."""
        if node_id is None:
            return default
        with self.db.read() as session:
            chain = [row.id for row in ancestor_rows(session, node_id)]
            query = select(PermissionModel.node_id, PermissionModel.role).where(
                PermissionModel.principal == principal, PermissionModel.node_id.in_(chain)
            )
            granted = dict(session.execute(query).all())
        for ancestor in reversed(chain):  # the node itself first
            if ancestor in granted:
                return Role(granted[ancestor])
        return default

    def allowed(
        self,
        principal: str,
        default_role: Role | None,
        node_id: int | None,
        permission: Permission,
    ) -> bool:
        """Whether ``principal`` (whose own role is ``default_role``) holds ``permission``
        on the node ``node_id`` (None: the root)."""
        role = self.effective_role(principal, node_id, default_role)
        return role is not None and allows(role, permission)

    def visible(
        self,
        principal: str,
        default_role: Role | None,
        permission: Permission = Permission.READ,
    ) -> set[int] | None:
        """The ids of every node on which ``principal`` holds ``permission`` (``READ``: may
        see); None when that is every node, so that callers need not filter."""
        found = self._holding(principal, default_role, permission)
        return None if found is None else found[0]

    def shown(self, principal: str, default_role: Role | None) -> set[int] | None:
        """The ids of the nodes ``principal`` may read and of every node above them (the
        path to each); None when that is every node."""
        found = self._holding(principal, default_role, Permission.READ)
        if found is None:
            return None
        readable, edges = found
        return readable | _above(edges, readable)

    def _holding(
        self, principal: str, default_role: Role | None, permission: Permission
    ) -> tuple[set[int], Sequence[tuple[int, int | None]]] | None:
        """The nodes where ``principal`` holds ``permission`` and the tree's edges (child,
        parent); None when they hold it everywhere."""
        with self.db.read() as session:
            query = select(PermissionModel.node_id, PermissionModel.role).where(
                PermissionModel.principal == principal
            )
            granted = {node_id: Role(role) for node_id, role in session.execute(query)}
            if _everywhere(default_role, granted.values(), permission):
                return None
            if not granted:
                return set(), ()
            edges = session.execute(select(NodeModel.id, NodeModel.parent_id)).all()
        return _walk(edges, granted, default_role, permission), edges


def _everywhere(default: Role | None, granted: Iterable[Role], permission: Permission) -> bool:
    """Whether the user's own role and every grant of theirs hold ``permission``."""
    if default is None or not allows(default, permission):
        return False
    return all(allows(role, permission) for role in granted)


def _walk(
    edges: Iterable[tuple[int, int | None]],
    granted: dict[int, Role],
    default: Role | None,
    permission: Permission,
) -> set[int]:
    """Down the tree from the roots, each node's role being its grant or its parent's."""
    children: dict[int | None, list[int]] = defaultdict(list)
    for node_id, parent_id in edges:
        children[parent_id].append(node_id)
    found: set[int] = set()
    stack: list[tuple[int, Role | None]] = [(root, default) for root in children[None]]
    while stack:
        node_id, inherited = stack.pop()
        role = granted.get(node_id, inherited)
        if role is not None and allows(role, permission):
            found.add(node_id)
        stack.extend((child, role) for child in children.get(node_id, ()))
    return found


def _above(edges: Iterable[tuple[int, int | None]], ids: set[int]) -> set[int]:
    """Every node above one of ``ids``."""
    parents = dict(edges)
    found: set[int] = set()
    for node_id in ids:
        parent = parents.get(node_id)
        while parent is not None and parent not in found:
            found.add(parent)
            parent = parents.get(parent)
    return found
