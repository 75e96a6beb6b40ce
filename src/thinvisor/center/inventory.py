"""The center's inventory: the tree of datacenters, folders, clusters and hosts that
operators build, and the VMs, datastores and networks the center discovers on each host.

Every method is one transaction and returns frozen records (``Node``, ``HostRow``,
``VmRow``, ...), never database objects, so callers in any thread or in the event loop
hold plain values. A method that refuses its input raises before anything is written.

Where things may live (``ALLOWED_PARENTS``)::

    datacenter   at the root
    folder       under a datacenter or a folder
    cluster      under a datacenter or a folder
    host         under a datacenter, a folder or a cluster
    vm, datastore, network   under their host (found there by the center's sync)

Names of datacenters, folders, clusters and hosts are unique in their parent, so that a
path (``/dc1/prod/host1/vm1``) names one of them; a ``/`` or ``%`` inside a name shows
as ``%2F`` or ``%25`` in a path. What the center discovers is keyed by the provider's
own id (``ext_id``), not by name: two VMs of one host may share a name, and a VM renamed
on its host keeps its node (and its tags and permissions).

A cluster's high availability settings (``cluster_ha``, ``set_cluster_ha``) and a VM's
restart priority (``VmRow.ha_priority``, ``set_vm_ha_priority``) are kept here too; a
host's own id on its peer (``HostRow.agent_id``) is recorded each time it connects.

A VM live-migrated to another host keeps its node too (``move_vm``). While it moves
(``begin_move`` until ``move_vm`` or ``end_move``), the hosts' syncs leave it alone: the
source may say it is gone and the destination that it is there before the center learns
that the migration succeeded, and neither may delete it nor add it a second time.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, bindparam, delete, func, literal, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from thinvisor.center.db import Database
from thinvisor.center.models import (
    CONTAINER_KINDS,
    DEFAULT_HA_TIMEOUT_S,
    DISCOVERED_KINDS,
    NAME_MAX,
    ClusterModel,
    DatastoreModel,
    HaPriority,
    HostModel,
    HostState,
    NetworkModel,
    NodeKind,
    NodeModel,
    NodeTagModel,
    TagModel,
    VmModel,
    utcnow,
)
from thinvisor.center.secrets import SecretBox
from thinvisor.errors import AlreadyExists, Busy, InvalidArgument, NotFound
from thinvisor.providers import canonical_address
from thinvisor.providers.base import (
    DatastoreRecord,
    HostRecord,
    InventorySnapshot,
    NetworkRecord,
    PowerState,
    VmRecord,
)

#: The kinds of parent each kind of node may have (``None``: the root).
ALLOWED_PARENTS: dict[NodeKind, frozenset[NodeKind | None]] = {
    NodeKind.DATACENTER: frozenset({None}),
    NodeKind.FOLDER: frozenset({NodeKind.DATACENTER, NodeKind.FOLDER}),
    NodeKind.CLUSTER: frozenset({NodeKind.DATACENTER, NodeKind.FOLDER}),
    NodeKind.HOST: frozenset({NodeKind.DATACENTER, NodeKind.FOLDER, NodeKind.CLUSTER}),
    NodeKind.VM: frozenset({NodeKind.HOST}),
    NodeKind.DATASTORE: frozenset({NodeKind.HOST}),
    NodeKind.NETWORK: frozenset({NodeKind.HOST}),
}

# Listing order of siblings: containers first, then what the host holds.
_KIND_ORDER = {kind: i for i, kind in enumerate(NodeKind)}
# Rows deleted per statement (drivers limit the parameters of one statement).
_CHUNK = 500
#: The shortest and longest time a host of a cluster with HA may stay silent before it
#: counts as failed (the center heartbeats its hosts every second).
HA_TIMEOUT_S = (5.0, 3600.0)

# --- records --------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """One object of the inventory tree."""

    id: int
    kind: NodeKind
    name: str
    parent_id: int | None
    path: str


@dataclass(frozen=True)
class HostRow(Node):
    """A managed host; its password stays sealed in the database (``host_password``)."""

    provider: str
    address: str
    username: str | None
    fingerprint: str | None
    state: HostState
    error: str | None
    last_seen: datetime | None
    vendor: str | None
    version: str | None
    cpus: int | None
    memory_mib: int | None
    maintenance: bool
    agent_id: str | None = None
    """The peer's own id for the host (``HostRecord.host_id``), as last connected."""
    core_mhz: int = 0
    """One core's clock; 0: unknown."""
    cpu_load: float | None = None
    """How busy its CPUs were at the last sync, 0 to 1; None: not known."""
    reserved_cpu_mhz: int = 0
    reserved_memory_mib: int = 0
    """What the host keeps for itself."""


@dataclass(frozen=True)
class VmRow(Node):
    host_id: int
    host_name: str
    ext_id: str
    power_state: PowerState
    last_power_state: PowerState | None
    """The power state when last known (kept while the host is disconnected)."""
    cpus: int
    memory_mib: int
    template: bool
    uuid: str | None
    datastores: tuple[str, ...]
    networks: tuple[str, ...]
    ha_priority: HaPriority = HaPriority.MEDIUM
    """When it is restarted if its host fails, where its cluster has HA."""
    reserved_cpu_mhz: int = 0
    reserved_memory_mib: int = 0
    """What it reserves of its host while it runs."""


@dataclass(frozen=True)
class ClusterHa:
    """A cluster's high availability settings."""

    cluster_id: int
    path: str
    enabled: bool
    timeout_s: float
    """How long one of its hosts may stay silent before it counts as failed."""


@dataclass(frozen=True)
class DatastoreRow(Node):
    host_id: int
    ext_id: str
    capacity_bytes: int | None
    free_bytes: int | None


@dataclass(frozen=True)
class NetworkRow(Node):
    host_id: int
    ext_id: str


@dataclass(frozen=True)
class Tag:
    id: int
    name: str
    category: str | None


@dataclass(frozen=True)
class Move:
    """A VM on its way from one host to another (``Inventory.begin_move``)."""

    vm_id: int
    ext_id: str
    source: int
    destination: int


@dataclass(frozen=True)
class SyncDiff:
    """What one sync changed among a host's VMs, datastores and networks."""

    added: tuple[Node, ...] = ()
    changed: tuple[Node, ...] = ()
    removed: tuple[Node, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed)


# --- paths and names ------------------------------------------------------------------


def path_segment(name: str) -> str:
    """``name`` as one segment of a path (``/`` and ``%`` escaped)."""
    return name.replace("%", "%25").replace("/", "%2F")


def _unescape(segment: str) -> str:
    return segment.replace("%2F", "/").replace("%2f", "/").replace("%25", "%")


