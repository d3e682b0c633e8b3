"""Indexes that serve keyset pages: a user's completions and conversations in (time, id)
order, so a page reads its rows in index order instead of sorting all of the user's rows
(PostgreSQL does not append the primary key to a secondary index, as InnoDB does).

Revision ID: history_0003
Revises: history_0002
Create Date: 2026-11-23
"""

from alembic import op

revision = "history_0003"
down_revision = "history_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_completions_owner_started_id", "completions", ["owner", "started_at", "id"])
    op.drop_index("ix_completions_owner_started", table_name="completions")
    op.create_index(
        "ix_conversations_owner_updated_id", "conversations", ["owner", "updated_at", "id"]
    )
    op.drop_index("ix_conversations_owner_updated", table_name="conversations")


def downgrade() -> None:
    op.create_index("ix_conversations_owner_updated", "conversations", ["owner", "updated_at"])
    op.drop_index("ix_conversations_owner_updated_id", table_name="conversations")
    op.create_index("ix_completions_owner_started", "completions", ["owner", "started_at"])
    op.drop_index("ix_completions_owner_started_id", table_name="completions")
