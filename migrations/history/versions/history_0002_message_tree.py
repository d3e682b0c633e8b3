"""Messages stored once per conversation tree: string content kept once, the tree walkable.

A message whose content is a string now keeps that string only in ``content_text`` (which
search reads) and the rest of its JSON in ``body``, with ``content_in_text`` set; rows
written before keep their whole JSON in ``body`` (``content_in_text`` false) and read back
as they did. Messages are indexed by their parent, to walk a conversation downwards.

Since this revision a request without ``X-Conversation-Id`` that resends an earlier
exchange joins that exchange's conversation (see ``capture/chain.py``), so a conversation
is a tree whose branches (a regenerated answer, an edited turn) share their common prefix.
Existing rows are kept as they are: history written before this revision stays readable
and rebuildable, one conversation per header-less request as it was stored.

Revision ID: history_0002
Revises: history_0001
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "history_0002"
down_revision = "history_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "messages",
        sa.Column("content_in_text", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.create_index("ix_messages_parent", "messages", ["conversation_id", "parent_hash"])


def downgrade() -> None:
    op.drop_index("ix_messages_parent", table_name="messages")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("content_in_text")
