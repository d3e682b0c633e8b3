"""What each completion cost: ``cost_usd`` (dollars; none where its model has no known
price) and ``price_version`` (the prices it came from: ``genai-prices 0.2.3``, or the
``MES_PRICES_FILE`` digest). By day, ``usage_daily`` counts the completions with a cost
(``priced``) and sums their costs. Those stored before have none.

Split by day, each day's table gains the columns (``migrations/day_views.py``), from the
columns of this revision, frozen below.

Revision ID: history_0010
Revises: history_0009
Create Date: 2026-12-03
"""

from collections.abc import Callable

import sqlalchemy as sa
from alembic import op

from migrations.day_views import add, drop

revision = "history_0010"
down_revision = "history_0009"
branch_labels = None
depends_on = None

# The columns of completions at this revision, in order, as the view lists them.
COMPLETIONS = (
    "id, response_id, conversation_id, owner, key_fingerprint, end_user, requested_model, "
    "response_model, params, metadata, request_hash, request_message_count, response_hash, "
    "extra_choices, finish_reason, prompt_tokens, completion_tokens, total_tokens, "
    "cached_tokens, reasoning_tokens, usage, status_code, error_type, error_message, "
    "client_ip, user_agent, stream, started_at, ttft_ms, latency_ms, upstream_created, "
    "system_fingerprint, call_type, upstream, attempts, cache_write_tokens, cost_usd, "
    "price_version"
).split(", ")
DEFAULTS = {"call_type": "'chat'"}


def _cost() -> sa.Column:
    return sa.Column("cost_usd", sa.Float(), nullable=True)


def _version() -> sa.Column:
    return sa.Column("price_version", sa.String(64), nullable=True)


COLUMNS: tuple[tuple[str, Callable[[], sa.Column]], ...] = (
    ("cost_usd", _cost),
    ("price_version", _version),
)


def upgrade() -> None:
    for count, (_, column) in enumerate(COLUMNS, start=1):
        add("completions", column, COMPLETIONS[: len(COMPLETIONS) - len(COLUMNS) + count], DEFAULTS)
    op.add_column(
        "usage_daily",
        sa.Column("priced", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
    )
    op.add_column(
        "usage_daily",
        sa.Column("cost_usd", sa.Float(), nullable=False, server_default=sa.text("0")),
    )


def downgrade() -> None:
    with op.batch_alter_table("usage_daily") as batch:
        batch.drop_column("cost_usd")
        batch.drop_column("priced")
    for count, (name, _) in reversed(list(enumerate(COLUMNS))):
        drop(
            "completions",
            name,
            COMPLETIONS[: len(COMPLETIONS) - len(COLUMNS) + count + 1],
            DEFAULTS,
        )
