"""MySQL and MariaDB only, where two columns differed from the other backends:

- times and costs were ``FLOAT``, 4 bytes and 6 significant digits there (a 12,345.678 ms
  latency came back as 12,345.7; a month's cost summed in ``usage_daily`` lost its cents
  past $100,000); they become ``DOUBLE``, as they are on PostgreSQL and SQLite;
- the by-day tables keyed models by the database's case-insensitive collation, so that
  "GPT-4o" and "gpt-4o" were one row there and two elsewhere; they are now compared byte for
  byte (``utf8mb4_bin``), as everywhere else. Rows merged before stay merged.

Each ALTER rewrites its table (every partition of a table split by day): measured in
``bench/mysql_upgrade.py``. PostgreSQL and SQLite have nothing to change.

Revision ID: history_0011
Revises: history_0010
Create Date: 2026-12-03
"""

from alembic import op

revision = "history_0011"
down_revision = "history_0010"
branch_labels = None
depends_on = None

MODEL = "VARCHAR(255) CHARACTER SET utf8mb4 COLLATE {} NOT NULL"


def _mysql() -> bool:
    return op.get_bind().dialect.name in ("mysql", "mariadb")


def upgrade() -> None:
    if not _mysql():
        return
    op.execute(
        "ALTER TABLE completions MODIFY ttft_ms DOUBLE NULL, MODIFY latency_ms DOUBLE NULL, "
        "MODIFY cost_usd DOUBLE NULL"
    )
    op.execute("ALTER TABLE request_logs MODIFY latency_ms DOUBLE NULL")
    op.execute(
        "ALTER TABLE usage_daily MODIFY model " + MODEL.format("utf8mb4_bin") + ", "
        "MODIFY cost_usd DOUBLE NOT NULL DEFAULT 0"
    )
    op.execute("ALTER TABLE latency_daily MODIFY model " + MODEL.format("utf8mb4_bin"))


def downgrade() -> None:
    """Back to FLOAT and the case-insensitive collation: refused where two models that
    differ only in case have a row each on the same day (the keys would collide)."""
    if not _mysql():
        return
    op.execute(
        "ALTER TABLE completions MODIFY ttft_ms FLOAT NULL, MODIFY latency_ms FLOAT NULL, "
        "MODIFY cost_usd FLOAT NULL"
    )
    op.execute("ALTER TABLE request_logs MODIFY latency_ms FLOAT NULL")
    op.execute(
        "ALTER TABLE usage_daily MODIFY model " + MODEL.format("utf8mb4_unicode_ci") + ", "
        "MODIFY cost_usd FLOAT NOT NULL DEFAULT 0"
    )
    op.execute("ALTER TABLE latency_daily MODIFY model " + MODEL.format("utf8mb4_unicode_ci"))
