"""Client exceptions: every failed call surfaces as a JobtraceError with its gRPC status."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request, as the server named it (`google.rpc.BadRequest`)."""

    field: str
    description: str

    def __str__(self) -> str:
        return f"{self.field or '(request)'}: {self.description}"


class JobtraceError(Exception):
    """A call failed. `code` is the gRPC status code; `reason` and `metadata` come
    from the server's `google.rpc.ErrorInfo`, `violations` from its `BadRequest`."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        metadata: dict[str, str] | None = None,
        violations: tuple[FieldViolation, ...] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = dict(metadata or {})
        self.violations = violations

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        if self.violations:
            text += "".join(f"\n  {v}" for v in self.violations)
        return text


class InvalidArgument(JobtraceError):
    """The request was malformed; `violations` lists every bad field."""


class InvalidInput(InvalidArgument, ValueError):
    """Refused on the client, before any call: input that does not have its
    documented shape (a workflow file, a step or request context given as a
    mapping, an envelope, a public key). `violations` names each bad field by
    its path (`steps[1].job.max_attempts`); str() is one line. Also a ValueError."""

    def __init__(self, violations: Sequence[FieldViolation] | str, *, source: str = "") -> None:
        if isinstance(violations, str):
            violations = (FieldViolation("", violations),)
        text = "; ".join(
            f"{v.field}: {v.description}" if v.field else v.description for v in violations
        )
        super().__init__(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{source}: {text}" if source else text,
            reason="INVALID_INPUT",
            violations=tuple(violations),
        )

    def __str__(self) -> str:
        return self.message


class NotFound(JobtraceError):
    """No such job, workflow, run, attestation (or not in the caller's tenant)."""


class AlreadyExists(JobtraceError):
    """A request id reused with a different body, or a duplicate report."""


class FailedPrecondition(JobtraceError):
    """The call does not fit the current state (e.g. cancelling a finished job)."""


class ResourceExhausted(JobtraceError):
    """A size limit, quota or stream limit was hit."""


class Unauthenticated(JobtraceError):
    """No token, or a token the server does not accept."""


class PermissionDenied(JobtraceError):
    """The token is valid but lacks the role for this call."""


class Unavailable(JobtraceError):
    """The server could not be reached (after the retries allowed)."""


class DeadlineExceeded(JobtraceError):
    """The call took longer than its deadline."""


class DataLoss(JobtraceError):
    """Stored data is damaged (e.g. an attestation row edited by hand)."""


class RunFailed(JobtraceError):
    """A job or workflow that was awaited for its result ended without one:
    `state` says how (FAILED, CANCELLED, TERMINATED, TIMED_OUT), `failure` why
    (a jobtrace.v1.Failure), `run` is the Job or Workflow as it ended. Its
    code is FAILED_PRECONDITION (the call itself succeeded) and its reason
    RUN_<STATE>, e.g. RUN_FAILED."""

    def __init__(self, run: Any, kind: str) -> None:
        from jobtrace.pb import common_pb2

        state = common_pb2.RunState.Name(run.state).removeprefix("RUN_STATE_")
        failure = run.failure
        why = f": {failure.reason}" if failure.reason else ""
        super().__init__(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"{kind} {run.id} ended {state}{why}",
            reason=f"RUN_{state}",
            metadata={f"{kind}_id": run.id, "state": state, "code": failure.code},
        )
        self.run = run
        self.state = state
        self.failure = failure

    @classmethod
    def of_job(cls, job: Any) -> RunFailed:
        return cls(job, "job")

    @classmethod
    def of_workflow(cls, workflow: Any) -> RunFailed:
        return cls(workflow, "workflow")


_BY_CODE: dict[grpc.StatusCode, type[JobtraceError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.DATA_LOSS: DataLoss,
}


def from_rpc_error(err: grpc.aio.AioRpcError) -> JobtraceError:
    """The JobtraceError for a failed call, with the details the server attached."""
    code = err.code()
    reason = ""
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    status = None
    try:
        status = rpc_status.from_call(err)
    except ValueError:
        status = None  # trailers that contradict the status line: keep the code alone
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
    kind = _BY_CODE.get(code, JobtraceError)
    return kind(
        code,
        err.details() or code.name,
        reason=reason,
        metadata=metadata,
        violations=tuple(violations),
    )


@contextmanager
def mapped() -> Iterator[None]:
    """Turn grpc errors raised inside the block into JobtraceErrors, in one place."""
    try:
        yield
    except grpc.aio.AioRpcError as err:
        raise from_rpc_error(err) from err
