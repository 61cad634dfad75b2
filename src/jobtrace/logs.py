"""Structured logs: one JSON object (or text line) per record, with the request's context.

Inside an RPC every line carries `request_id` (the caller's `x-request-id`, or
one generated), `method` and, once the caller is authenticated, `tenant`; the
lifecycle log points add `job_id` (and `tenant`, `worker_id`, ...) through
`extra=`. The context lives in contextvars, which asyncio copies into every
task an RPC starts, so lines logged by those tasks carry it too.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
from contextvars import ContextVar
from typing import Any, TextIO

request_id: ContextVar[str] = ContextVar("jobtrace_request_id", default="")
method: ContextVar[str] = ContextVar("jobtrace_method", default="")
tenant: ContextVar[str] = ContextVar("jobtrace_tenant", default="")

CONTEXT: tuple[tuple[str, ContextVar[str]], ...] = (
    ("request_id", request_id),
    ("method", method),
    ("tenant", tenant),
)
FORMATS = ("json", "text")

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


def new_request_id() -> str:
    return os.urandom(8).hex()


def bind_request(rid: str, rpc_method: str) -> None:
    """Start the log context of one RPC (in the RPC's own task context)."""
    request_id.set(rid)
    method.set(rpc_method)
    tenant.set("")


def bind_tenant(name: str) -> None:
    tenant.set(name)


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's context (put there by ContextFilter when it was logged, unless
    `extra=` gave it explicitly) and its other extra fields, context first."""
    out: dict[str, Any] = {
        name: record.__dict__[name] for name, _ in CONTEXT if name in record.__dict__
    }
    for key, value in record.__dict__.items():
        if key not in _STANDARD and not key.startswith("_"):
            out[key] = value
    return out


class ContextFilter(logging.Filter):
    """Copies the context onto each record when it is logged, so a formatter
    running later or on another thread (a QueueHandler) still sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in CONTEXT:
            if name not in record.__dict__:
                value = var.get()
                if value:
                    setattr(record, name, value)
        return True


def _time(created: float) -> str:
    stamp = dt.datetime.fromtimestamp(created, dt.UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the context
    and extra fields, then `exception` with the traceback if there is one."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": _time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in fields(record).items():
            doc.setdefault(key, value)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message key=value ...` for people reading a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_time(record.created)} {record.levelname} {record.name}: {record.getMessage()}"
        extra = " ".join(f"{k}={v}" for k, v in fields(record).items())
        if extra:
            line = f"{line} {extra}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        if record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return line


def formatter(fmt: str) -> logging.Formatter:
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r} (json or text)")
    return JsonFormatter() if fmt == "json" else TextFormatter()


def configure(level: str = "INFO", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Send every log record to `stream` (stderr) in `fmt`, replacing the root
    logger's handlers."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(fmt))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