def _join(parent_path: str, name: str) -> str:
    return f"{parent_path.rstrip('/')}/{path_segment(name)}"


def check_name(name: str, field: str = "name") -> str:
    """``name`` if an operator may give it to a node or tag; ``InvalidArgument`` if not."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidArgument(field, "must not be empty")
    if len(name) > NAME_MAX:
        raise InvalidArgument(field, f"must be at most {NAME_MAX} characters")
    if "/" in name:
        raise InvalidArgument(field, f"{name!r} must not contain '/'")
    if name != name.strip():
        raise InvalidArgument(field, f"{name!r} must not begin or end with a space")
    if any(ch < " " or ch == "\x7f" for ch in name):
        raise InvalidArgument(field, f"{name!r} must not contain control characters")
    return name


def _discovered_name(record: VmRecord | DatastoreRecord | NetworkRecord) -> str:
    # A peer's names are taken as they are; only an empty or endless one is mended.
    return (record.name or record.id)[:NAME_MAX]


def _wildcard(pattern: str) -> re.Pattern[str]:
    """A shell pattern of ``*`` and ``?`` (nothing else is special) as a regex."""
    parts = (".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)
    return re.compile("".join(parts), re.DOTALL)


def _like(pattern: str) -> str:
    """The same pattern in SQL LIKE syntax (escape ``\\``), to narrow the rows first."""
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


# --- queries shared by the methods ----------------------------------------------------


def _get_node(session: Session, node_id: int) -> NodeModel:
    node = session.get(NodeModel, node_id)
    if node is None:
        raise NotFound(f"no inventory object with id {node_id}")
    return node


def _ancestors_query() -> Select[int, str, str, int | None, int]:
    """Walks up from the node ``:node_id`` (a recursive CTE, the same on every backend)."""
    depth = literal(0).label("depth")
    chain = (
        select(NodeModel.id, NodeModel.kind, NodeModel.name, NodeModel.parent_id, depth)
        .where(NodeModel.id == bindparam("node_id"))
        .cte("chain", recursive=True)
    )
    parent = aliased(NodeModel)
    chain = chain.union_all(
        select(parent.id, parent.kind, parent.name, parent.parent_id, chain.c.depth + 1).where(
            parent.id == chain.c.parent_id
        )
    )
    return select(chain).order_by(chain.c.depth.desc())


_ANCESTORS = _ancestors_query()


def ancestor_rows(session: Session, node_id: int) -> list[Any]:
    """Rows (``id``, ``kind``, ``name``, ``parent_id``) of a node and every node above it,
    the root first, in one query; ``NotFound`` if there is no such node."""
    rows = session.execute(_ANCESTORS, {"node_id": node_id}).all()
    if not rows:
        raise NotFound(f"no inventory object with id {node_id}")
    return list(rows)


def _path(session: Session, node_id: int) -> str:
    return "/" + "/".join(path_segment(row.name) for row in ancestor_rows(session, node_id))


def _container_paths(session: Session) -> dict[int, str]:
    """The path of every datacenter, folder, cluster and host, by node id (one query)."""
    rows = session.execute(
        select(NodeModel.id, NodeModel.name, NodeModel.parent_id).where(
            NodeModel.kind.in_(CONTAINER_KINDS)
        )
    ).all()
    parents = {row.id: (row.parent_id, row.name) for row in rows}
    paths: dict[int, str] = {}

    def path_of(node_id: int) -> str:
        if node_id not in paths:
            parent_id, name = parents[node_id]
            prefix = "" if parent_id is None else path_of(parent_id)
            paths[node_id] = _join(prefix or "/", name)
        return paths[node_id]

    for node_id in parents:
        path_of(node_id)
    return paths


def _children_of(parent_id: int | None) -> ColumnElement[bool]:
    """The condition on nodes that are in ``parent_id`` (None: at the root)."""
    if parent_id is None:
        return NodeModel.parent_id.is_(None)
    return NodeModel.parent_id == parent_id


def node_paths(session: Session, ids: Collection[int]) -> dict[int, str]:
    """The paths of the nodes ``ids`` that exist, in two queries whatever their number."""
    containers = _container_paths(session)
    found = {node_id: containers[node_id] for node_id in ids if node_id in containers}
    others = [node_id for node_id in ids if node_id not in containers]
    for chunk in _chunks(others):
        query = select(NodeModel.id, NodeModel.name, NodeModel.parent_id).where(
            NodeModel.id.in_(chunk)
        )
        for row in session.execute(query):
            # Only containers are roots: what is not one has a container for parent.
            found[row.id] = _join(containers[row.parent_id], row.name)
    return found


def _as_node(row: NodeModel, path: str) -> Node:
    return Node(row.id, NodeKind(row.kind), row.name, row.parent_id, path)


def _sorted(nodes: Iterable[Node]) -> list[Node]:
    return sorted(nodes, key=lambda n: (_KIND_ORDER[n.kind], n.name, n.id))


def _where(kind: NodeKind, name: str, parent: Node | None) -> str:
    place = parent.path if parent is not None else "the inventory"
    return f"{kind} {name!r} already exists in {place}"


def _check_free(session: Session, parent: Node | None, name: str) -> None:
    """``AlreadyExists`` if a container named ``name`` is already in ``parent``."""
    query = select(NodeModel.kind).where(
        NodeModel.name == name,
        NodeModel.kind.in_(CONTAINER_KINDS),
        _children_of(None if parent is None else parent.id),
    )
    kind = session.scalars(query).first()
    if kind is not None:
        raise AlreadyExists(_where(NodeKind(kind), name, parent))


def _check_parent(kind: NodeKind, parent: Node) -> None:
    if parent.kind not in ALLOWED_PARENTS[kind]:
        kinds = sorted(str(k) for k in ALLOWED_PARENTS[kind] if k is not None)
        where = " or ".join(filter(None, (", ".join(kinds[:-1]), kinds[-1]))) if kinds else ""
        only = f"only in a {where}" if where else "only at the root"
        raise InvalidArgument(
            "parent", f"a {kind} cannot be in {parent.kind} {parent.path} ({only})"
        )


def _flush(session: Session, conflict: str) -> None:
    """Write pending changes; a unique index that a concurrent writer won as ``conflict``."""
    try:
        session.flush()
    except IntegrityError:
        raise AlreadyExists(conflict) from None


def _chunks(ids: Sequence[int]) -> Iterable[Sequence[int]]:
    for start in range(0, len(ids), _CHUNK):
        yield ids[start : start + _CHUNK]


def _delete_nodes(session: Session, ids: Sequence[int]) -> None:
    """Delete nodes; the database cascades to everything under and on them."""
    for chunk in _chunks(ids):
        session.execute(
            delete(NodeModel).where(NodeModel.id.in_(chunk)),
            execution_options={"synchronize_session": False},
        )


def _assign(obj: object, values: dict[str, Any]) -> bool:
    """Set the attributes that differ; whether any did."""
    changed = False
    for key, value in values.items():
        if getattr(obj, key) != value:
            setattr(obj, key, value)
            changed = True
    return changed


# --- how each discovered kind is stored -----------------------------------------------


def _vm_values(record: VmRecord) -> dict[str, Any]:
    values: dict[str, Any] = {
        "power_state": PowerState(record.power_state).value,
        "cpus": record.cpus,
        "memory_mib": record.memory_mib,
        "template": record.template,
        "uuid": record.uuid,
        "datastores": list(record.datastores),
        "networks": list(record.networks),
        "reserved_cpu_mhz": record.reserved_cpu_mhz,
        "reserved_memory_mib": record.reserved_memory_mib,
    }
    if record.power_state != PowerState.UNKNOWN:
        values["last_power_state"] = values["power_state"]
    return values


def _datastore_values(record: DatastoreRecord) -> dict[str, Any]:
    return {"capacity_bytes": record.capacity_bytes, "free_bytes": record.free_bytes}


def _network_values(record: NetworkRecord) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class _Kind:
    """One discovered kind: its node kind, its table, and its columns from a record."""

    node_kind: NodeKind
    model: Any  # VmModel, DatastoreModel or NetworkModel: their columns are the same
    values: Callable[[Any], dict[str, Any]]


_VMS = _Kind(NodeKind.VM, VmModel, _vm_values)
_DATASTORES = _Kind(NodeKind.DATASTORE, DatastoreModel, _datastore_values)
_NETWORKS = _Kind(NodeKind.NETWORK, NetworkModel, _network_values)


class _Changes:
    """Collects a sync's changes, then freezes them as a ``SyncDiff``."""

    def __init__(self) -> None:
        self.added: list[Node] = []
        self.changed: list[Node] = []
        self.removed: list[Node] = []

    def freeze(self) -> SyncDiff:
        return SyncDiff(tuple(self.added), tuple(self.changed), tuple(self.removed))


