"""Messages lose the index on (conversation_id, parent_hash): no query reads messages by
their parent (a conversation's messages are read by its id, and a chain is walked up by
each message's own key, both through the primary key), and keeping it up cost PostgreSQL
about a third of each message insert (bench/writer.py).

Revision ID: history_0013
Revises: history_0012
Create Date: 2026-12-03
"""

from alembic import op

revision = "history_0013"
down_revision = "history_0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_messages_parent", table_name="messages")


def downgrade() -> None:
    op.create_index("ix_messages_parent", "messages", ["conversation_id", "parent_hash"])
