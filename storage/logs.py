"""The log of the gateway and its writer process: plain lines, or with ``LOG_FORMAT=json``
one JSON object per line; a line logged while a request is served names that request's id
(``gateway/logs.py`` gives each request one). Log lines never hold a key or anything said:
the code logs ids, types and counts, not values.

Here, in the lowest layer that does I/O, because the writer process (``storage``) logs the
same way as the gateway.
"""

from __future__ import annotations

import logging
import logging.config
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import orjson

REQUEST_ID: ContextVar[str | None] = ContextVar("mes_request_id", default=None)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = REQUEST_ID.get()
        if request_id is not None:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def config(level: str, form: str) -> dict[str, Any]:
    """``logging.config.dictConfig``'s form of the log: everything (uvicorn's own lines
    too) to stderr at ``level`` (``info``...), as ``form`` (``text`` or ``json``) says.
    uvicorn applies it in each worker process it starts."""
    formatter: dict[str, Any] = {"()": JsonFormatter} if form == "json" else {"format": TEXT_FORMAT}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"mes": formatter},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "mes"}},
        "root": {"handlers": ["stderr"], "level": level.upper()},
        "loggers": {
            "alembic": {"level": "WARNING"},
            # At debug, these log each statement with its values: what was said.
            "aiosqlite": {"level": "WARNING"},
            "sqlalchemy": {"level": "WARNING"},
            # uvicorn's loggers have handlers of their own by default: here, the root's.
            "uvicorn": {"handlers": [], "propagate": True},
            "uvicorn.error": {"handlers": [], "propagate": True},
        },
    }


def configure(level: str, form: str) -> None:
    logging.config.dictConfig(config(level, form))