def _sync_kind(
    session: Session,
    kind: _Kind,
    host: Node,
    records: Sequence[Any],
    changes: _Changes,
    *,
    complete: bool,
    keep: Collection[str] = (),
) -> None:
    """Make the host's rows of ``kind`` match ``records`` (keyed by ``record.id``);
    ``complete``: the records are all there are, so delete the rows not among them
    (except those whose ids are in ``keep``)."""
    wanted = {record.id: record for record in records}  # the last of a repeated id wins
    query = (
        select(kind.model, NodeModel)
        .join(NodeModel, NodeModel.id == kind.model.node_id)
        .where(kind.model.host_id == host.id)
    )
    if not complete:
        query = query.where(kind.model.ext_id.in_(list(wanted)))
    existing = {row.ext_id: (row, node) for row, node in session.execute(query)}
    _insert_new(session, kind, host, [r for i, r in wanted.items() if i not in existing], changes)
    gone: list[Node] = []
    for ext_id, (row, node) in existing.items():
        record = wanted.get(ext_id)
        if record is None:
            if ext_id not in keep:
                gone.append(_as_node(node, _join(host.path, node.name)))
            continue
        renamed = _assign(node, {"name": _discovered_name(record)})
        if _assign(row, kind.values(record)) or renamed:
            changes.changed.append(_as_node(node, _join(host.path, node.name)))
    _delete_nodes(session, [node.id for node in gone])
    changes.removed.extend(gone)


def _insert_new(
    session: Session, kind: _Kind, host: Node, records: Sequence[Any], changes: _Changes
) -> None:
    nodes = [
        NodeModel(kind=kind.node_kind.value, name=_discovered_name(r), parent_id=host.id)
        for r in records
    ]
    session.add_all(nodes)
    session.flush()  # one batched INSERT; gives the nodes their ids
    rows = [
        kind.model(node_id=node.id, host_id=host.id, ext_id=record.id, **kind.values(record))
        for node, record in zip(nodes, records, strict=True)
    ]
    session.add_all(rows)
    session.flush()
    changes.added.extend(_as_node(node, _join(host.path, node.name)) for node in nodes)


# --- the inventory --------------------------------------------------------------------


#: How long an ended move is remembered for snapshots begun before it ended.
ENDED_MOVES_KEPT_S = 600.0


