"""The center's inventory schema (SQLAlchemy), the same on SQLite and PostgreSQL.

The whole inventory tree is the one table ``nodes``: datacenters at the root, folders,
clusters and hosts under them, and under each host what the center discovers on it (VMs,
datastores, networks). Permissions and tags hang on nodes, so that a grant on a folder
reaches everything below it by walking ``parent_id``. The tables ``clusters``, ``hosts``,
``vms``, ``datastores`` and ``networks`` add each kind's own columns to its node (a
cluster's: its high availability settings; a VM's HA restart priority is on ``vms``).

Placement rules (``rules``, ``rule_members``) bind VMs of one cluster together or keep
them apart; a rule goes with its cluster, and a VM leaves every rule when it goes.

Every foreign key deletes with its parent (``ON DELETE CASCADE``): removing a host's node
removes its VMs, datastores and networks, their tags' links and the permissions on them,
in the one statement. Schema changes go through the Alembic migrations beside this file;
a test checks that the migrations build exactly these tables.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from thinvisor.auth.roles import Role
from thinvisor.center.placement import RuleKind

#: Longest name of any node, tag or principal.
NAME_MAX = 255


class NodeKind(StrEnum):
    DATACENTER = "datacenter"
    FOLDER = "folder"
    CLUSTER = "cluster"
    HOST = "host"
    VM = "vm"
    DATASTORE = "datastore"
    NETWORK = "network"


#: Kinds made by hand whose names are unique in their parent (they make up paths).
CONTAINER_KINDS = (
    NodeKind.DATACENTER,
    NodeKind.FOLDER,
    NodeKind.CLUSTER,
    NodeKind.HOST,
)
#: Kinds the center discovers on a host, keyed by the provider's id, not by name.
DISCOVERED_KINDS = (NodeKind.VM, NodeKind.DATASTORE, NodeKind.NETWORK)


class HostState(StrEnum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"


class HaPriority(StrEnum):
    """In which order a VM is restarted when its host fails (``thinvisor.center.ha``)."""

    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"
    DISABLED = "disabled"
    """Never restarted elsewhere."""


#: How long a host of a cluster with HA may stay silent before it counts as failed.
DEFAULT_HA_TIMEOUT_S = 15.0


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(str(v)) for v in values)})"


#: The SQL condition of the partial index that keeps container names unique.
CONTAINER_WHERE = _in("kind", CONTAINER_KINDS)


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and read back timezone-aware on every backend (SQLite
    keeps no timezone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        stamp: datetime = value
        return stamp.replace(tzinfo=UTC) if stamp.tzinfo is None else stamp.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    # Named constraints, so that later migrations can address them on every backend.
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class NodeModel(Base):
    __tablename__ = "nodes"
    __table_args__ = (
        CheckConstraint(_in("kind", tuple(NodeKind)), name="kind"),
        # Datacenters, and only they, are roots.
        CheckConstraint("(kind = 'datacenter') = (parent_id IS NULL)", name="root"),
        Index(
            "uq_nodes_container_name",
            "parent_id",
            "name",
            unique=True,
            sqlite_where=text(CONTAINER_WHERE),
            postgresql_where=text(CONTAINER_WHERE),
        ),
        Index(
            "uq_nodes_root_name",
            "name",
            unique=True,
            sqlite_where=text("parent_id IS NULL"),
            postgresql_where=text("parent_id IS NULL"),
        ),
        Index("ix_nodes_kind_name", "kind", "name"),
        # Ids are never reused (SQLite would reuse the highest after a delete).
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(NAME_MAX))
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("nodes.id", ondelete="CASCADE"), index=True
    )
    created: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class HostModel(Base):
    __tablename__ = "hosts"
    __table_args__ = (
        CheckConstraint(_in("state", tuple(HostState)), name="state"),
        UniqueConstraint("provider", "address"),
    )

    node_id: Mapped[int] = mapped_column(
        ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True
    )
    provider: Mapped[str] = mapped_column(String(32))
    address: Mapped[str] = mapped_column(String(1024))
    username: Mapped[str | None] = mapped_column(String(NAME_MAX))
    secret: Mapped[str | None] = mapped_column(Text)
    """The password or token, sealed (``thinvisor.center.secrets``), never in clear."""
    fingerprint: Mapped[str | None] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    last_seen: Mapped[datetime | None] = mapped_column(UtcDateTime())
    vendor: Mapped[str | None] = mapped_column(String(NAME_MAX))
    version: Mapped[str | None] = mapped_column(String(NAME_MAX))
    cpus: Mapped[int | None] = mapped_column(Integer)
    memory_mib: Mapped[int | None] = mapped_column(BigInteger)
    maintenance: Mapped[bool] = mapped_column(default=False)
    agent_id: Mapped[str | None] = mapped_column(String(128))
    """The peer's own id for the host (``HostRecord.host_id``): what a thinvisor host's
    datastore heartbeat files are named by, so that HA finds them once it is gone."""
    core_mhz: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """One core's clock (0: unknown), the unit of CPU reservations: placement's input."""
    cpu_load: Mapped[float | None] = mapped_column(Float)
    """How busy its CPUs were at the last sync, 0 to 1 (None: not known)."""
    reserved_cpu_mhz: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    reserved_memory_mib: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    """What the host keeps for itself, that its VMs may not use."""


class ClusterModel(Base):
    """A cluster's own settings: high availability (``thinvisor.center.ha``)."""

    __tablename__ = "clusters"

    node_id: Mapped[int] = mapped_column(
        ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True
    )
    ha_enabled: Mapped[bool] = mapped_column(default=False)
    ha_timeout_s: Mapped[float] = mapped_column(Float, default=DEFAULT_HA_TIMEOUT_S)


