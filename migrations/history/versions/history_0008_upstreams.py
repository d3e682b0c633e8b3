"""Every record names the upstream that answered it (``upstream``, as ``UPSTREAMS`` names it,
``default`` with one upstream) and the tries it took (``attempts``: JSON, a list of
``{upstream, status or error, ms}``), on completions and request logs alike. Those stored
before have neither.

Split by day, each day's table gains the columns (``migrations/day_views.py``), from the
columns of this revision, frozen below.

Revision ID: history_0008
Revises: history_0007
Create Date: 2026-12-03
"""

from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from migrations.day_views import add, drop

revision = "history_0008"
down_revision = "history_0007"
branch_labels = None
depends_on = None

NAME = 255
LongText = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
# The columns of each table at this revision, in order, as the view lists them.
COMPLETIONS = (
    "id, response_id, conversation_id, owner, key_fingerprint, end_user, requested_model, "
    "response_model, params, metadata, request_hash, request_message_count, response_hash, "
    "extra_choices, finish_reason, prompt_tokens, completion_tokens, total_tokens, "
    "cached_tokens, reasoning_tokens, usage, status_code, error_type, error_message, "
    "client_ip, user_agent, stream, started_at, ttft_ms, latency_ms, upstream_created, "
    "system_fingerprint, call_type, upstream, attempts"
).split(", ")
REQUEST_LOGS = (
    "id, owner, key_fingerprint, method, path, status_code, error_type, latency_ms, bytes_in, "
    "bytes_out, client_ip, user_agent, started_at, route, upstream, attempts"
).split(", ")
DEFAULTS = {"call_type": "'chat'"}


def _upstream() -> sa.Column:
    return sa.Column("upstream", sa.String(NAME), nullable=True)


def _attempts() -> sa.Column:
    return sa.Column("attempts", LongText, nullable=True)


COLUMNS: tuple[tuple[str, Callable[[], sa.Column]], ...] = (
    ("upstream", _upstream),
    ("attempts", _attempts),
)


def upgrade() -> None:
    for table, columns in (("completions", COMPLETIONS), ("request_logs", REQUEST_LOGS)):
        for count, (_, column) in enumerate(COLUMNS, start=1):
            add(table, column, columns[: len(columns) - len(COLUMNS) + count], DEFAULTS)


def downgrade() -> None:
    for table, columns in (("completions", COMPLETIONS), ("request_logs", REQUEST_LOGS)):
        for count, (name, _) in reversed(list(enumerate(COLUMNS))):
            drop(table, name, columns[: len(columns) - len(COLUMNS) + count + 1], DEFAULTS)
