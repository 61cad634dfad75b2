"""Maps domain exceptions to gRPC status codes with google.rpc.Status details, in one place."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from jobtrace.api.wellformed import check_request
from jobtrace.domain import errors as de
from jobtrace.domain.errors import log_failure

log = logging.getLogger(__name__)

DOMAIN = "jobtrace"

_CODES: list[tuple[type[de.DomainError], grpc.StatusCode]] = [
    (de.Invalid, grpc.StatusCode.INVALID_ARGUMENT),
    (de.NotFound, grpc.StatusCode.NOT_FOUND),
    (de.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (de.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (de.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (de.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (de.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (de.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (de.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (de.Internal, grpc.StatusCode.INTERNAL),
    (de.DataLoss, grpc.StatusCode.DATA_LOSS),
]


def status_code(exc: de.DomainError) -> grpc.StatusCode:
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.UNKNOWN


def to_rpc_status(exc: de.DomainError) -> status_pb2.Status:
    code = status_code(exc)
    status = status_pb2.Status(code=code.value[0], message=exc.message)
    status.details.add().Pack(
        error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN, metadata=exc.metadata)
    )
    if isinstance(exc, de.Invalid):
        status.details.add().Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in exc.violations
                ]
            )
        )
    return status


def to_status(exc: de.DomainError) -> grpc.Status:
    return rpc_status.to_status(to_rpc_status(exc))


F = TypeVar("F", bound=Callable[..., Any])


def _check_parsed(request: Any) -> None:
    """Refuse a request that did not parse, or that holds what no field may
    (a NUL character, a non-finite number), before the servicer sees it."""
    from jobtrace.api.handlers import MalformedRequest

    if isinstance(request, MalformedRequest):
        raise de.Invalid(
            [de.FieldViolation("", f"request is not a valid protobuf message: {request.reason}")],
            message=f"malformed request: {request.reason}",
        )
    check_request(request)


async def _answer(context: Any, name: str, exc: Exception) -> None:
    """End the call for `exc`: a domain error with its status and details, an
    unexpected failure logged and answered without its text (an abort already
    under way goes on)."""
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    if isinstance(exc, de.DomainError):
        status = to_status(exc)
    else:
        log_failure(log, exc, "%s failed unexpectedly", name)
        status = to_status(de.unexpected(exc))
    await context.abort_with_status(status)  # raises AbortError


def rpc(fn: F) -> F:
    """Wrap a servicer method (unary or server-streaming) so that domain errors
    end the call with their status and details, and an unexpected failure is
    logged and answered without leaking its text."""
    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def stream(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                _check_parsed(request)
                async for item in fn(self, request, context):
                    yield item
            except Exception as exc:
                await _answer(context, fn.__name__, exc)

        return stream  # type: ignore[return-value]

    @functools.wraps(fn)
    async def unary(self: Any, request: Any, context: Any) -> Any:
        try:
            _check_parsed(request)
            return await fn(self, request, context)
        except Exception as exc:
            await _answer(context, fn.__name__, exc)

    return unary  # type: ignore[return-value]