class Inventory:
    """The inventory in ``db``; host passwords sealed with ``secrets``. Thread-safe."""

    def __init__(self, db: Database, secrets: SecretBox) -> None:
        self.db = db
        self.secrets = secrets
        # VMs being moved, by node id: in memory, as the migrations that move them are.
        self._moves: dict[int, Move] = {}
        # Moves that ended, when (monotonic) and the id the destination knows the VM by:
        # a snapshot begun before may still show the VM where it was.
        self._ended: dict[int, tuple[Move, float, str]] = {}
        self._moves_lock = threading.Lock()

    # --- the tree ---------------------------------------------------------------------

    def create_datacenter(self, name: str) -> Node:
        """A new datacenter at the root."""
        check_name(name)
        with self.db.write() as session:
            _check_free(session, None, name)
            node = NodeModel(kind=NodeKind.DATACENTER.value, name=name, parent_id=None)
            session.add(node)
            _flush(session, _where(NodeKind.DATACENTER, name, None))
            return _as_node(node, _join("/", name))

    def create_folder(self, parent_id: int, name: str) -> Node:
        """A new folder in a datacenter or a folder."""
        return self._create(NodeKind.FOLDER, parent_id, name)

    def create_cluster(self, parent_id: int, name: str) -> Node:
        """A new cluster in a datacenter or a folder."""
        return self._create(NodeKind.CLUSTER, parent_id, name)

    def _create(self, kind: NodeKind, parent_id: int, name: str) -> Node:
        check_name(name)
        with self.db.write() as session:
            parent = _load_node(session, parent_id)
            _check_parent(kind, parent)
            _check_free(session, parent, name)
            node = NodeModel(kind=kind.value, name=name, parent_id=parent.id)
            session.add(node)
            _flush(session, _where(kind, name, parent))
            if kind == NodeKind.CLUSTER:
                session.add(ClusterModel(node_id=node.id))
            return _as_node(node, _join(parent.path, name))

    def rename(self, node_id: int, name: str) -> Node:
        """Rename a datacenter, folder, cluster or host (a VM is renamed on its host)."""
        check_name(name)
        with self.db.write() as session:
            node = _load_node(session, node_id)
            _check_editable(node, "renamed")
            if name == node.name:
                return node
            parent = None if node.parent_id is None else _load_node(session, node.parent_id)
            _check_free(session, parent, name)
            row = _get_node(session, node_id)
            row.name = name
            _flush(session, _where(node.kind, name, parent))
            return _as_node(row, _join(parent.path if parent else "/", name))

    def move(self, node_id: int, parent_id: int) -> Node:
        """Move a folder, cluster or host (with all it holds) into another parent."""
        with self.db.write() as session:
            node = _load_node(session, node_id)
            _check_editable(node, "moved")
            parent = _load_node(session, parent_id)
            # The kind first: a host cannot be under a VM, whoever's VM it is.
            _check_parent(node.kind, parent)
            if node.id in {a.id for a in _ancestor_nodes(session, parent.id)}:
                raise InvalidArgument(
                    "parent", f"cannot move {node.path} into itself or into {parent.path} below it"
                )
            if node.parent_id == parent.id:
                return node
            _check_free(session, parent, node.name)
            row = _get_node(session, node_id)
            row.parent_id = parent.id
            _flush(session, _where(node.kind, node.name, parent))
            return _as_node(row, _join(parent.path, node.name))

    def delete(self, node_id: int) -> None:
        """Delete an empty datacenter, folder or cluster (a host: ``remove_host``)."""
        with self.db.write() as session:
            node = _load_node(session, node_id)
            if node.kind == NodeKind.HOST:
                raise InvalidArgument("node", f"{node.path} is a host: remove the host instead")
            _check_editable(node, "deleted")
            count = session.scalar(
                select(func.count()).select_from(NodeModel).where(NodeModel.parent_id == node.id)
            )
            if count:
                things = "object" if count == 1 else "objects"
                raise InvalidArgument(
                    "node", f"{node.kind} {node.path} is not empty ({count} {things} in it)"
                )
            _delete_nodes(session, [node.id])

    def get(self, node_id: int) -> Node:
        """The node ``node_id`` (``NotFound`` if there is none)."""
        with self.db.read() as session:
            return _load_node(session, node_id)

    def resolve(self, path: str) -> Node:
        """The node at ``path`` (``/dc1/prod/host1/vm1``); ``NotFound`` naming the path."""
        segments = _split_path(path)
        with self.db.read() as session:
            parent: Node | None = None
            for segment in segments:
                found = _child_named(session, parent, segment)
                if found is None:
                    raise NotFound(f"no inventory object at {path}")
                parent = found
            assert parent is not None  # _split_path gives at least one segment
            return parent

    def children(self, node_id: int | None = None) -> list[Node]:
        """The nodes in ``node_id`` (None: the datacenters), containers first, by name."""
        with self.db.read() as session:
            base = "/" if node_id is None else _load_node(session, node_id).path
            query = select(NodeModel).where(_children_of(node_id))
            rows = session.scalars(query).all()
            return _sorted(_as_node(row, _join(base, row.name)) for row in rows)

    def ancestors(self, node_id: int) -> list[Node]:
        """The node and every node above it, the datacenter first."""
        with self.db.read() as session:
            return _ancestor_nodes(session, node_id)

    def tree(self) -> list[dict[str, Any]]:
        """The whole inventory as nested dicts (``id``, ``kind``, ``name``, ``children``;
        hosts add ``state``, VMs ``power_state`` and ``template``), datacenters first."""
        with self.db.read() as session:
            nodes = session.execute(
                select(NodeModel.id, NodeModel.kind, NodeModel.name, NodeModel.parent_id)
            ).all()
            states = dict(session.execute(select(HostModel.node_id, HostModel.state)).all())
            vms = {
                row.node_id: row
                for row in session.execute(
                    select(VmModel.node_id, VmModel.power_state, VmModel.template)
                )
            }
        return _nest(nodes, states, vms)

    # --- hosts ------------------------------------------------------------------------

    def add_host(
        self,
        parent_id: int,
        name: str,
        provider: str,
        address: str,
        username: str | None = None,
        password: str | None = None,
        fingerprint: str | None = None,
    ) -> HostRow:
        """Register a host under a datacenter, folder or cluster (state ``connecting``)."""
        check_name(name)
        _check_text("provider", provider, 32)
        _check_text("address", address, 1024)
        with self.db.write() as session:
            parent = _load_node(session, parent_id)
            _check_parent(NodeKind.HOST, parent)
            _check_free(session, parent, name)
            _check_unregistered(session, provider, address)
            node = NodeModel(kind=NodeKind.HOST.value, name=name, parent_id=parent.id)
            session.add(node)
            _flush(session, _where(NodeKind.HOST, name, parent))
            secret = None if password is None else self.secrets.seal(password)
            session.add(
                HostModel(
                    node_id=node.id,
                    provider=provider,
                    address=address,
                    username=username,
                    secret=secret,
                    fingerprint=fingerprint,
                    state=HostState.CONNECTING.value,
                    maintenance=False,
                )
            )
            _flush(session, f"a {provider} host at {address} is already registered")
            return _load_host_row(session, node.id)

    def host_password(self, host_id: int) -> str | None:
        """The host's password or token, opened (None if it has none)."""
        with self.db.read() as session:
            secret = _load_host(session, host_id).secret
        return None if secret is None else self.secrets.open(secret)

    def update_host_credentials(
        self,
        host_id: int,
        username: str | None,
        password: str | None,
        fingerprint: str | None,
    ) -> HostRow:
        """Replace the credentials and the pinned fingerprint the center uses for a host."""
        secret = None if password is None else self.secrets.seal(password)
        with self.db.write() as session:
            host = _load_host(session, host_id, lock=True)
            _assign(host, {"username": username, "secret": secret, "fingerprint": fingerprint})
            session.flush()
            return _load_host_row(session, host_id)

    def hosts(self) -> list[HostRow]:
        """Every host, by path."""
        with self.db.read() as session:
            paths = _container_paths(session)
            query = select(HostModel, NodeModel).join(NodeModel, NodeModel.id == HostModel.node_id)
            rows = [_host_row(h, n, paths[n.id]) for h, n in session.execute(query)]
        return sorted(rows, key=lambda row: row.path)

    def host(self, host_id: int) -> HostRow:
        """The host ``host_id`` (``NotFound`` if there is none)."""
        with self.db.read() as session:
            return _load_host_row(session, host_id)

    def host_at(self, provider: str, address: str) -> HostRow | None:
        """The ``provider`` host registered at ``address`` (in any spelling of it), if any."""
        with self.db.read() as session:
            found = _registered(session, provider, address)
            return None if found is None else _load_host_row(session, found)

    def remove_host(self, host_id: int) -> None:
        """Forget a host with its VMs, datastores and networks (nothing on the host changes)."""
        with self.db.write() as session:
            _load_host(session, host_id, lock=True)
            _delete_nodes(session, [host_id])

    def set_host_connected(self, host_id: int, record: HostRecord) -> HostRow:
        """The host answers: record what it says about itself."""
        with self.db.write() as session:
            _mark_connected(_load_host(session, host_id, lock=True), record)
            session.flush()
            return _load_host_row(session, host_id)

    def set_host_disconnected(self, host_id: int, error: str) -> HostRow:
        """The host is away: its VMs' power states become ``unknown`` (each keeps its
        ``last_power_state``); nothing is deleted."""
        with self.db.write() as session:
            host = _load_host(session, host_id, lock=True)
            _assign(host, {"state": HostState.DISCONNECTED.value, "error": error})
            session.execute(
                update(VmModel)
                .where(VmModel.host_id == host_id)
                .values(power_state=PowerState.UNKNOWN.value),
                execution_options={"synchronize_session": False},
            )
            session.flush()
            return _load_host_row(session, host_id)

    # --- sync -------------------------------------------------------------------------

    def apply_snapshot(
        self, host_id: int, snap: InventorySnapshot, begun: float | None = None
    ) -> SyncDiff:
        """Make the host's VMs, datastores and networks what ``snap`` says (by each one's
        provider id: added, changed, gone ones deleted) and mark the host connected.
        Applying the same snapshot again changes nothing. A VM moving away is kept, and
        one moving in is not added, until its move ends; a VM whose move from or to the
        host ended after ``begun`` (``time.monotonic()`` when the snapshot was asked
        for) is left as the move left it: the snapshot may predate its end."""
        changes = _Changes()
        leaving, arriving = self._moving(host_id)
        late = self._moved_since(host_id, begun) if begun is not None else set()
        vms = [vm for vm in snap.vms if vm.id not in arriving and vm.id not in late]
        # Kept either way: one that arrived as this began is no longer the sync's to drop.
        keep = leaving | set(arriving) | late
        with self.db.write() as session:
            host = _load_host(session, host_id, lock=True)
            node = _load_node(session, host_id)
            _sync_kind(session, _VMS, node, vms, changes, complete=True, keep=keep)
            _sync_kind(session, _DATASTORES, node, snap.datastores, changes, complete=True)
            _sync_kind(session, _NETWORKS, node, snap.networks, changes, complete=True)
            _mark_connected(host, snap.host)
        return changes.freeze()

    def apply_vm(self, host_id: int, vm: VmRecord) -> VmRow:
        """Add or update one VM of the host (from an event or an operation's result). A VM
        moving in is not added until its move ends: the moving VM's row is returned."""
        arriving = self._moving(host_id)[1]
        if vm.id in arriving:
            with contextlib.suppress(NotFound):  # gone meanwhile (its host removed): add it
                return self.vm(arriving[vm.id])
        with self.db.write() as session:
            _load_host(session, host_id, lock=True)
            node = _load_node(session, host_id)
            _sync_kind(session, _VMS, node, [vm], _Changes(), complete=False)
            rows = _vm_rows(
                session, _vm_query().where(VmModel.host_id == host_id, VmModel.ext_id == vm.id)
            )
            return rows[0]

    def remove_vm(self, host_id: int, ext_id: str) -> bool:
        """Forget one VM of the host; whether it was known. A VM moving away is kept."""
        if ext_id in self._moving(host_id)[0]:
            return False
        with self.db.write() as session:
            _load_host(session, host_id, lock=True)
            query = select(VmModel.node_id).where(
                VmModel.host_id == host_id, VmModel.ext_id == ext_id
            )
            node_id = session.scalars(query).first()
            if node_id is None:
                return False
            _delete_nodes(session, [node_id])
            return True

    # --- moving VMs between hosts -----------------------------------------------------

    def begin_move(self, vm_id: int, host_id: int) -> Move:
        """Mark the VM as moving to the host ``host_id``, until ``move_vm`` or ``end_move``:
        meanwhile its host's sync keeps it and the destination's does not add it.
        ``Busy`` if it is moving already."""
        vm = self.vm(vm_id)
        self.host(host_id)  # NotFound if there is none
        move = Move(vm.id, vm.ext_id, vm.host_id, host_id)
        with self._moves_lock:
            if vm_id in self._moves:
                raise Busy(f"vm {vm.path} is already being moved to another host")
            self._moves[vm_id] = move
        return move

    def end_move(self, vm_id: int, *, arrived_as: str | None = None) -> None:
        """The VM no longer moves (its migration failed, or ``move_vm`` ended it; there
        the destination knows it as ``arrived_as``, if not by the same id)."""
        now = time.monotonic()
        with self._moves_lock:
            move = self._moves.pop(vm_id, None)
            if move is not None:
                self._ended[vm_id] = (move, now, arrived_as or move.ext_id)
            stale = [i for i, (_, t, _) in self._ended.items() if now - t > ENDED_MOVES_KEPT_S]
            for old in stale:
                del self._ended[old]

    def move_vm(self, vm_id: int, host_id: int, *, ext_id: str | None = None) -> VmRow:
        """The VM now lives on the host ``host_id``: its row keeps its id (its tags, the
        grants on it, its HA priority and rules follow it) and goes under that host,
        where the host's provider knows it by the same id, or by ``ext_id`` (a VM moved
        to another provider kind). A row the destination's sync made for it meanwhile is
        dropped. Ends its move, if it was moving."""
        with self.db.write() as session:
            source = session.scalars(
                select(VmModel.host_id).where(VmModel.node_id == vm_id)
            ).first()
            if source is None:
                raise NotFound(f"no vm with id {vm_id}")
            for locked in sorted({source, host_id}):  # one order: no deadlock with a move back
                _load_host(session, locked, lock=True)
            row = session.get(VmModel, vm_id, populate_existing=True)
            if row is None:
                raise NotFound(f"no vm with id {vm_id}")
            arrived_as = ext_id or row.ext_id
            twin = select(VmModel.node_id).where(
                VmModel.host_id == host_id, VmModel.ext_id == arrived_as, VmModel.node_id != vm_id
            )
            _delete_nodes(session, list(session.scalars(twin)))
            row.host_id, row.ext_id = host_id, arrived_as
            _get_node(session, vm_id).parent_id = host_id
            session.flush()
            moved = _vm_rows(session, _vm_query().where(VmModel.node_id == vm_id))[0]
        # Once committed: a sync that looks now finds it moved.
        self.end_move(vm_id, arrived_as=arrived_as)
        return moved

    def _moving(self, host_id: int) -> tuple[set[str], dict[str, int]]:
        """The ids on their providers of the VMs moving away from the host, and of those
        moving to it (with their node ids)."""
        with self._moves_lock:
            moves = list(self._moves.values())
        leaving = {m.ext_id for m in moves if m.source == host_id}
        arriving = {m.ext_id: m.vm_id for m in moves if m.destination == host_id}
        return leaving, arriving

    def _moved_since(self, host_id: int, begun: float) -> set[str]:
        """The ids on their providers of the VMs whose move from or to the host ended
        after ``begun``."""
        with self._moves_lock:
            ended = [(m, arrived) for m, t, arrived in self._ended.values() if t >= begun]
        return {m.ext_id for m, _ in ended if m.source == host_id} | {
            arrived for m, arrived in ended if m.destination == host_id
        }

    # --- high availability ------------------------------------------------------------

    def cluster_ha(self, cluster_id: int) -> ClusterHa:
        """The HA settings of the cluster ``cluster_id`` (``NotFound`` if it is none)."""
        with self.db.read() as session:
            return _cluster_ha(session, cluster_id)

    def set_cluster_ha(
        self, cluster_id: int, enabled: bool, timeout_s: float | None = None
    ) -> ClusterHa:
        """Turn HA on or off for a cluster; ``timeout_s`` None keeps the current one."""
        if timeout_s is not None:
            _check_ha_timeout(timeout_s)
        with self.db.write() as session:
            _cluster_ha(session, cluster_id)  # NotFound unless a cluster
            row = session.get(ClusterModel, cluster_id)
            if row is None:  # a cluster from before its settings had a table
                row = ClusterModel(node_id=cluster_id, ha_timeout_s=DEFAULT_HA_TIMEOUT_S)
                session.add(row)
            row.ha_enabled = bool(enabled)
            if timeout_s is not None:
                row.ha_timeout_s = float(timeout_s)
            session.flush()
            return _cluster_ha(session, cluster_id)

    def ha_clusters(self, *, enabled: bool | None = None) -> list[ClusterHa]:
        """Every cluster's HA settings, by path; only those with HA on (or off) if
        ``enabled`` says."""
        query = select(NodeModel.id, ClusterModel.ha_enabled, ClusterModel.ha_timeout_s).outerjoin(
            ClusterModel, ClusterModel.node_id == NodeModel.id
        )
        with self.db.read() as session:
            paths = _container_paths(session)
            rows = session.execute(query.where(NodeModel.kind == NodeKind.CLUSTER.value)).all()
        found = [_as_cluster_ha(row.id, paths[row.id], row) for row in rows]
        found = [c for c in found if enabled is None or c.enabled == enabled]
        return sorted(found, key=lambda c: c.path)

    def set_vm_ha_priority(self, vm_id: int, priority: HaPriority | str) -> VmRow:
        """Set when the VM is restarted if its host fails (``InvalidArgument`` naming
        ``priority`` if it is none of ``HaPriority``)."""
        chosen = ha_priority(priority)
        with self.db.write() as session:
            row = session.get(VmModel, vm_id)
            if row is None:
                raise NotFound(f"no vm with id {vm_id}")
            row.ha_priority = chosen.value
            session.flush()
            return _vm_rows(session, _vm_query().where(VmModel.node_id == vm_id))[0]

    # --- VMs, datastores, networks ----------------------------------------------------

    def vms(self, host_id: int | None = None, template: bool | None = None) -> list[VmRow]:
        """VMs by path: all, or one host's; only templates or only VMs if ``template``."""
        query = _vm_query()
        if host_id is not None:
            query = query.where(VmModel.host_id == host_id)
        if template is not None:
            query = query.where(VmModel.template == template)
        with self.db.read() as session:
            return _vm_rows(session, query)

    def vm(self, node_id: int) -> VmRow:
        """The VM ``node_id`` (``NotFound`` if there is none)."""
        with self.db.read() as session:
            rows = _vm_rows(session, _vm_query().where(VmModel.node_id == node_id))
        if not rows:
            raise NotFound(f"no vm with id {node_id}")
        return rows[0]

    def vm_by_ext_id(self, host_id: int, ext_id: str) -> VmRow:
        """The VM the host's provider calls ``ext_id``."""
        query = _vm_query().where(VmModel.host_id == host_id, VmModel.ext_id == ext_id)
        with self.db.read() as session:
            rows = _vm_rows(session, query)
        if not rows:
            raise NotFound(f"no vm {ext_id!r} on host {host_id}")
        return rows[0]

    def find_vms(self, name: str) -> list[VmRow]:
        """VMs of every host named ``name``, or matching it where it has ``*`` or ``?``."""
        if "*" not in name and "?" not in name:
            with self.db.read() as session:
                return _vm_rows(session, _vm_query().where(NodeModel.name == name))
        # LIKE narrows the rows (case-insensitively on SQLite), the pattern decides.
        query = _vm_query().where(NodeModel.name.like(_like(name), escape="\\"))
        with self.db.read() as session:
            rows = _vm_rows(session, query)
        pattern = _wildcard(name)
        return [row for row in rows if pattern.fullmatch(row.name)]

    def datastores(self, host_id: int | None = None) -> list[DatastoreRow]:
        """Datastores by path: all, or one host's."""
        with self.db.read() as session:
            paths = _container_paths(session)
            query = _discovered_query(DatastoreModel, host_id)
            rows = [
                DatastoreRow(
                    **_node_fields(node, paths),
                    host_id=row.host_id,
                    ext_id=row.ext_id,
                    capacity_bytes=row.capacity_bytes,
                    free_bytes=row.free_bytes,
                )
                for row, node in session.execute(query)
            ]
        return sorted(rows, key=lambda row: row.path)

    def networks(self, host_id: int | None = None) -> list[NetworkRow]:
        """Networks by path: all, or one host's."""
        with self.db.read() as session:
            paths = _container_paths(session)
            query = _discovered_query(NetworkModel, host_id)
            rows = [
                NetworkRow(**_node_fields(node, paths), host_id=row.host_id, ext_id=row.ext_id)
                for row, node in session.execute(query)
            ]
        return sorted(rows, key=lambda row: row.path)

    # --- tags -------------------------------------------------------------------------

    def create_tag(self, name: str, category: str | None = None) -> Tag:
        """A new tag (names are unique), optionally in a category."""
        check_name(name)
        if category is not None:
            check_name(category, "category")
        with self.db.write() as session:
            if session.scalars(select(TagModel.id).where(TagModel.name == name)).first():
                raise AlreadyExists(f"tag {name!r} already exists")
            tag = TagModel(name=name, category=category)
            session.add(tag)
            _flush(session, f"tag {name!r} already exists")
            return Tag(tag.id, tag.name, tag.category)

    def delete_tag(self, name: str) -> None:
        """Delete a tag, and take it off every node."""
        with self.db.write() as session:
            tag = _tag(session, name)
            session.execute(delete(TagModel).where(TagModel.id == tag.id))

    def tags(self) -> list[Tag]:
        """Every tag, by name."""
        with self.db.read() as session:
            rows = session.scalars(select(TagModel).order_by(TagModel.name)).all()
            return [Tag(t.id, t.name, t.category) for t in rows]

    def tag(self, node_id: int, name: str) -> None:
        """Put the tag ``name`` on a node (no change if it is there already)."""
        with self.db.write() as session:
            _get_node(session, node_id)
            tag = _tag(session, name)
            if session.get(NodeTagModel, (node_id, tag.id)) is None:
                session.add(NodeTagModel(node_id=node_id, tag_id=tag.id))
                _flush(session, f"{node_id} is already tagged {name!r}")

    def untag(self, node_id: int, name: str) -> bool:
        """Take the tag ``name`` off a node; whether it was on it."""
        with self.db.write() as session:
            _get_node(session, node_id)
            tag = _tag(session, name)
            link = session.get(NodeTagModel, (node_id, tag.id))
            if link is None:
                return False
            session.delete(link)
            return True

    def tags_of(self, node_id: int) -> list[Tag]:
        """The tags on a node, by name."""
        with self.db.read() as session:
            _get_node(session, node_id)
            query = (
                select(TagModel)
                .join(NodeTagModel, NodeTagModel.tag_id == TagModel.id)
                .where(NodeTagModel.node_id == node_id)
                .order_by(TagModel.name)
            )
            return [Tag(t.id, t.name, t.category) for t in session.scalars(query)]

    def tagged(self, name: str) -> list[Node]:
        """The nodes that carry the tag ``name``, by path."""
        with self.db.read() as session:
            tag = _tag(session, name)
            query = (
                select(NodeModel)
                .join(NodeTagModel, NodeTagModel.node_id == NodeModel.id)
                .where(NodeTagModel.tag_id == tag.id)
            )
            paths = _container_paths(session)
            nodes = [Node(**_node_fields(n, paths)) for n in session.scalars(query)]
        return sorted(nodes, key=lambda node: node.path)


