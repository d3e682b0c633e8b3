"""Alembic migrations, one line of history per database: ``main/`` (users, keys) and
``history/`` (the message store). Each keeps its own version table, so the two can live in
one database or in two of different kinds. ``storage.migrate`` applies them on start;
``alembic -c config/alembic.ini -x target=history upgrade head`` does the same by hand."""

from pathlib import Path

MIGRATIONS_DIR = Path(__file__).parent
TARGETS = ("main", "history")
