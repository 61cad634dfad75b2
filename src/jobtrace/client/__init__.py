"""Python clients of jobtrace: typed async and sync API clients and the worker runtime."""

from jobtrace.client.api import Client, Page, RetryPolicy, TracePage, job_spec
from jobtrace.client.channel import Endpoint, InsecureTokenWarning
from jobtrace.client.errors import (
    AlreadyExists,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    JobtraceError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from jobtrace.client.sync import SyncClient
from jobtrace.client.worker import AnnotationRefused, JobContext, NonRetryableError, Worker

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
    "JobContext",
    "JobtraceError",
    "NonRetryableError",
    "NotFound",
    "Page",
    "PermissionDenied",
    "ResourceExhausted",
    "RetryPolicy",
    "SyncClient",
    "TracePage",
    "Unauthenticated",
    "Unavailable",
    "Worker",
    "job_spec",
]
