"""The message store: conversations, content-addressed messages, completions, request logs.

Revision ID: history_0001
Revises:
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "history_0001"
down_revision = None
branch_labels = ("history",)
depends_on = None

LongText = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
ID = 64


def upgrade() -> None:
    op.create_table(
        "conversations",
        sa.Column("id", sa.String(ID), primary_key=True),
        sa.Column("owner", sa.String(ID), nullable=False),
        sa.Column("client_conversation_id", sa.String(255), nullable=True),
        sa.Column("title", sa.String(255), nullable=True),
        sa.Column("metadata", LongText, nullable=True),
        sa.Column("tags", LongText, nullable=True),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("updated_at", Timestamp, nullable=False),
        sa.Column("completion_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("message_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("prompt_tokens", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("completion_tokens", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("total_tokens", sa.BigInteger, nullable=False, server_default="0"),
    )
    op.create_index("ix_conversations_owner_updated", "conversations", ["owner", "updated_at"])

    op.create_table(
        "messages",
        sa.Column("conversation_id", sa.String(ID), primary_key=True),
        sa.Column("hash", sa.String(ID), primary_key=True),
        sa.Column("parent_hash", sa.String(ID), nullable=True),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("body", LongText, nullable=False),
        sa.Column("content_text", LongText, nullable=True),
        sa.Column("created_at", Timestamp, nullable=False),
    )

    op.create_table(
        "completions",
        sa.Column("id", sa.String(ID), primary_key=True),
        sa.Column("response_id", sa.String(255), nullable=True),
        sa.Column("conversation_id", sa.String(ID), nullable=False),
        sa.Column("owner", sa.String(ID), nullable=False),
        sa.Column("key_fingerprint", sa.String(ID), nullable=True),
        sa.Column("end_user", sa.String(255), nullable=True),
        sa.Column("requested_model", sa.String(255), nullable=True),
        sa.Column("response_model", sa.String(255), nullable=True),
        sa.Column("params", LongText, nullable=True),
        sa.Column("metadata", LongText, nullable=True),
        sa.Column("request_hash", sa.String(ID), nullable=True),
        sa.Column("request_message_count", sa.Integer, nullable=False),
        sa.Column("response_hash", sa.String(ID), nullable=True),
        sa.Column("extra_choices", LongText, nullable=True),
        sa.Column("finish_reason", sa.String(64), nullable=True),
        sa.Column("prompt_tokens", sa.Integer, nullable=True),
        sa.Column("completion_tokens", sa.Integer, nullable=True),
        sa.Column("total_tokens", sa.Integer, nullable=True),
        sa.Column("cached_tokens", sa.Integer, nullable=True),
        sa.Column("reasoning_tokens", sa.Integer, nullable=True),
        sa.Column("usage", LongText, nullable=True),
        sa.Column("status_code", sa.Integer, nullable=False),
        sa.Column("error_type", sa.String(255), nullable=True),
        sa.Column("error_message", LongText, nullable=True),
        sa.Column("client_ip", sa.String(64), nullable=True),
        sa.Column("user_agent", sa.String(512), nullable=True),
        sa.Column("stream", sa.Boolean, nullable=False),
        sa.Column("started_at", Timestamp, nullable=False),
        sa.Column("ttft_ms", sa.Float, nullable=True),
        sa.Column("latency_ms", sa.Float, nullable=True),
        sa.Column("upstream_created", sa.BigInteger, nullable=True),
        sa.Column("system_fingerprint", sa.String(255), nullable=True),
    )
    op.create_index("ix_completions_owner_started", "completions", ["owner", "started_at"])
    op.create_index("ix_completions_conversation", "completions", ["conversation_id", "started_at"])
    op.create_index("ix_completions_response_id", "completions", ["response_id"])
    op.create_index("ix_completions_started", "completions", ["started_at"])

    op.create_table(
        "request_logs",
        sa.Column("id", sa.String(ID), primary_key=True),
        sa.Column("owner", sa.String(ID), nullable=False),
        sa.Column("key_fingerprint", sa.String(ID), nullable=True),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("status_code", sa.Integer, nullable=False),
        sa.Column("error_type", sa.String(255), nullable=True),
        sa.Column("latency_ms", sa.Float, nullable=True),
        sa.Column("bytes_in", sa.BigInteger, nullable=False),
        sa.Column("bytes_out", sa.BigInteger, nullable=False),
        sa.Column("client_ip", sa.String(64), nullable=True),
        sa.Column("user_agent", sa.String(512), nullable=True),
        sa.Column("started_at", Timestamp, nullable=False),
    )
    op.create_index("ix_request_logs_owner_started", "request_logs", ["owner", "started_at"])
    op.create_index("ix_request_logs_started", "request_logs", ["started_at"])


def downgrade() -> None:
    op.drop_table("request_logs")
    op.drop_table("completions")
    op.drop_table("messages")
    op.drop_table("conversations")
