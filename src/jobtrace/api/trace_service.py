"""TraceService: appends, cursor pages, live streams, run status and search."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from jobtrace.api import convert
from jobtrace.api.credentials import guarded
from jobtrace.api.errors import rpc
from jobtrace.api.limits import PageBytes, StreamLimiter
from jobtrace.auth import Authenticator, Role
from jobtrace.domain.search import TraceSearch
from jobtrace.domain.summary import RunSummaries
from jobtrace.domain.trace import Trace
from jobtrace.pb import trace_service_pb2 as pb
from jobtrace.pb import trace_service_pb2_grpc as pb_grpc


class TraceServicer(pb_grpc.TraceServiceServicer):
    def __init__(
        self,
        trace: Trace,
        auth: Authenticator,
        streams: StreamLimiter,
        *,
        pages: PageBytes,
        search: TraceSearch,
        summaries: RunSummaries,
    ) -> None:
        self._trace = trace
        self._search = search
        self._summaries = summaries
        self._auth = auth
        self._streams = streams
        self._pages = pages

    @rpc
    async def AppendTraceEvents(
        self, request: pb.AppendTraceEventsRequest, context: Any
    ) -> pb.AppendTraceEventsResponse:
        principal = self._auth.require(context, Role.SUBMITTER)
        inputs = [convert.event_input_from_proto(e) for e in request.events]
        stored = await self._trace.append(
            principal.read_scope,
            request.run_id,
            inputs,
            out=self._pages.encoder(convert.event_to_proto),
            recorded_by=principal.subject,
        )
        return pb.AppendTraceEventsResponse(events=stored)

    @rpc
    async def ListTraceEvents(
        self, request: pb.ListTraceEventsRequest, context: Any
    ) -> pb.ListTraceEventsResponse:
        principal = self._auth.require(context, Role.READER)
        events, cursor, more = await self._trace.list(
            principal.read_scope,
            request.run_id,
            request.cursor,
            convert.event_filter(request),
            request.page_size,
            view=request.view,
            out=self._pages.encoder(
                lambda e: convert.event_to_proto(e, full=request.view == pb.TRACE_EVENT_VIEW_FULL)
            ),
        )
        return pb.ListTraceEventsResponse(events=events, next_cursor=cursor, more=more)

    @rpc
    async def StreamTraceEvents(
        self, request: pb.StreamTraceEventsRequest, context: Any
    ) -> AsyncIterator[pb.StreamTraceEventsResponse]:
        principal = self._auth.require(context, Role.READER)
        stream = self._trace.stream(
            principal.read_scope,
            request.run_id,
            request.cursor,
            convert.event_filter(request),
            request.follow,
        )
        with self._streams.hold(principal):
            async with aclosing(guarded(self._auth, context, principal, stream)) as items:
                async for item in items:
                    if item.event is not None:
                        yield pb.StreamTraceEventsResponse(
                            event=convert.event_to_proto(item.event), cursor=item.cursor
                        )
                    elif item.final is not None:
                        yield pb.StreamTraceEventsResponse(
                            final_status=convert.run_status_to_proto(item.final),
                            cursor=item.cursor,
                        )
                    else:
                        yield pb.StreamTraceEventsResponse(
                            keepalive=pb.Keepalive(time=convert.us_to_ts(item.keepalive_us)),
                            cursor=item.cursor,
                        )

    @rpc
    async def GetRunStatus(
        self, request: pb.GetRunStatusRequest, context: Any
    ) -> pb.GetRunStatusResponse:
        principal = self._auth.require(context, Role.READER)
        status = await self._trace.run_status(principal.read_scope, request.run_id)
        return pb.GetRunStatusResponse(status=convert.run_status_to_proto(status))

    @rpc
    async def SearchTraceEvents(
        self, request: pb.SearchTraceEventsRequest, context: Any
    ) -> pb.SearchTraceEventsResponse:
        principal = self._auth.require(context, Role.READER)
        full = request.view == pb.TRACE_EVENT_VIEW_FULL
        found = await self._search.search(
            principal.read_scope,
            convert.search_request(request),
            out=self._pages.encoder(lambda hit: convert.hit_to_proto(hit, full=full)),
        )
        return pb.SearchTraceEventsResponse(hits=found.hits, next_page_token=found.next_page_token)

    @rpc
    async def GetRunSummary(
        self, request: pb.GetRunSummaryRequest, context: Any
    ) -> pb.GetRunSummaryResponse:
        principal = self._auth.require(context, Role.READER)
        summary, recent = await self._summaries.summarise(
            principal.read_scope,
            principal.tenant,
            run_id=request.run_id,
            workflow_name=request.workflow_name,
            recent_runs=request.recent_runs,
        )
        return pb.GetRunSummaryResponse(
            summary=convert.run_summary_to_proto(summary),
            recent_runs=[convert.recent_run_to_proto(r) for r in recent],
        )
