"""Dispatch of jobs to connected workers: sessions, placement, leases, reports, supervision."""

from jobtrace.domain.dispatch.scheduler import Scheduler
from jobtrace.domain.dispatch.sessions import (
    Acked,
    Assign,
    Cancel,
    Drained,
    HeartbeatAcked,
    Hello,
    Outgoing,
    Refused,
    Welcome,
    WorkerSession,
)

__all__ = [
    "Acked",
    "Assign",
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
