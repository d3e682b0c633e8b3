"""Retention: a message says whether its content was dropped, and the messages whose content
is still there are indexed by age, the order content retention takes them in; conversations
are indexed by when they began and were last continued, which retention asks after a day's
partitions are dropped.

Revision ID: history_0004
Revises: history_0003
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "history_0004"
down_revision = "history_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "messages",
        sa.Column("content_dropped", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.create_index("ix_messages_content_created", "messages", ["content_dropped", "created_at"])
    op.create_index("ix_conversations_updated", "conversations", ["updated_at"])
    op.create_index("ix_conversations_created", "conversations", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_conversations_created", table_name="conversations")
    op.drop_index("ix_conversations_updated", table_name="conversations")
    op.drop_index("ix_messages_content_created", table_name="messages")
    op.drop_column("messages", "content_dropped")
