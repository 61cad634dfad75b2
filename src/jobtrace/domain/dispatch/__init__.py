"""Dispatch of jobs to connected workers: sessions, placement, leases, reports, supervision."""

from jobtrace.domain.dispatch.scheduler import Scheduler
from jobtrace.domain.dispatch.sessions import (
    MAX_BATCH_REPORTS,
    Acked,
    Assign,
    AssignMany,
    BatchAnswer,
    Cancel,
    Drained,
    HeartbeatAcked,
    Hello,
    Outgoing,
    Refused,
    Welcome,
    WorkerSession,
)
from jobtrace.store.db import WRITE_QUEUED as REPORT_QUEUED

__all__ = [
    "MAX_BATCH_REPORTS",
    "REPORT_QUEUED",
    "Acked",
    "Assign",
    "AssignMany",
    "BatchAnswer",
    "Cancel",
    "Drained",
    "HeartbeatAcked",
    "Hello",
    "Outgoing",
    "Refused",
    "Scheduler",
    "Welcome",
    "WorkerSession",
]
