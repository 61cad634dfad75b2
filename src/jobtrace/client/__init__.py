"""Python clients of jobtrace: typed async and sync API clients and the worker runtime."""

from jobtrace.client.api import (
    Client,
    Page,
    RetryPolicy,
    TracePage,
    concurrency_key,
    job_payload,
    job_result,
    job_spec,
    label_requirement,
    parse_requirement,
    rate_limit_use,
    workflow_outputs,
)
from jobtrace.client.channel import Endpoint, InsecureTokenWarning
from jobtrace.client.errors import (
    AlreadyExists,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    InvalidInput,
    JobtraceError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    RunFailed,
    Unauthenticated,
    Unavailable,
)
from jobtrace.client.handlers import NonRetryableError, SyncJobContext
from jobtrace.client.sync import SyncClient
from jobtrace.client.verify import verify_offline
from jobtrace.client.worker import AnnotationRefused, JobContext, Worker
from jobtrace.dsse import OfflineVerdict

__all__ = [
    "AlreadyExists",
    "AnnotationRefused",
    "Client",
    "DataLoss",
    "DeadlineExceeded",
    "Endpoint",
    "FailedPrecondition",
    "FieldViolation",
    "InsecureTokenWarning",
    "InvalidArgument",
    "InvalidInput",
    "JobContext",
    "JobtraceError",
    "NonRetryableError",
    "NotFound",
    "OfflineVerdict",
    "Page",
    "PermissionDenied",
    "ResourceExhausted",
    "RetryPolicy",
    "RunFailed",
    "SyncClient",
    "SyncJobContext",
    "TracePage",
    "Unauthenticated",
    "Unavailable",
    "Worker",
    "concurrency_key",
    "job_payload",
    "job_result",
    "job_spec",
    "label_requirement",
    "parse_requirement",
    "rate_limit_use",
    "verify_offline",
    "workflow_outputs",
]
