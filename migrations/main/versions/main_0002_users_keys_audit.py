"""Users, the gateway keys issued to them, and the audit log of admin actions.

Keys issued through the admin API belong to a user and get a public id (``key_...``) and a
display prefix; the key itself is never stored, only its SHA-256 fingerprint. Keys from
``GATEWAY_KEYS`` stay as they were (no user), with an id derived from their fingerprint.

Revision ID: main_0002
Revises: main_0001
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "main_0002"
down_revision = "main_0001"
branch_labels = None
depends_on = None

Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
LongText = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
Serial = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("email", sa.String(255), nullable=True),
        sa.Column("metadata", LongText, nullable=True),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("disabled_at", Timestamp, nullable=True),
    )
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("user_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("prefix", sa.String(16), nullable=True))
    keys = sa.table("api_keys", sa.column("fingerprint", sa.String), sa.column("id", sa.String))
    connection = op.get_bind()
    for (fingerprint,) in connection.execute(sa.select(keys.c.fingerprint)).all():
        connection.execute(
            keys.update()
            .where(keys.c.fingerprint == fingerprint)
            .values(id=f"key_{fingerprint[:24]}")
        )
    op.create_index("ix_api_keys_id", "api_keys", ["id"], unique=True)
    op.create_index("ix_api_keys_user", "api_keys", ["user_id"])
    op.create_table(
        "audit_log",
        sa.Column("id", Serial, primary_key=True, autoincrement=True),
        sa.Column("at", Timestamp, nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(255), nullable=True),
        sa.Column("details", LongText, nullable=True),
    )
    op.create_index("ix_audit_log_at", "audit_log", ["at"])


def downgrade() -> None:
    op.drop_table("audit_log")
    op.drop_index("ix_api_keys_user", table_name="api_keys")
    op.drop_index("ix_api_keys_id", table_name="api_keys")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("prefix")
        batch.drop_column("user_id")
        batch.drop_column("id")
    op.drop_table("users")
