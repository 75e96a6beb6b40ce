"""High availability: a cluster's HA settings, a VM's restart priority, a host's own id.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_PRIORITIES = "ha_priority IN ('high', 'medium', 'low', 'disabled')"
_DEFAULT_TIMEOUT_S = 15.0


def upgrade() -> None:
    op.create_table(
        "clusters",
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("ha_enabled", sa.Boolean(), nullable=False),
        sa.Column("ha_timeout_s", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("node_id", name="pk_clusters"),
        sa.ForeignKeyConstraint(
            ["node_id"], ["nodes.id"], name="fk_clusters_node_id_nodes", ondelete="CASCADE"
        ),
    )
    # Every cluster made before has its row, with HA off.
    nodes = sa.table("nodes", sa.column("id", sa.Integer()), sa.column("kind", sa.String()))
    clusters = sa.table(
        "clusters",
        sa.column("node_id", sa.Integer()),
        sa.column("ha_enabled", sa.Boolean()),
        sa.column("ha_timeout_s", sa.Float()),
    )
    existing = sa.select(
        nodes.c.id, sa.literal(False, sa.Boolean()), sa.literal(_DEFAULT_TIMEOUT_S, sa.Float())
    ).where(nodes.c.kind == "cluster")
    op.execute(clusters.insert().from_select(["node_id", "ha_enabled", "ha_timeout_s"], existing))
    op.add_column("hosts", sa.Column("agent_id", sa.String(128), nullable=True))
    # SQLite adds a constraint by copying the table: batch mode.
    with op.batch_alter_table("vms") as batch:
        batch.add_column(
            sa.Column("ha_priority", sa.String(16), nullable=False, server_default="medium")
        )
        batch.create_check_constraint(op.f("ck_vms_ha_priority"), _PRIORITIES)


def downgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.drop_constraint(op.f("ck_vms_ha_priority"), type_="check")
        batch.drop_column("ha_priority")
    with op.batch_alter_table("hosts") as batch:
        batch.drop_column("agent_id")
    op.drop_table("clusters")