# --- helpers of the methods above -----------------------------------------------------


def _load_node(session: Session, node_id: int) -> Node:
    rows = ancestor_rows(session, node_id)
    path = "/" + "/".join(path_segment(row.name) for row in rows)
    last = rows[-1]
    return Node(last.id, NodeKind(last.kind), last.name, last.parent_id, path)


def _ancestor_nodes(session: Session, node_id: int) -> list[Node]:
    nodes, path = [], ""
    for row in ancestor_rows(session, node_id):
        path = _join(path or "/", row.name)
        nodes.append(Node(row.id, NodeKind(row.kind), row.name, row.parent_id, path))
    return nodes


def _check_editable(node: Node, verb: str) -> None:
    if node.kind in DISCOVERED_KINDS:
        raise InvalidArgument(
            "node", f"{node.kind} {node.path} belongs to its host and cannot be {verb} here"
        )
    if verb == "moved" and node.kind == NodeKind.DATACENTER:
        raise InvalidArgument("node", f"datacenter {node.path} stays at the root")


def _child_named(session: Session, parent: Node | None, name: str) -> Node | None:
    condition = _children_of(None if parent is None else parent.id)
    rows = session.scalars(select(NodeModel).where(condition, NodeModel.name == name)).all()
    if not rows:
        return None
    base = parent.path if parent is not None else "/"
    return _sorted(_as_node(row, _join(base, row.name)) for row in rows)[0]


