"""Every record says which API it called: ``call_type`` (``chat``, ``responses``,
``embeddings``, ``completions``) on completions, and on conversations the kind of their
first record. Everything stored before was a chat completion. A request log says its route
(``route``: its path with ids folded, ``/v1/responses/{id}``), which statistics group by;
those logged before have none, and are grouped by their path.

PostgreSQL and MySQL split by day add the columns to the parent, which reaches every
partition. SQLite split by day keeps a table per day under a view that names its columns:
each table gains the column, and the view and its triggers are made again with it, from
the columns of this revision, frozen below.

Revision ID: history_0007
Revises: history_0006
Create Date: 2026-12-02
"""

import re
from collections.abc import Callable

import sqlalchemy as sa
from alembic import op

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
        _add(table, column, columns)


def downgrade() -> None:
    for table, name, columns in (
        ("completions", "call_type", COMPLETIONS),
        ("request_logs", "route", REQUEST_LOGS),
    ):
        _drop(table, name, columns)
    with op.batch_alter_table("conversations") as batch:
        batch.drop_column("call_type")


def _add(table: str, column: Callable[[], sa.Column], columns: list[str]) -> None:
    """``column`` added to ``table``: to each of its day tables under SQLite's view, and
    the view made again."""
    bind = op.get_bind()
    if bind.dialect.name == "sqlite" and _is_view(bind, table):
        tables = _sqlite_tables(bind, table)
        for name in tables:
            op.add_column(name, column())
        _sqlite_view(bind, table, tables, columns)
    else:
        op.add_column(table, column())


def _drop(table: str, name: str, columns: list[str]) -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite" and _is_view(bind, table):
        tables = _sqlite_tables(bind, table)
        for day_table in tables:
            with op.batch_alter_table(day_table) as batch:
                batch.drop_column(name)
        _sqlite_view(bind, table, tables, [c for c in columns if c != name])
    else:
        with op.batch_alter_table(table) as batch:
            batch.drop_column(name)


def _is_view(bind: sa.Connection, name: str) -> bool:
    found = bind.exec_driver_sql(
        "SELECT type FROM sqlite_master WHERE name = ?", (name,)
    ).scalar_one_or_none()
    return found == "view"


def _sqlite_tables(bind: sa.Connection, table: str) -> list[str]:
    """The tables under ``table``'s view: its legacy table first, then its days in order."""
    names = bind.exec_driver_sql(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE ?", (f"{table}_%",)
    ).scalars()
    day = re.compile(rf"^{table}_p\d{{8}}$")
    found = set(names)
    days = sorted(name for name in found if day.match(name))
    legacy = f"{table}_legacy"
    return ([legacy] if legacy in found else []) + days


def _sqlite_view(bind: sa.Connection, table: str, tables: list[str], columns: list[str]) -> None:
    """The view over the day tables and its triggers, as the writer finds them: an insert
    goes to its day's table (a column with a default takes it where none is given), an
    update and a delete to every table."""
    listed = ", ".join(columns)
    new = ", ".join(
        f"COALESCE(NEW.{column}, {DEFAULTS[column]})" if column in DEFAULTS else f"NEW.{column}"
        for column in columns
    )
    bind.exec_driver_sql(f"DROP VIEW IF EXISTS {table}")
    bind.exec_driver_sql(
        f"CREATE VIEW {table} AS "
        + " UNION ALL ".join(f"SELECT {listed} FROM {name}" for name in tables)
    )
    # A day table's day, as SQL text: its name ends in the day's eight digits.
    days = [
        (name, f"'{name[-8:-4]}-{name[-4:-2]}-{name[-2:]}'")
        for name in tables
        if not name.endswith("_legacy")
    ]
    routes = "".join(
        f"INSERT INTO {name} ({listed}) SELECT {new} WHERE substr(NEW.started_at, 1, 10) = {day}; "
        for name, day in days
    )
    known = ", ".join(day for _, day in days) or "''"
    bind.exec_driver_sql(
        f"CREATE TRIGGER {table}_insert INSTEAD OF INSERT ON {table} BEGIN "
        "SELECT RAISE(ABORT, 'no partition for this day') "
        f"WHERE substr(NEW.started_at, 1, 10) NOT IN ({known}); {routes}END"
    )
    assigned = ", ".join(f"{column} = NEW.{column}" for column in columns)
    bind.exec_driver_sql(
        f"CREATE TRIGGER {table}_update INSTEAD OF UPDATE ON {table} BEGIN "
        + "".join(f"UPDATE {name} SET {assigned} WHERE id = OLD.id; " for name in tables)
        + "END"
    )
    bind.exec_driver_sql(
        f"CREATE TRIGGER {table}_delete INSTEAD OF DELETE ON {table} BEGIN "
        + "".join(f"DELETE FROM {name} WHERE id = OLD.id; " for name in tables)
        + "END"
    )
