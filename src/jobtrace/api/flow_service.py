"""ScheduleService, flow-control part: the rate-limit admin RPCs (the
schedules' RPCs live in api.schedule_service; the lead combines the two)."""

from __future__ import annotations

from typing import Any

from jobtrace.api import convert
from jobtrace.api.errors import rpc
from jobtrace.auth import Authenticator, Role
from jobtrace.domain.flow import RateLimits
from jobtrace.pb import schedule_service_pb2 as pb
from jobtrace.pb import schedule_service_pb2_grpc as pb_grpc


class FlowServicer(pb_grpc.ScheduleServiceServicer):
    """Rate limits of the caller's tenant: admins create, update and delete
    them, readers get and list them."""

    def __init__(self, limits: RateLimits, auth: Authenticator) -> None:
        self._limits = limits
        self._auth = auth

    @rpc
    async def CreateRateLimit(
        self, request: pb.CreateRateLimitRequest, context: Any
    ) -> pb.CreateRateLimitResponse:
        principal = self._auth.require(context, Role.ADMIN)
        limit = await self._limits.create(
            principal.tenant, convert.rate_limit_from_proto(request.rate_limit), principal.subject
        )
        return pb.CreateRateLimitResponse(rate_limit=convert.rate_limit_to_proto(limit))

    @rpc
    async def GetRateLimit(
        self, request: pb.GetRateLimitRequest, context: Any
    ) -> pb.GetRateLimitResponse:
        principal = self._auth.require(context, Role.READER)
        limit = await self._limits.get(principal.tenant, request.key)
        return pb.GetRateLimitResponse(rate_limit=convert.rate_limit_to_proto(limit))

    @rpc
    async def ListRateLimits(
        self, request: pb.ListRateLimitsRequest, context: Any
    ) -> pb.ListRateLimitsResponse:
        principal = self._auth.require(context, Role.READER)
        limits, token = await self._limits.list(
            principal.tenant, request.page_size, request.page_token
        )
        return pb.ListRateLimitsResponse(
            rate_limits=[convert.rate_limit_to_proto(x) for x in limits], next_page_token=token
        )

    @rpc
    async def UpdateRateLimit(
        self, request: pb.UpdateRateLimitRequest, context: Any
    ) -> pb.UpdateRateLimitResponse:
        principal = self._auth.require(context, Role.ADMIN)
        limit = await self._limits.update(
            principal.tenant, convert.rate_limit_from_proto(request.rate_limit)
        )
        return pb.UpdateRateLimitResponse(rate_limit=convert.rate_limit_to_proto(limit))

    @rpc
    async def DeleteRateLimit(
        self, request: pb.DeleteRateLimitRequest, context: Any
    ) -> pb.DeleteRateLimitResponse:
        principal = self._auth.require(context, Role.ADMIN)
        await self._limits.delete(principal.tenant, request.key)
        return pb.DeleteRateLimitResponse()
