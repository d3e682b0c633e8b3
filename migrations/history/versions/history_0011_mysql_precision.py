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
    if _mysql():
        _columns("DOUBLE", "utf8mb4_bin")


def downgrade() -> None:
    """Back to FLOAT and the case-insensitive collation: refused where two models that
    differ only in case have a row each on the same day (the keys would collide)."""
    if _mysql():
        _columns("FLOAT", "utf8mb4_unicode_ci")


def _columns(number: str, collation: str) -> None:
    """Times and costs as ``number``; the by-day tables' models compared by ``collation``."""
    op.execute(
        f"ALTER TABLE completions MODIFY ttft_ms {number} NULL, "
        f"MODIFY latency_ms {number} NULL, MODIFY cost_usd {number} NULL"
    )
    op.execute(f"ALTER TABLE request_logs MODIFY latency_ms {number} NULL")
    op.execute(
        f"ALTER TABLE usage_daily MODIFY model {MODEL.format(collation)}, "
        f"MODIFY cost_usd {number} NOT NULL DEFAULT 0"
    )
    op.execute(f"ALTER TABLE latency_daily MODIFY model {MODEL.format(collation)}")
