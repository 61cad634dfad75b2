"""Python clients of jobtrace: the worker runtime (and, later, typed API clients)."""

from jobtrace.client.worker import JobContext, NonRetryableError, Worker

__all__ = ["JobContext", "NonRetryableError", "Worker"]
