"""A completion keeps the input tokens its call wrote to the provider's prompt cache
(``cache_write_tokens``: Anthropic's ``cache_creation_input_tokens``), beside the cache reads
(``cached_tokens``); both are in ``prompt_tokens``. Those stored before have none.

Split by day, each day's table gains the column (``migrations/day_views.py``), from the
columns of this revision, frozen below.

Revision ID: history_0009
Revises: history_0008
Create Date: 2026-12-03
"""

import sqlalchemy as sa

from migrations.day_views import add, drop

revision = "history_0009"
down_revision = "history_0008"
branch_labels = None
depends_on = None

# The columns of completions at this revision, in order, as the view lists them.
COMPLETIONS = (
    "id, response_id, conversation_id, owner, key_fingerprint, end_user, requested_model, "
    "response_model, params, metadata, request_hash, request_message_count, response_hash, "
    "extra_choices, finish_reason, prompt_tokens, completion_tokens, total_tokens, "
    "cached_tokens, reasoning_tokens, usage, status_code, error_type, error_message, "
    "client_ip, user_agent, stream, started_at, ttft_ms, latency_ms, upstream_created, "
    "system_fingerprint, call_type, upstream, attempts, cache_write_tokens"
).split(", ")
DEFAULTS = {"call_type": "'chat'"}


def _column() -> sa.Column:
    return sa.Column("cache_write_tokens", sa.Integer(), nullable=True)


def upgrade() -> None:
    add("completions", _column, COMPLETIONS, DEFAULTS)


def downgrade() -> None:
    drop("completions", "cache_write_tokens", COMPLETIONS, DEFAULTS)
