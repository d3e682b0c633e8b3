"""The admin API's request and response bodies; its OpenAPI schema is generated from these."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

T = TypeVar("T")


def _as_utc(moment: datetime) -> datetime:
    """Stored times are naive UTC; on the wire they say so (RFC 3339 needs an offset)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


Timestamp = Annotated[datetime, AfterValidator(_as_utc)]


def _storable(text: str) -> str:
    """Refuse what no database column can hold: NUL, and lone surrogates (not UTF-8)."""
    if "\x00" in text:
        raise ValueError("NUL characters are not allowed")
    try:
        text.encode()
    except UnicodeEncodeError as error:
        raise ValueError("not valid Unicode (a lone surrogate)") from error
    return text


Text = Annotated[str, AfterValidator(_storable)]
JSONObject = dict[str, Any]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ListOf(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    first_id: str | None
    last_id: str | None
    has_more: bool


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Text = Field(min_length=1, max_length=255)
    email: Text | None = Field(default=None, max_length=255)
    metadata: dict[Text, Text] | None = None


class UserUpdate(BaseModel):
    """What ``PATCH /admin/users/{id}`` changes: the fields sent (``null`` clears email and
    metadata), nothing else."""

    model_config = ConfigDict(extra="forbid")
    name: Text | None = Field(default=None, min_length=1, max_length=255)
    email: Text | None = Field(default=None, max_length=255)
    metadata: dict[Text, Text] | None = None

    @field_validator("name")
    @classmethod
    def _named(cls, name: str | None) -> str:
        if name is None:  # sent as null: a user always has a name
            raise ValueError("a user's name cannot be null")
        return name


class User(BaseModel):
    id: str
    name: str
    email: str | None
    metadata: dict[str, str] | None
    created_at: Timestamp
    disabled_at: Timestamp | None


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Text | None = Field(default=None, max_length=255)


class Key(BaseModel):
    id: str
    user_id: str | None
    name: str | None
    prefix: str | None
    source: str
    created_at: Timestamp
    revoked_at: Timestamp | None


class IssuedKey(Key):
    key: str = Field(description="The key itself. Shown this once; only its hash is stored.")


CallType = Literal["chat", "responses", "embeddings", "completions", "messages"]


class Attempt(BaseModel):
    """One try at an upstream: its answer's status, or the error that stopped it."""

    upstream: str
    status: int | None = None
    error: str | None = Field(default=None, description="upstream_unreachable or upstream_timeout.")
    ms: float | None = Field(
        default=None,
        description="Milliseconds until the answer's head, or the error; kept where a "
        "record took more than one try.",
    )


class Completion(BaseModel):
    """A captured call (a chat completion, a Responses call, embeddings, a legacy
    completion), as the gateway recorded it."""

    id: str = Field(description="The gateway's record id.")
    call_type: str = Field(
        description="chat, responses, embeddings, completions or messages (Anthropic's)."
    )
    response_id: str | None = Field(
        description="The upstream's id: chatcmpl-..., resp_..., cmpl-...; none for embeddings."
    )
    conversation_id: str
    user_id: str = Field(description="The owner: a user id, or a key fingerprint.")
    key_fingerprint: str | None
    end_user: str | None
    requested_model: str | None
    response_model: str | None
    params: JSONObject | None
    metadata: Any
    request_message_count: int
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    cached_tokens: int | None = Field(description="Input tokens read from the prompt cache.")
    cache_write_tokens: int | None = Field(
        description="Input tokens written to the prompt cache (Anthropic's cache creation)."
    )
    reasoning_tokens: int | None
    status_code: int
    error_type: str | None
    error_message: str | None
    client_ip: str | None
    user_agent: str | None
    stream: bool
    started_at: Timestamp
    ttft_ms: float | None
    latency_ms: float | None
    cost_usd: float | None = Field(
        description="What it cost, in US dollars; none where its model has no known price."
    )
    price_version: str | None = Field(
        description="The prices it came from: genai-prices and its version, or the "
        "MES_PRICES_FILE digest."
    )
    upstream: str | None = Field(
        description="The upstream that answered, as UPSTREAMS names it (default: the one)."
    )
    attempts: list[Attempt] = Field(
        description="Every upstream tried, in order: the last one answered."
    )


class CompletionDetail(Completion):
    request: list[Any] = Field(
        description="The request's messages (Responses: input items; embeddings: the "
        "inputs, as user messages), as sent."
    )
    answer: JSONObject | list[Any] | None = Field(
        description="The assistant message (first choice); for a Responses call, its output items."
    )
    extra_choices: list[Any] | None


class RequestLog(BaseModel):
    """A proxied /v1 request the gateway relayed without capturing it whole."""

    id: str
    user_id: str = Field(description="The owner: a user id, or a key fingerprint.")
    key_fingerprint: str | None
    method: str
    path: str
    status_code: int
    error_type: str | None
    latency_ms: float | None
    bytes_in: int
    bytes_out: int
    client_ip: str | None
    user_agent: str | None
    started_at: Timestamp
    upstream: str | None
    attempts: list[Attempt]


class Conversation(BaseModel):
    id: str
    user_id: str
    call_type: str = Field(description="The kind of its first record.")
    client_conversation_id: str | None
    title: str | None
    metadata: Any
    tags: list[str] | None
    created_at: Timestamp
    updated_at: Timestamp
    completion_count: int
    message_count: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ConversationUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: Text | None = Field(default=None, max_length=255)
    metadata: dict[Text, Any] | None = None
    tags: list[Text] | None = None

    @field_validator("metadata")
    @classmethod
    def storable_json(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """Stored as JSON text: what cannot be written so (an integer beyond 64 bits) is
        refused here, not at the database."""
        try:
            orjson.dumps(value)
        except TypeError as error:
            raise ValueError(str(error)) from error
        return value


class TreeMessage(BaseModel):
    id: str = Field(description="The message's chain hash.")
    parent_id: str | None
    role: str
    created_at: Timestamp
    message: Any = Field(description="The message in OpenAI's format, as sent or answered.")


class ConversationDetail(Conversation):
    messages: list[TreeMessage] = Field(description="Every message of the tree, oldest first.")
    completions: list[Completion]
    thread: list[Any] = Field(
        description="The conversation as it stands, in OpenAI's format: for chat, the "
        "latest completion's request and answer; for the Responses API, every turn's items "
        "in order, each once."
    )


class SearchHit(BaseModel):
    conversation_id: str
    message_id: str
    role: str
    created_at: Timestamp
    title: str | None
    user_id: str
    call_type: str
    snippet: str


class SearchResults(BaseModel):
    object: Literal["list"] = "list"
    data: list[SearchHit]
    next_cursor: str | None
    has_more: bool


class StatsRow(BaseModel):
    key: str | None
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: float | None = Field(
        description="The cost of those with a known price; none where none had one."
    )
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None


class Stats(BaseModel):
    by: Literal["user", "model", "day", "call_type", "upstream"]
    since: Timestamp | None
    until: Timestamp | None
    data: list[StatsRow]


class Deleted(BaseModel):
    completions: int
    conversations: int
    messages: int
    request_logs: int


class UserErased(BaseModel):
    id: str
    erased: bool
    history: Deleted


class PruneRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    older_than_days: int = Field(ge=0, le=100_000)


class AuditEntry(BaseModel):
    id: int
    at: Timestamp
    actor: str
    action: str
    target: str | None
    details: Any


class DeadLetter(BaseModel):
    id: str = Field(description="Its line in the dead-letter file; page with after=<id>.")
    reason: str | None
    record: Any = Field(description="The record as spooled (see capture/exchange.py).")