class VmModel(Base):
    __tablename__ = "vms"
    __table_args__ = (
        UniqueConstraint("host_id", "ext_id"),
        # Every priority; migration r0003 spells the same list out.
        CheckConstraint(_in("ha_priority", tuple(HaPriority)), name="ha_priority"),
    )

    node_id: Mapped[int] = mapped_column(
        ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True
    )
    host_id: Mapped[int] = mapped_column(ForeignKey("hosts.node_id", ondelete="CASCADE"))
    ext_id: Mapped[str] = mapped_column(Text)
    """The provider's own id for the VM (stable across renames)."""
    power_state: Mapped[str] = mapped_column(String(16))
    last_power_state: Mapped[str | None] = mapped_column(String(16))
    """The power state when last known: kept while the host is away (``unknown``)."""
    cpus: Mapped[int] = mapped_column(Integer)
    memory_mib: Mapped[int] = mapped_column(BigInteger)
    template: Mapped[bool] = mapped_column(default=False)
    uuid: Mapped[str | None] = mapped_column(String(64))
    datastores: Mapped[list[str]] = mapped_column(JSON, default=list)
    """Names of the host's datastores that hold the VM's disks."""
    networks: Mapped[list[str]] = mapped_column(JSON, default=list)
    """Names of the host's networks that the VM's NICs are on."""
    ha_priority: Mapped[str] = mapped_column(
        String(16), default=HaPriority.MEDIUM.value, server_default=HaPriority.MEDIUM.value
    )
    """When it is restarted if its host fails, where its cluster has HA."""
    reserved_cpu_mhz: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    reserved_memory_mib: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    """What the VM reserves of its host while it runs (its resource reservations)."""


class DatastoreModel(Base):
    __tablename__ = "datastores"
    __table_args__ = (UniqueConstraint("host_id", "ext_id"),)

    node_id: Mapped[int] = mapped_column(
        ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True
    )
    host_id: Mapped[int] = mapped_column(ForeignKey("hosts.node_id", ondelete="CASCADE"))
    ext_id: Mapped[str] = mapped_column(Text)
    capacity_bytes: Mapped[int | None] = mapped_column(BigInteger)
    free_bytes: Mapped[int | None] = mapped_column(BigInteger)


class NetworkModel(Base):
    __tablename__ = "networks"
    __table_args__ = (UniqueConstraint("host_id", "ext_id"),)

    node_id: Mapped[int] = mapped_column(
        ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True
    )
    host_id: Mapped[int] = mapped_column(ForeignKey("hosts.node_id", ondelete="CASCADE"))
    ext_id: Mapped[str] = mapped_column(Text)


class TagModel(Base):
    __tablename__ = "tags"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_MAX), unique=True)
    category: Mapped[str | None] = mapped_column(String(NAME_MAX))


class NodeTagModel(Base):
    __tablename__ = "node_tags"

    node_id: Mapped[int] = mapped_column(
        ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True
    )
    tag_id: Mapped[int] = mapped_column(
        ForeignKey("tags.id", ondelete="CASCADE"), primary_key=True, index=True
    )


class PermissionModel(Base):
    __tablename__ = "permissions"
    __table_args__ = (
        # Every role, no-access included; migration r0001 spells the same list out.
        CheckConstraint(_in("role", tuple(Role)), name="role"),
        UniqueConstraint("node_id", "principal"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"))
    principal: Mapped[str] = mapped_column(String(NAME_MAX), index=True)
    """The user's name."""
    role: Mapped[str] = mapped_column(String(16))


class RuleModel(Base):
    """An affinity or anti-affinity rule of a cluster (``thinvisor.center.rules``)."""

    __tablename__ = "rules"
    __table_args__ = (
        # Every kind; migration r0002 spells the same list out.
        CheckConstraint(_in("kind", tuple(RuleKind)), name="kind"),
        UniqueConstraint("cluster_id", "name"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cluster_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(NAME_MAX))
    kind: Mapped[str] = mapped_column(String(16))


class RuleMemberModel(Base):
    """A VM of a rule."""

    __tablename__ = "rule_members"

    rule_id: Mapped[int] = mapped_column(
        ForeignKey("rules.id", ondelete="CASCADE"), primary_key=True
    )
    vm_id: Mapped[int] = mapped_column(
        ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True, index=True
    )
