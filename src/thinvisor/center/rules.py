"""Placement rules: which VMs of a cluster run on one host (affinity) and which never
share one (anti-affinity), as vCenter's DRS VM-VM rules. ``thinvisor.center.placement``
keeps them when it chooses hosts, evacuates one or balances a cluster.

A rule belongs to one cluster and names two VMs or more of that cluster's hosts; its
name is unique in the cluster. It is deleted with its cluster. A VM that leaves the
inventory leaves every rule it was in: a rule left with fewer than two VMs binds nothing
(``rules_for`` skips it), and ``list`` still shows it, for an operator to delete.

``Rules`` is a small class over the database; every method is one transaction and
returns frozen records.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from thinvisor.center.db import Database
from thinvisor.center.inventory import check_name, node_paths
from thinvisor.center.models import NodeKind, NodeModel, RuleMemberModel, RuleModel, VmModel
from thinvisor.center.placement import Rule, RuleKind
from thinvisor.errors import AlreadyExists, InvalidArgument, NotFound


@dataclass(frozen=True)
class RuleRow:
    """A stored rule: its cluster, and its VMs by path."""

    id: int
    cluster_id: int
    cluster_path: str
    name: str
    kind: RuleKind
    vm_ids: tuple[int, ...]
    vm_paths: tuple[str, ...]


def rule_kind(kind: RuleKind | str) -> RuleKind:
    """``kind`` as a ``RuleKind``; ``InvalidArgument`` naming ``kind`` if it is none."""
    try:
        return RuleKind(kind)
    except ValueError:
        choices = ", ".join(k.value for k in RuleKind)
        raise InvalidArgument("kind", f"{kind!r} is not a kind of rule ({choices})") from None


def _members(vm_ids: Iterable[int]) -> list[int]:
    """The distinct VM ids of a new rule, in their order; two at least."""
    members = list(dict.fromkeys(vm_ids))
    if any(isinstance(i, bool) or not isinstance(i, int) for i in members):
        raise InvalidArgument("vms", "VMs are given by their ids")
    if len(members) < 2:
        raise InvalidArgument("vms", "a rule needs two different VMs at least")
    return members


class Rules:
    """The placement rules of every cluster in ``db``. Thread-safe."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create(
        self, cluster_id: int, name: str, kind: RuleKind | str, vm_ids: Iterable[int]
    ) -> RuleRow:
        """A new rule of the cluster ``cluster_id`` over VMs of its hosts."""
        check_name(name)
        kind = rule_kind(kind)
        members = _members(vm_ids)
        with self.db.write() as session:
            cluster_path = _cluster_path(session, cluster_id)
            _check_vms(session, cluster_id, cluster_path, members)
            taken = f"cluster {cluster_path} already has a rule named {name!r}"
            query = select(RuleModel.id).where(
                RuleModel.cluster_id == cluster_id, RuleModel.name == name
            )
            if session.scalars(query).first() is not None:
                raise AlreadyExists(taken)
            rule = RuleModel(cluster_id=cluster_id, name=name, kind=kind.value)
            session.add(rule)
            try:
                session.flush()  # a concurrent writer may have taken the name meanwhile
            except IntegrityError:
                raise AlreadyExists(taken) from None
            session.add_all(RuleMemberModel(rule_id=rule.id, vm_id=vm_id) for vm_id in members)
            session.flush()
            return _rows(session, [rule])[0]

    def get(self, rule_id: int) -> RuleRow:
        """The rule ``rule_id`` (``NotFound`` if there is none)."""
        with self.db.read() as session:
            return _rows(session, [_rule(session, rule_id)])[0]

    def delete(self, rule_id: int) -> RuleRow:
        """Delete a rule; what it was (``NotFound`` if there is none)."""
        with self.db.write() as session:
            rule = _rule(session, rule_id)
            row = _rows(session, [rule])[0]
            session.delete(rule)  # its members go with it (ON DELETE CASCADE)
            return row

    def list(self, cluster_id: int | None = None) -> builtins.list[RuleRow]:
        """Every rule, or one cluster's, by cluster path and name."""
        query = select(RuleModel)
        if cluster_id is not None:
            query = query.where(RuleModel.cluster_id == cluster_id)
        with self.db.read() as session:
            return _rows(session, session.scalars(query).all())

    def rules_for(self, vm_ids: Iterable[int]) -> builtins.list[Rule]:
        """The rules binding any of ``vm_ids`` (each with all its VMs), for placement;
        rules left with fewer than two VMs bind nothing and are left out."""
        wanted = builtins.list(set(vm_ids))
        with self.db.read() as session:
            query = select(RuleMemberModel.rule_id).where(RuleMemberModel.vm_id.in_(wanted))
            ids = set(session.scalars(query))
            rules = session.scalars(select(RuleModel).where(RuleModel.id.in_(ids))).all()
            members = _member_ids(session, ids)
        found = [
            Rule(rule.name, RuleKind(rule.kind), frozenset(members.get(rule.id, ())))
            for rule in rules
            if len(members.get(rule.id, ())) >= 2
        ]
        return sorted(found, key=lambda rule: rule.name)


