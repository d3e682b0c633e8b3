"""Columns added to a history table that may be split by day: what each migration that adds
one does alike.

PostgreSQL and MySQL split by day add the column to the parent, which reaches every
partition. SQLite split by day keeps a table per day under a view that names its columns:
each table gains the column, and the view and its triggers are made again with it, from the
columns the migration lists (its own revision's, frozen there: what a migration does never
changes with the code after it).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import sqlalchemy as sa
from alembic import op


def add(
    table: str,
    column: Callable[[], sa.Column],
    columns: list[str],
    defaults: Mapping[str, str],
) -> None:
    """``column`` added to ``table``: to each of its day tables under SQLite's view, and
    the view made again."""
    bind = op.get_bind()
    if bind.dialect.name == "sqlite" and _is_view(bind, table):
        tables = _sqlite_tables(bind, table)
        for name in tables:
            op.add_column(name, column())
        _sqlite_view(bind, table, tables, columns, defaults)
    else:
        op.add_column(table, column())


def drop(table: str, name: str, columns: list[str], defaults: Mapping[str, str]) -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite" and _is_view(bind, table):
        tables = _sqlite_tables(bind, table)
        for day_table in tables:
            with op.batch_alter_table(day_table) as batch:
                batch.drop_column(name)
        _sqlite_view(bind, table, tables, [c for c in columns if c != name], defaults)
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


def _sqlite_view(
    bind: sa.Connection,
    table: str,
    tables: list[str],
    columns: list[str],
    defaults: Mapping[str, str],
) -> None:
    """The view over the day tables and its triggers, as the writer finds them: an insert
    goes to its day's table (a column with a default takes it where none is given), an
    update and a delete to every table."""
    listed = ", ".join(columns)
    new = ", ".join(
        f"COALESCE(NEW.{column}, {defaults[column]})" if column in defaults else f"NEW.{column}"
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
