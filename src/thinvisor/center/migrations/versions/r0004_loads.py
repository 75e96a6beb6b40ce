"""Placement's inputs from the hosts: a core's clock, the CPU load and reservations.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _count(name: str, kind: type[sa.Integer] = sa.Integer) -> sa.Column[int]:
    return sa.Column(name, kind(), nullable=False, server_default="0")


def upgrade() -> None:
    with op.batch_alter_table("hosts") as batch:
        batch.add_column(_count("core_mhz"))
        batch.add_column(sa.Column("cpu_load", sa.Float(), nullable=True))
        batch.add_column(_count("reserved_cpu_mhz"))
        batch.add_column(_count("reserved_memory_mib", sa.BigInteger))
    with op.batch_alter_table("vms") as batch:
        batch.add_column(_count("reserved_cpu_mhz"))
        batch.add_column(_count("reserved_memory_mib", sa.BigInteger))


def downgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.drop_column("reserved_memory_mib")
        batch.drop_column("reserved_cpu_mhz")
    with op.batch_alter_table("hosts") as batch:
        batch.drop_column("reserved_memory_mib")
        batch.drop_column("reserved_cpu_mhz")
        batch.drop_column("cpu_load")
        batch.drop_column("core_mhz")