def _load_host(session: Session, host_id: int, *, lock: bool = False) -> HostModel:
    # Locking the host's row orders every writer of one host's inventory (PostgreSQL;
    # SQLite's writers are serialised anyway).
    query = select(HostModel).where(HostModel.node_id == host_id)
    host = session.scalars(query.with_for_update() if lock else query).first()
    if host is None:
        raise NotFound(f"no host with id {host_id}")
    return host


def _load_host_row(session: Session, host_id: int) -> HostRow:
    host = _load_host(session, host_id)
    return _host_row(host, _get_node(session, host_id), _path(session, host_id))


def _registered(session: Session, provider: str, address: str) -> int | None:
    """The id of the ``provider`` host at ``address``, in whatever spelling it was stored."""
    query = select(HostModel.node_id, HostModel.address).where(HostModel.provider == provider)
    wanted = _canonical(provider, address)
    for node_id, stored in session.execute(query):
        if _canonical(provider, stored) == wanted:
            found: int = node_id
            return found
    return None


def _canonical(provider: str, address: str) -> str:
    try:
        return canonical_address(provider, address)
    except InvalidArgument:
        return address  # not one of the kind's addresses: only the same text is the same


def _check_unregistered(session: Session, provider: str, address: str) -> None:
    existing = _registered(session, provider, address)
    if existing is not None:
        raise AlreadyExists(
            f"a {provider} host at {address} is already registered as {_path(session, existing)}"
        )


