"""Domain exceptions; the api layer maps each to one gRPC status code."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str
    description: str


class DomainError(Exception):
    """Base of every error a caller can cause. `reason` is stable UPPER_SNAKE."""

    reason = "ERROR"

    def __init__(
        self, message: str, *, reason: str | None = None, metadata: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata = dict(metadata or {})


class Invalid(DomainError):
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation], message: str | None = None) -> None:
        text = message or "; ".join(f"{v.field}: {v.description}" for v in violations)
        super().__init__(text)
        self.violations = violations


class NotFound(DomainError):
    reason = "NOT_FOUND"


class AlreadyExists(DomainError):
    reason = "ALREADY_EXISTS"


class FailedPrecondition(DomainError):
    reason = "FAILED_PRECONDITION"


class StaleAttempt(FailedPrecondition):
    reason = "STALE_ATTEMPT"


class ResourceExhausted(DomainError):
    reason = "RESOURCE_EXHAUSTED"


class Unauthenticated(DomainError):
    reason = "UNAUTHENTICATED"


class PermissionDenied(DomainError):
    reason = "PERMISSION_DENIED"


class Unavailable(DomainError):
    reason = "UNAVAILABLE"


class DeadlineExceeded(DomainError):
    """A wait the caller bounded ended before what it waited for happened."""

    reason = "DEADLINE_EXCEEDED"


class Internal(DomainError):
    """A fault of the server, not of the caller: never raised by a rule, only
    used to answer a message whose handling failed unexpectedly."""

    reason = "INTERNAL"


class DataLoss(DomainError):
    """Stored data that no longer decodes: edited or corrupted outside jobtrace."""

    reason = "DATA_LOSS"


class Violations:
    """Collects every field violation of one request before raising."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field, description))

    def raise_if_any(self) -> None:
        if self.items:
            raise Invalid(self.items)


def unexpected(exc: Exception) -> DomainError:
    """What a caller is told of a failure that is not a rule's: UNAVAILABLE when
    storage is unreachable (send the request again), INTERNAL otherwise. Neither
    carries the exception's text (it may hold SQL); the log does, under the
    request id the message gives."""
    from jobtrace import logs
    from jobtrace.store.errors import is_transient

    if is_transient(exc):
        return Unavailable(
            "storage is unavailable; the request may not have been stored: send it again",
            reason="STORAGE_UNAVAILABLE",
        )
    rid = logs.request_id.get()
    return Internal(
        f"internal error ({type(exc).__name__}); the server log has the details"
        + (f" under request id {rid}" if rid else "")
    )


def log_failure(
    logger: logging.Logger,
    exc: BaseException,
    message: str,
    *args: object,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Log a failure that is not a rule's, with its traceback, unless storage
    refused or lost the operation: an outage is reported once, with a count,
    by `store.availability`, not once per call or per retry of background work
    (then only at DEBUG)."""
    from jobtrace.store.errors import is_transient

    if is_transient(exc):
        logger.debug(message + " (storage unavailable: %s)", *args, type(exc).__name__, extra=extra)
    else:
        logger.error(message, *args, exc_info=exc, extra=extra)
