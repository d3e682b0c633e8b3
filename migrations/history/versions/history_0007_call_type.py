"""Every record says which API it called: ``call_type`` (``chat``, ``responses``,
``embeddings``, ``completions``) on completions, and on conversations the kind of their
first record. Everything stored before was a chat completion. A request log says its route
(``route``: its path with ids folded, ``/v1/responses/{id}``), which statistics group by;
those logged before have none, and are grouped by their path.

Split by day, each day's table gains the columns (``migrations/day_views.py``), from the
columns of this revision, frozen below.

Revision ID: history_0007
Revises: history_0006
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

from migrations.day_views import add, drop

revision = "history_0007"
down_revision = "history_0006"
branch_labels = None
depends_on = None

CALL_TYPE = 16
PATH = 1024
# The columns of completions at this revision, in order, as the view lists them.
COMPLETIONS = (
    "id, response_id, conversation_id, owner, key_fingerprint, end_user, requested_model, "
    "response_model, params, metadata, request_hash, request_message_count, response_hash, "
    "extra_choices, finish_reason, prompt_tokens, completion_tokens, total_tokens, "
    "cached_tokens, reasoning_tokens, usage, status_code, error_type, error_message, "
    "client_ip, user_agent, stream, started_at, ttft_ms, latency_ms, upstream_created, "
    "system_fingerprint, call_type"
).split(", ")
REQUEST_LOGS = (
    "id, owner, key_fingerprint, method, path, status_code, error_type, latency_ms, bytes_in, "
    "bytes_out, client_ip, user_agent, started_at, route"
).split(", ")
DEFAULTS = {"call_type": "'chat'"}


def _column() -> sa.Column:
    return sa.Column(
        "call_type", sa.String(CALL_TYPE), nullable=False, server_default=sa.text("'chat'")
    )


def _route() -> sa.Column:
    return sa.Column("route", sa.String(PATH), nullable=True)


def upgrade() -> None:
    op.add_column("conversations", _column())
    for table, column, columns in (
        ("completions", _column, COMPLETIONS),
        ("request_logs", _route, REQUEST_LOGS),
    ):
        add(table, column, columns, DEFAULTS)


def downgrade() -> None:
    for table, name, columns in (
        ("completions", "call_type", COMPLETIONS),
        ("request_logs", "route", REQUEST_LOGS),
    ):
        drop(table, name, columns, DEFAULTS)
    with op.batch_alter_table("conversations") as batch:
        batch.drop_column("call_type")