def _vm_rows(session: Session, query: Select[*tuple[Any, ...]]) -> list[VmRow]:
    paths = _container_paths(session)
    rows = [_vm_row(row, paths) for row in session.execute(query)]
    return sorted(rows, key=lambda row: (row.path, row.id))


def _split_path(path: str) -> list[str]:
    trimmed = path[:-1] if path.endswith("/") and len(path) > 1 else path
    segments = trimmed.split("/")[1:]
    if not trimmed.startswith("/") or not segments or "" in segments:
        raise InvalidArgument("path", f"{path!r} is not a path such as /dc1/folder/host1")
    return [_unescape(segment) for segment in segments]


def _check_text(field: str, value: str, limit: int) -> None:
    if not isinstance(value, str) or not value.strip():
        raise InvalidArgument(field, "must not be empty")
    if len(value) > limit:
        raise InvalidArgument(field, f"must be at most {limit} characters")


def _mark_connected(host: HostModel, record: HostRecord) -> None:
    if record.host_id is not None:  # a peer that has none keeps what it said before
        host.agent_id = record.host_id
    _assign(
        host,
        {
            "state": HostState.CONNECTED.value,
            "error": None,
            "vendor": record.vendor,
            "version": record.version,
            "cpus": record.cpus,
            "memory_mib": record.memory_mib,
            "maintenance": record.maintenance,
            "core_mhz": record.core_mhz,
            "cpu_load": record.cpu_load,
            "reserved_cpu_mhz": record.reserved_cpu_mhz,
            "reserved_memory_mib": record.reserved_memory_mib,
        },
    )
    host.last_seen = utcnow()


