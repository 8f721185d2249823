"""Logs: readable text (the default) or JSON lines (JETBATCH_LOG_FORMAT=json), on stderr and, when
JETBATCH_LOG_FILE is set (`jetbatch up` sets it per service), in a rotating file. Every record
carries its service, and the batch id and custom id of the work it was logged for: given with
`extra=`, or bound for the running task (`bind`, `bind_message`: the consumer runner and the
handlers do it). Messages never hold prompts, bodies or keys; ids only."""

from __future__ import annotations

import contextvars
import datetime
import logging
import logging.handlers
import sys
from pathlib import Path
from typing import Literal

import msgspec

_batch_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "jetbatch_batch_id", default=None
)
_custom_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "jetbatch_custom_id", default=None
)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(service)s %(name)s: %(message)s"


def bind(batch_id: str | None, custom_id: str | None = None) -> None:
    """Tag this task's records (an asyncio task has its own copy)."""
    _batch_id.set(batch_id or None)
    _custom_id.set(custom_id or None)


def bind_message(value: object) -> None:
    """Tag this task's records with a message's batch id and custom id, if it has them."""
    bind(getattr(value, "batch_id", None), getattr(value, "custom_id", None))


class ContextFilter(logging.Filter):
    """Adds `service`, `batch_id` and `custom_id` to every record (an `extra=` one wins)."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        if getattr(record, "batch_id", None) is None:
            record.batch_id = _batch_id.get()
        if getattr(record, "custom_id", None) is None:
            record.custom_id = _custom_id.get()
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802
        line = super().formatMessage(record)
        ids = [
            f"{key}={value}"
            for key in ("batch_id", "custom_id")
            if (value := getattr(record, key, None))
        ]
        return f"{line} [{' '.join(ids)}]" if ids else line


class JsonRecord(msgspec.Struct, omit_defaults=True):
    time: str  # ISO 8601, UTC
    level: str
    service: str
    logger: str
    message: str
    batch_id: str | None = None
    custom_id: str | None = None
    exception: str | None = None


_encoder = msgspec.json.Encoder()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        exception = None
        if record.exc_info:
            exception = self.formatException(record.exc_info)
        elif record.exc_text:
            exception = record.exc_text
        return _encoder.encode(
            JsonRecord(
                time=when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                level=record.levelname,
                service=str(getattr(record, "service", "")),
                logger=record.name,
                message=record.getMessage(),
                batch_id=getattr(record, "batch_id", None),
                custom_id=getattr(record, "custom_id", None),
                exception=exception,
            )
        ).decode()


def handlers(
    service: str,
    *,
    log_format: Literal["text", "json"] = "text",
    log_file: Path | None = None,
    max_bytes: int = 10 * 1024 * 1024,
    backups: int = 5,
) -> list[logging.Handler]:
    """stderr, and the rotating file when one is given, formatted and tagged."""
    out: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        out.append(
            logging.handlers.RotatingFileHandler(
                log_file, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
            )
        )
    formatter = JsonFormatter() if log_format == "json" else TextFormatter()
    for handler in out:
        handler.setFormatter(formatter)
        handler.addFilter(ContextFilter(service))
    return out
