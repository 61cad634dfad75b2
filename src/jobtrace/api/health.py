"""gRPC health that follows storage: NOT_SERVING while the database does not answer."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from grpc_health.v1 import health, health_pb2

if TYPE_CHECKING:
    from jobtrace.store.availability import Availability

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def follow_storage(
    servicer: health.aio.HealthServicer, storage: Availability, services: Iterable[str]
) -> None:
    """Keep the overall status ("") and every service's in step with storage, so
    a load balancer routes around a replica whose calls would all be answered
    UNAVAILABLE. Runs until cancelled; once the server enters graceful shutdown
    the servicer ignores it (NOT_SERVING stays)."""
    names = ("", *services)
    while True:
        status = SERVING if storage.up else NOT_SERVING
        for name in names:
            await servicer.set(name, status)
        await storage.changed.wait()
        storage.changed.clear()