def _node_fields(node: Any, paths: dict[int, str]) -> dict[str, Any]:
    """Node's fields of a ``NodeModel`` (or a row of its columns), its path from the paths
    of its containers."""
    if node.id in paths:
        path = paths[node.id]
    else:
        assert node.parent_id is not None  # only datacenters are roots, and they are in paths
        path = _join(paths[node.parent_id], node.name)
    return {
        "id": node.id,
        "kind": NodeKind(node.kind),
        "name": node.name,
        "parent_id": node.parent_id,
        "path": path,
    }


def _host_row(host: HostModel, node: NodeModel, path: str) -> HostRow:
    return HostRow(
        **_node_fields(node, {node.id: path}),
        provider=host.provider,
        address=host.address,
        username=host.username,
        fingerprint=host.fingerprint,
        state=HostState(host.state),
        error=host.error,
        last_seen=host.last_seen,
        vendor=host.vendor,
        version=host.version,
        cpus=host.cpus,
        memory_mib=host.memory_mib,
        maintenance=host.maintenance,
        agent_id=host.agent_id,
        core_mhz=host.core_mhz,
        cpu_load=host.cpu_load,
        reserved_cpu_mhz=host.reserved_cpu_mhz,
        reserved_memory_mib=host.reserved_memory_mib,
    )


def _vm_query() -> Select[*tuple[Any, ...]]:
    """A VM's columns with its node's and its host's name, as plain rows: loading no
    ORM objects halves the time a listing of thousands takes."""
    host_node = aliased(NodeModel)
    columns = (NodeModel.id, NodeModel.kind, NodeModel.name, NodeModel.parent_id)
    columns += tuple(getattr(VmModel, name) for name in _VM_SELECTED)
    return (
        select(*columns, host_node.name.label("host_name"))
        .join(VmModel, VmModel.node_id == NodeModel.id)
        .join(host_node, host_node.id == VmModel.host_id)
    )


# Columns of ``vms`` that a VmRow takes as they are.
_VM_COLUMNS = (
    "host_id",
    "ext_id",
    "cpus",
    "memory_mib",
    "template",
    "uuid",
    "reserved_cpu_mhz",
    "reserved_memory_mib",
)
_VM_SELECTED = (
    *_VM_COLUMNS,
    "power_state",
    "last_power_state",
    "datastores",
    "networks",
    "ha_priority",
)


def _vm_row(row: Any, paths: dict[int, str]) -> VmRow:
    last = None if row.last_power_state is None else PowerState(row.last_power_state)
    return VmRow(
        **_node_fields(row, paths),
        **{name: getattr(row, name) for name in _VM_COLUMNS},
        host_name=row.host_name,
        power_state=PowerState(row.power_state),
        last_power_state=last,
        datastores=tuple(row.datastores),
        networks=tuple(row.networks),
        ha_priority=HaPriority(row.ha_priority),
    )


def ha_priority(value: HaPriority | str) -> HaPriority:
    """``value`` as a ``HaPriority``; ``InvalidArgument`` naming ``priority`` if none."""
    try:
        return HaPriority(value)
    except ValueError:
        choices = ", ".join(p.value for p in HaPriority)
        raise InvalidArgument("priority", f"{value!r} is not one of {choices}") from None


def _check_ha_timeout(timeout_s: float) -> None:
    low, high = HA_TIMEOUT_S
    number = isinstance(timeout_s, int | float) and not isinstance(timeout_s, bool)
    if not number or not low <= timeout_s <= high:
        raise InvalidArgument(
            "timeout_s", f"must be from {low:g} to {high:g} seconds, not {timeout_s!r}"
        )


def _cluster_ha(session: Session, cluster_id: int) -> ClusterHa:
    """The cluster's HA settings (its defaults where it has no row yet)."""
    node = session.get(NodeModel, cluster_id)
    if node is None or node.kind != NodeKind.CLUSTER.value:
        raise NotFound(f"no cluster with id {cluster_id}")
    return _as_cluster_ha(
        cluster_id, _path(session, cluster_id), session.get(ClusterModel, cluster_id)
    )


def _as_cluster_ha(cluster_id: int, path: str, row: Any) -> ClusterHa:
    """A ``ClusterHa`` from a row with ``ha_enabled`` and ``ha_timeout_s`` (None, or
    None values: the defaults)."""
    enabled = None if row is None else row.ha_enabled
    timeout = None if row is None else row.ha_timeout_s
    return ClusterHa(
        cluster_id=cluster_id,
        path=path,
        enabled=bool(enabled),
        timeout_s=DEFAULT_HA_TIMEOUT_S if timeout is None else float(timeout),
    )


def _discovered_query(
    model: type[DatastoreModel] | type[NetworkModel], host_id: int | None
) -> Select[Any, NodeModel]:
    query = select(model, NodeModel).join(NodeModel, NodeModel.id == model.node_id)
    return query if host_id is None else query.where(model.host_id == host_id)


def _tag(session: Session, name: str) -> TagModel:
    tag = session.scalars(select(TagModel).where(TagModel.name == name)).first()
    if tag is None:
        raise NotFound(f"no tag {name!r}")
    return tag


def _nest(
    nodes: Sequence[Any], states: dict[int, str], vms: dict[int, Any]
) -> list[dict[str, Any]]:
    """Rows of ``nodes`` as the nested dicts of ``Inventory.tree``."""
    entries: dict[int, dict[str, Any]] = {}
    for row in nodes:
        entry: dict[str, Any] = {"id": row.id, "kind": row.kind, "name": row.name, "children": []}
        if row.id in states:
            entry["state"] = states[row.id]
        if row.id in vms:
            entry["power_state"] = vms[row.id].power_state
            entry["template"] = vms[row.id].template
        entries[row.id] = entry
    roots: list[dict[str, Any]] = []
    for row in nodes:
        siblings = roots if row.parent_id is None else entries[row.parent_id]["children"]
        siblings.append(entries[row.id])
    _sort_entries(roots)
    return roots


def _sort_entries(entries: list[dict[str, Any]]) -> None:
    entries.sort(key=lambda e: (_KIND_ORDER[NodeKind(e["kind"])], e["name"], e["id"]))
    for entry in entries:
        _sort_entries(entry["children"])