# --- helpers of the methods above -----------------------------------------------------


def _rule(session: Session, rule_id: int) -> RuleModel:
    rule = session.get(RuleModel, rule_id)
    if rule is None:
        raise NotFound(f"no rule with id {rule_id}")
    return rule


def _cluster_path(session: Session, cluster_id: int) -> str:
    """The path of the cluster ``cluster_id``; ``InvalidArgument`` naming ``cluster`` if
    there is no such node or it is no cluster."""
    node = session.get(NodeModel, cluster_id)
    if node is None:
        raise InvalidArgument("cluster", f"no cluster with id {cluster_id}")
    path = node_paths(session, [cluster_id])[cluster_id]
    if node.kind != NodeKind.CLUSTER:
        raise InvalidArgument("cluster", f"{node.kind} {path} is not a cluster")
    return path


def _check_vms(session: Session, cluster_id: int, cluster_path: str, members: list[int]) -> None:
    """``InvalidArgument`` naming ``vms`` unless every one of ``members`` is a VM (not a
    template) on a host of the cluster."""
    query = select(NodeModel.id, NodeModel.kind, NodeModel.parent_id).where(
        NodeModel.id.in_(members)
    )
    nodes = {row.id: row for row in session.execute(query)}
    missing = [vm_id for vm_id in members if vm_id not in nodes]
    if missing:
        raise InvalidArgument("vms", f"no VM with id {missing[0]}")
    paths = node_paths(session, members)
    for vm_id in members:
        if nodes[vm_id].kind != NodeKind.VM:
            raise InvalidArgument("vms", f"{nodes[vm_id].kind} {paths[vm_id]} is not a VM")
    # A VM's parent is its host, and a host in a cluster is right under it.
    hosts = {row.parent_id for row in nodes.values()}
    parents = select(NodeModel.id, NodeModel.parent_id).where(NodeModel.id.in_(hosts))
    cluster_of = {row.id: row.parent_id for row in session.execute(parents)}
    for vm_id in members:
        if cluster_of.get(nodes[vm_id].parent_id) != cluster_id:
            raise InvalidArgument("vms", f"vm {paths[vm_id]} is not in cluster {cluster_path}")
    templates = select(VmModel.node_id).where(
        VmModel.node_id.in_(members), VmModel.template.is_(True)
    )
    template = session.scalars(templates).first()
    if template is not None:
        raise InvalidArgument("vms", f"{paths[template]} is a template, not a VM")


def _member_ids(session: Session, rule_ids: Iterable[int]) -> dict[int, list[int]]:
    """The VM ids of each of ``rule_ids``."""
    query = select(RuleMemberModel.rule_id, RuleMemberModel.vm_id).where(
        RuleMemberModel.rule_id.in_(builtins.list(rule_ids))
    )
    found: dict[int, list[int]] = {}
    for rule_id, vm_id in session.execute(query):
        found.setdefault(rule_id, []).append(vm_id)
    return found


def _rows(session: Session, rules: Sequence[RuleModel]) -> list[RuleRow]:
    """``rules`` as records, by cluster path and name (three queries whatever their
    number)."""
    members = _member_ids(session, [rule.id for rule in rules])
    ids = {rule.cluster_id for rule in rules} | {v for vms in members.values() for v in vms}
    paths = node_paths(session, ids)
    rows = []
    for rule in rules:
        vms = sorted(members.get(rule.id, []), key=lambda vm_id: (paths[vm_id], vm_id))
        rows.append(
            RuleRow(
                id=rule.id,
                cluster_id=rule.cluster_id,
                cluster_path=paths[rule.cluster_id],
                name=rule.name,
                kind=RuleKind(rule.kind),
                vm_ids=tuple(vms),
                vm_paths=tuple(paths[vm_id] for vm_id in vms),
            )
        )
    return sorted(rows, key=lambda row: (row.cluster_path, row.name, row.id))
