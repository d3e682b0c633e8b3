"""Erasures: the owners whose history was erased (``erased_owners``), so that records of
theirs still on their way (in a gateway's spool, or a dead replica's) are dropped by the
writer instead of written after the erasure; and a one-row gate (``erasure_gate``) that a
writer's batch holds in share mode and an erasure updates, so that an erasure waits for the
batches being written and the batches after it see it (``storage/erasures.py``).

Revision ID: history_0012
Revises: history_0011
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "history_0012"
down_revision = "history_0011"
branch_labels = None
depends_on = None

ID = 64


def upgrade() -> None:
    op.create_table(
        "erased_owners",
        sa.Column("owner", sa.String(ID), primary_key=True),
        sa.Column(
            "erased_at",
            sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb"),
            nullable=False,
        ),
    )
    gate = op.create_table(
        "erasure_gate",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
    )
    op.bulk_insert(gate, [{"id": 1, "generation": 0}])


def downgrade() -> None:
    op.drop_table("erasure_gate")
    op.drop_table("erased_owners")
