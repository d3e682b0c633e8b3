"""PostgreSQL: what was said (a message's text and body) and a request's parameters are
compressed with LZ4 instead of PostgreSQL's own pglz, where the server has it (PostgreSQL
14 or later, built with LZ4, as Debian's is). A value over ~2 KB is compressed as it is
stored, and pglz cost the database most of a record's time when prompts are long (inserting
20 KB of text: 808 us a row with pglz, 117 with LZ4; the README's performance section).
Split by day, the partitions there are now are set one by one; those made later take the
parent's setting. Only values stored from now on are compressed so; those stored already
stay as they are, and both read back alike. Other databases: nothing to do.

Revision ID: history_0006
Revises: history_0005
Create Date: 2026-11-27
"""

from alembic import op

revision = "history_0006"
down_revision = "history_0005"
branch_labels = None
depends_on = None

# What may be long: what was said, and a request's parameters (an agent's ``tools``, sent
# again with every request).
COLUMNS = {
    "messages": ("content_text", "body"),
    "completions": ("params", "extra_choices", "error_message", "usage"),
}


def upgrade() -> None:
    _compress_with("lz4")


def downgrade() -> None:
    _compress_with("pglz")


def _compress_with(method: str) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    if (bind.dialect.server_version_info or (0,)) < (14,):
        return  # no per-column compression before PostgreSQL 14
    for table, columns in COLUMNS.items():
        # Split by day, each partition has its own setting: the parent's reaches only the
        # partitions made after it.
        partitions = bind.exec_driver_sql(
            f"SELECT inhrelid::regclass::text FROM pg_inherits "
            f"WHERE inhparent = '{table}'::regclass ORDER BY 1"
        ).scalars()
        changes = ", ".join(f"ALTER COLUMN {c} SET COMPRESSION {method}" for c in columns)
        statements = " ".join(f"ALTER TABLE {name} {changes};" for name in [table, *partitions])
        # A server built without LZ4 refuses the method (feature_not_supported): pglz stays.
        op.execute(
            f"DO $$ BEGIN {statements} EXCEPTION WHEN feature_not_supported THEN NULL; END $$"
        )
