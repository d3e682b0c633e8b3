"""The tables, as SQLAlchemy Core metadata: one set for the main database, one for history.

History keeps messages in their own table, each addressed by a hash of its canonical JSON
chained to its parent's hash (see ``capture/chain.py``), and keyed by conversation: a message
that several requests of one conversation resend is one row. A completion points at the tail
of its request chain and at its answer, so any captured request can be rebuilt exactly.

JSON is stored as text written by orjson: the same bytes on every backend, read back exactly.
The migrations in ``migrations/`` create these tables; this module is what the code queries.
Column widths and the history tables' names are the capture layer's (``capture/columns.py``,
``capture/rows.py``), which shapes the rows to fit them.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Double,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    false,
)
from sqlalchemy.dialects import mysql

from capture.columns import (
    CALL_TYPE,
    FINISH_REASON,
    ID,
    IP,
    METHOD,
    NAME,
    PATH,
    ROLE,
    USER_AGENT,
)
from capture.rows import COMPLETIONS, CONVERSATIONS, MESSAGES, REQUEST_LOGS

# MySQL's TEXT stops at 64 KB and its DATETIME at whole seconds.
LongText = Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
Timestamp = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
# A model as a key of the by-day tables: compared byte for byte on every backend (MySQL's
# default collation would take "GPT-4o" and "gpt-4o" for one).
ModelKey = String(NAME).with_variant(
    mysql.VARCHAR(NAME, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb"
)


main_metadata = MetaData()
history_metadata = MetaData()

Serial = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements INTEGER only

users = Table(
    "users",
    main_metadata,
    Column("id", String(ID), primary_key=True),
    Column("name", String(255), nullable=False),
    Column("email", String(255), nullable=True),
    Column("metadata", LongText, nullable=True),
    Column("created_at", Timestamp, nullable=False),
    Column("disabled_at", Timestamp, nullable=True),
)

api_keys = Table(
    "api_keys",
    main_metadata,
    Column("fingerprint", String(ID), primary_key=True),
    Column("name", String(255), nullable=True),
    Column("source", String(32), nullable=False),  # "env" (GATEWAY_KEYS) or "admin"
    Column("created_at", Timestamp, nullable=False),
    Column("revoked_at", Timestamp, nullable=True),
    Column("id", String(ID), nullable=True),
    Column("user_id", String(ID), nullable=True),
    Column("prefix", String(16), nullable=True),
    Index("ix_api_keys_id", "id", unique=True),
    Index("ix_api_keys_user", "user_id"),
)

audit_log = Table(
    "audit_log",
    main_metadata,
    Column("id", Serial, primary_key=True, autoincrement=True),
    Column("at", Timestamp, nullable=False),
    Column("actor", String(255), nullable=False),
    Column("action", String(64), nullable=False),
    Column("target", String(255), nullable=True),
    Column("details", LongText, nullable=True),
    Index("ix_audit_log_at", "at"),
)

conversations = Table(
    CONVERSATIONS,
    history_metadata,
    Column("id", String(ID), primary_key=True),
    Column("owner", String(ID), nullable=False),
    Column("client_conversation_id", String(NAME), nullable=True),
    Column("title", String(NAME), nullable=True),
    Column("metadata", LongText, nullable=True),
    Column("tags", LongText, nullable=True),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    Column("completion_count", Integer, nullable=False, default=0),
    Column("message_count", Integer, nullable=False, default=0),
    Column("prompt_tokens", BigInteger, nullable=False, default=0),
    Column("completion_tokens", BigInteger, nullable=False, default=0),
    Column("total_tokens", BigInteger, nullable=False, default=0),
    # The kind of its first record (capture/registry.py): conversation lists leave out
    # those of embeddings unless asked for them.
    Column("call_type", String(CALL_TYPE), nullable=False, server_default="chat"),
    Index("ix_conversations_owner_updated_id", "owner", "updated_at", "id"),
    Index("ix_conversations_updated", "updated_at"),
    Index("ix_conversations_created", "created_at"),
)

messages = Table(
    MESSAGES,
    history_metadata,
    Column("conversation_id", String(ID), primary_key=True),
    Column("hash", String(ID), primary_key=True),
    Column("parent_hash", String(ID), nullable=True),
    Column("role", String(ROLE), nullable=False),
    Column("body", LongText, nullable=False),
    Column("content_text", LongText, nullable=True),
    Column("content_in_text", Boolean, nullable=False, server_default=false()),
    Column("created_at", Timestamp, nullable=False),
    Column("content_dropped", Boolean, nullable=False, server_default=false()),
    Index("ix_messages_content_created", "content_dropped", "created_at"),
)

completions = Table(
    COMPLETIONS,
    history_metadata,
    Column("id", String(ID), primary_key=True),
    Column("response_id", String(NAME), nullable=True),
    Column("conversation_id", String(ID), nullable=False),
    Column("owner", String(ID), nullable=False),
    Column("key_fingerprint", String(ID), nullable=True),
    Column("end_user", String(NAME), nullable=True),
    Column("requested_model", String(NAME), nullable=True),
    Column("response_model", String(NAME), nullable=True),
    Column("params", LongText, nullable=True),
    Column("metadata", LongText, nullable=True),
    Column("request_hash", String(ID), nullable=True),
    Column("request_message_count", Integer, nullable=False),
    Column("response_hash", String(ID), nullable=True),
    Column("extra_choices", LongText, nullable=True),
    Column("finish_reason", String(FINISH_REASON), nullable=True),
    Column("prompt_tokens", Integer, nullable=True),
    Column("completion_tokens", Integer, nullable=True),
    Column("total_tokens", Integer, nullable=True),
    Column("cached_tokens", Integer, nullable=True),
    Column("reasoning_tokens", Integer, nullable=True),
    Column("usage", LongText, nullable=True),
    Column("status_code", Integer, nullable=False),
    Column("error_type", String(NAME), nullable=True),
    Column("error_message", LongText, nullable=True),
    Column("client_ip", String(IP), nullable=True),
    Column("user_agent", String(USER_AGENT), nullable=True),
    Column("stream", Boolean, nullable=False),
    Column("started_at", Timestamp, nullable=False),
    Column("ttft_ms", Double, nullable=True),
    Column("latency_ms", Double, nullable=True),
    Column("upstream_created", BigInteger, nullable=True),
    Column("system_fingerprint", String(NAME), nullable=True),
    Column("call_type", String(CALL_TYPE), nullable=False, server_default="chat"),
    Column("upstream", String(NAME), nullable=True),  # as UPSTREAMS names it
    Column("attempts", LongText, nullable=True),  # JSON: [{upstream, status or error, ms}]
    Column("cache_write_tokens", Integer, nullable=True),  # in prompt_tokens, as cache reads
    Column("cost_usd", Double, nullable=True),  # None: a model with no known price
    Column("price_version", String(64), nullable=True),  # where the price came from
    Index("ix_completions_owner_started_id", "owner", "started_at", "id"),
    Index("ix_completions_conversation", "conversation_id", "started_at"),
    Index("ix_completions_response_id", "response_id"),
    Index("ix_completions_started", "started_at"),
)

request_logs = Table(
    REQUEST_LOGS,
    history_metadata,
    Column("id", String(ID), primary_key=True),
    Column("owner", String(ID), nullable=False),
    Column("key_fingerprint", String(ID), nullable=True),
    Column("method", String(METHOD), nullable=False),
    Column("path", String(PATH), nullable=False),
    Column("status_code", Integer, nullable=False),
    Column("error_type", String(NAME), nullable=True),
    Column("latency_ms", Double, nullable=True),
    Column("bytes_in", BigInteger, nullable=False),
    Column("bytes_out", BigInteger, nullable=False),
    Column("client_ip", String(IP), nullable=True),
    Column("user_agent", String(USER_AGENT), nullable=True),
    Column("started_at", Timestamp, nullable=False),
    Column("route", String(PATH), nullable=True),  # the path, its ids as {id}
    Column("upstream", String(NAME), nullable=True),
    Column("attempts", LongText, nullable=True),
    Index("ix_request_logs_owner_started", "owner", "started_at"),
    Index("ix_request_logs_started", "started_at"),
)


# Kept by the writer and by deletion: what the viewer's statistics read (see storage/usage.py).
# A completion with no model counts under "" (a key column cannot be NULL).
usage_daily = Table(
    "usage_daily",
    history_metadata,
    Column("day", Date, primary_key=True),
    Column("owner", String(ID), primary_key=True),
    Column("model", ModelKey, primary_key=True),
    Column("requests", BigInteger, nullable=False),
    Column("errors", BigInteger, nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Column("total_tokens", BigInteger, nullable=False),
    Column("priced", BigInteger, nullable=False, server_default="0"),  # completions with a cost
    Column("cost_usd", Double, nullable=False, server_default="0"),  # the sum of their costs
)

latency_daily = Table(
    "latency_daily",
    history_metadata,
    Column("day", Date, primary_key=True),
    Column("owner", String(ID), primary_key=True),
    Column("model", ModelKey, primary_key=True),
    Column("bucket", Integer, primary_key=True),
    Column("count", BigInteger, nullable=False),
)


# Owners whose history was erased: the writer drops records of theirs that arrive after
# (``storage/erasures.py``), under the one row of ``erasure_gate``.
erased_owners = Table(
    "erased_owners",
    history_metadata,
    Column("owner", String(ID), primary_key=True),
    Column("erased_at", Timestamp, nullable=False),
)

erasure_gate = Table(
    "erasure_gate",
    history_metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("generation", BigInteger, nullable=False),
)


# The tables that grow by a row per request: split by day with MES_DAILY_PARTITION, and
# written as records, once per id, by the writer (``storage/batch.py``).
DAILY = (completions, request_logs)
