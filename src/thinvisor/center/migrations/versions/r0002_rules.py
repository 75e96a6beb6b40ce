"""Placement rules: affinity and anti-affinity rules of a cluster's VMs.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rules",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("cluster_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_rules"),
        sa.CheckConstraint("kind IN ('affinity', 'anti-affinity')", name=op.f("ck_rules_kind")),
        sa.UniqueConstraint("cluster_id", "name", name="uq_rules_cluster_id_name"),
        sa.ForeignKeyConstraint(
            ["cluster_id"], ["nodes.id"], name="fk_rules_cluster_id_nodes", ondelete="CASCADE"
        ),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "rule_members",
        sa.Column("rule_id", sa.Integer(), nullable=False),
        sa.Column("vm_id", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("rule_id", "vm_id", name="pk_rule_members"),
        sa.ForeignKeyConstraint(
            ["rule_id"], ["rules.id"], name="fk_rule_members_rule_id_rules", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["vm_id"], ["nodes.id"], name="fk_rule_members_vm_id_nodes", ondelete="CASCADE"
        ),
    )
    op.create_index("ix_rule_members_vm_id", "rule_members", ["vm_id"])


def downgrade() -> None:
    op.drop_table("rule_members")
    op.drop_table("rules")
