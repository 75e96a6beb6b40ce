"""The inventory: the node tree, hosts, VMs, datastores, networks, tags, permissions.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_CONTAINERS = "kind IN ('datacenter', 'folder', 'cluster', 'host')"
_KINDS = "kind IN ('datacenter', 'folder', 'cluster', 'host', 'vm', 'datastore', 'network')"


def _node_fk(table: str, column: str = "node_id") -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        [column], ["nodes.id"], name=f"fk_{table}_{column}_nodes", ondelete="CASCADE"
    )


def _host_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["host_id"], ["hosts.node_id"], name=f"fk_{table}_host_id_hosts", ondelete="CASCADE"
    )


def upgrade() -> None:
    _nodes()
    _hosts()
    _discovered()
    _tags()
    _permissions()


def _nodes() -> None:
    op.create_table(
        "nodes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_nodes"),
        sa.CheckConstraint(_KINDS, name=op.f("ck_nodes_kind")),
        sa.CheckConstraint(
            "(kind = 'datacenter') = (parent_id IS NULL)", name=op.f("ck_nodes_root")
        ),
        _node_fk("nodes", "parent_id"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_nodes_parent_id", "nodes", ["parent_id"])
    op.create_index("ix_nodes_kind_name", "nodes", ["kind", "name"])
    op.create_index(
        "uq_nodes_container_name",
        "nodes",
        ["parent_id", "name"],
        unique=True,
        sqlite_where=sa.text(_CONTAINERS),
        postgresql_where=sa.text(_CONTAINERS),
    )
    op.create_index(
        "uq_nodes_root_name",
        "nodes",
        ["name"],
        unique=True,
        sqlite_where=sa.text("parent_id IS NULL"),
        postgresql_where=sa.text("parent_id IS NULL"),
    )


def _hosts() -> None:
    op.create_table(
        "hosts",
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("provider", sa.String(32), nullable=False),
        sa.Column("address", sa.String(1024), nullable=False),
        sa.Column("username", sa.String(255), nullable=True),
        sa.Column("secret", sa.Text(), nullable=True),
        sa.Column("fingerprint", sa.String(128), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=True),
        sa.Column("vendor", sa.String(255), nullable=True),
        sa.Column("version", sa.String(255), nullable=True),
        sa.Column("cpus", sa.Integer(), nullable=True),
        sa.Column("memory_mib", sa.BigInteger(), nullable=True),
        sa.Column("maintenance", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("node_id", name="pk_hosts"),
        sa.CheckConstraint(
            "state IN ('connecting', 'connected', 'disconnected')", name=op.f("ck_hosts_state")
        ),
        sa.UniqueConstraint("provider", "address", name="uq_hosts_provider_address"),
        _node_fk("hosts"),
    )


def _discovered() -> None:
    op.create_table(
        "vms",
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("host_id", sa.Integer(), nullable=False),
        sa.Column("ext_id", sa.Text(), nullable=False),
        sa.Column("power_state", sa.String(16), nullable=False),
        sa.Column("last_power_state", sa.String(16), nullable=True),
        sa.Column("cpus", sa.Integer(), nullable=False),
        sa.Column("memory_mib", sa.BigInteger(), nullable=False),
        sa.Column("template", sa.Boolean(), nullable=False),
        sa.Column("uuid", sa.String(64), nullable=True),
        sa.Column("datastores", sa.JSON(), nullable=False),
        sa.Column("networks", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("node_id", name="pk_vms"),
        sa.UniqueConstraint("host_id", "ext_id", name="uq_vms_host_id_ext_id"),
        _node_fk("vms"),
        _host_fk("vms"),
    )
    op.create_table(
        "datastores",
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("host_id", sa.Integer(), nullable=False),
        sa.Column("ext_id", sa.Text(), nullable=False),
        sa.Column("capacity_bytes", sa.BigInteger(), nullable=True),
        sa.Column("free_bytes", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("node_id", name="pk_datastores"),
        sa.UniqueConstraint("host_id", "ext_id", name="uq_datastores_host_id_ext_id"),
        _node_fk("datastores"),
        _host_fk("datastores"),
    )
    op.create_table(
        "networks",
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("host_id", sa.Integer(), nullable=False),
        sa.Column("ext_id", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("node_id", name="pk_networks"),
        sa.UniqueConstraint("host_id", "ext_id", name="uq_networks_host_id_ext_id"),
        _node_fk("networks"),
        _host_fk("networks"),
    )


def _tags() -> None:
    op.create_table(
        "tags",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("category", sa.String(255), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_tags"),
        sa.UniqueConstraint("name", name="uq_tags_name"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "node_tags",
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("tag_id", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("node_id", "tag_id", name="pk_node_tags"),
        _node_fk("node_tags"),
        sa.ForeignKeyConstraint(
            ["tag_id"], ["tags.id"], name="fk_node_tags_tag_id_tags", ondelete="CASCADE"
        ),
    )
    op.create_index("ix_node_tags_tag_id", "node_tags", ["tag_id"])


def _permissions() -> None:
    op.create_table(
        "permissions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("principal", sa.String(255), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_permissions"),
        sa.CheckConstraint(
            "role IN ('admin', 'operator', 'read-only', 'no-access')",
            name=op.f("ck_permissions_role"),
        ),
        sa.UniqueConstraint("node_id", "principal", name="uq_permissions_node_id_principal"),
        _node_fk("permissions"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_permissions_principal", "permissions", ["principal"])


def downgrade() -> None:
    for table in ("permissions", "node_tags", "tags", "networks", "datastores", "vms"):
        op.drop_table(table)
    op.drop_table("hosts")
    op.drop_table("nodes")
