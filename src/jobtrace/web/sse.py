"""EventSource for log viewers: GET /v1/runs/{run_id}/events streams a run's
trace as text/event-stream, through TraceService.StreamTraceEvents itself
(the same authentication, tenancy, filters, stream limit and credential
watch as the gRPC stream).

One SSE event per trace event: `id:` its cursor, `event:` its type
(started, progress, completed, failed, log), `data:` the event as the
Connect JSON of TraceEvent. When the run ends (with follow=true) a final
`status` event carries the RunStatus and the stream closes. An idle stream
gets a `: keepalive` comment every --keepalive-seconds. `Last-Event-ID` (or
`?last_event_id=`) resumes exactly after that event. A token may come as
`?access_token=` (EventSource cannot set headers); it is never logged (the
listener keeps no access log)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

from connectrpc.errors import ConnectError
from google.protobuf import json_format

from jobtrace import logs
from jobtrace.domain.errors import FieldViolation, Invalid
from jobtrace.pb import common_pb2
from jobtrace.pb import trace_service_pb2 as pb
from jobtrace.web.context import HttpCallContext, error_from_domain
from jobtrace.web.errors import error_body, http_status

log = logging.getLogger(__name__)

EVENTS_PATH = re.compile(r"/v1/runs/(?P<run_id>[^/]+)/events")
METHOD = "/v1/runs/{run_id}/events"
# Query parameters taken as fields of StreamTraceEventsRequest (proto JSON
# names or enum numbers; level and category also as short names: warn, business).
FILTERS = (
    "follow",
    "min_level",
    "category",
    "node_id",
    "type",
    "milestones_only",
    "since",
    "until",
)
_PREFIXES = {"min_level": "LEVEL_", "category": "CATEGORY_", "type": "TRACE_EVENT_TYPE_"}
TYPE_PREFIX = "TRACE_EVENT_TYPE_"
# The id of the final `status` event is the cursor with this suffix (cursors
# are unpadded base64url: never a dot).
END_SUFFIX = ".end"

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


def event_name(event: common_pb2.TraceEvent) -> str:
    name = common_pb2.TraceEventType.Name(event.type)
    return name.removeprefix(TYPE_PREFIX).lower()


def _json(message: Any) -> str:
    return json.dumps(json_format.MessageToDict(message), separators=(",", ":"), ensure_ascii=False)


def format_event(item: pb.StreamTraceEventsResponse) -> bytes:
    """One stream message as SSE text (a keepalive as a comment)."""
    kind = item.WhichOneof("kind")
    if kind == "event":
        return (
            f"id: {item.cursor}\nevent: {event_name(item.event)}\ndata: {_json(item.event)}\n\n"
        ).encode()
    if kind == "final_status":
        # Its id says "ended": a reconnect with it is answered 204, which
        # tells an EventSource to stop reconnecting.
        return (
            f"id: {item.cursor}{END_SUFFIX}\nevent: status\ndata: {_json(item.final_status)}\n\n"
        ).encode()
    return b": keepalive\n\n"


def stream_request(
    run_id: str, query: dict[str, list[str]], last_event_id: str
) -> pb.StreamTraceEventsRequest:
    """The StreamTraceEventsRequest a GET asks for; Invalid for a parameter
    that is not one."""
    fields: dict[str, Any] = {"runId": run_id}
    for name in FILTERS:
        values = query.get(name)
        if not values:
            continue
        value: Any = values[-1]
        if name in ("follow", "milestones_only"):
            if value.lower() not in ("true", "false", "1", "0", ""):
                raise Invalid([FieldViolation(name, f"{name} must be true or false")])
            value = value.lower() in ("true", "1", "")
        elif name in _PREFIXES:
            if value.isdigit():
                value = int(value)
            elif not value.upper().startswith(_PREFIXES[name]):
                value = _PREFIXES[name] + value.upper()
            else:
                value = value.upper()
        fields[json_format_name(name)] = value
    if last_event_id:
        fields["cursor"] = last_event_id
    request = pb.StreamTraceEventsRequest()
    try:
        json_format.ParseDict(fields, request)
    except json_format.ParseError as exc:
        raise Invalid([FieldViolation("", str(exc))], message=f"bad query: {exc}") from None
    return request


def json_format_name(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


class EventsEndpoint:
    def __init__(
        self,
        servicer: Any,
        *,
        stall_s: float,
        max_stream_s: float | None = None,
    ) -> None:
        self._servicer = servicer
        self._stall_s = stall_s
        self._max_stream_s = max_stream_s

    async def __call__(
        self,
        run_id: str,
        scope: dict[str, Any],
        receive: Receive,
        send: Send,
        extra_headers: list[tuple[bytes, bytes]],
    ) -> None:
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        token = (query.get("access_token") or [""])[-1]
        if token and not any(k.lower() == "authorization" for k, _ in headers):
            headers.append(("authorization", f"Bearer {token}"))
        last_event_id = next((v for k, v in headers if k.lower() == "last-event-id"), "")
        last_event_id = last_event_id or (query.get("last_event_id") or [""])[-1]
        ended = last_event_id.endswith(END_SUFFIX)
        last_event_id = last_event_id.removesuffix(END_SUFFIX)
        client = scope.get("client")
        context = HttpCallContext(headers, peer=f"{client[0]}:{client[1]}" if client else None)
        logs.bind_request(logs.new_request_id(), METHOD)
        if scope["method"] not in ("GET", "HEAD"):
            await _plain(send, 405, b"", [(b"allow", b"GET"), *extra_headers])
            return
        try:
            request = stream_request(run_id, query, last_event_id)
        except Invalid as exc:
            await _error(send, error_from_domain(exc), extra_headers)
            return
        try:
            # Who may read the run, and that it exists, decided by the
            # servicer (the rules of GetRunStatus and StreamTraceEvents are
            # the same): refused here with an HTTP status; the stream's own
            # refusals (too many streams) and its end (credentials lapsed)
            # come as an `error` event once the stream is open.
            await self._servicer.GetRunStatus(pb.GetRunStatusRequest(run_id=run_id), context)
        except ConnectError as exc:
            await _error(send, exc, extra_headers)
            return
        if ended:
            # The client has had the final status: nothing more will come.
            await _plain(send, 204, b"", extra_headers)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [*SSE_HEADERS, *extra_headers],
            }
        )
        responses = self._servicer.StreamTraceEvents(request, context)
        # The stream runs in this task; a client that leaves cancels it (the
        # servicer's cleanup runs: its stream slot and subscription are freed).
        host = asyncio.current_task()
        assert host is not None
        gone = False

        async def watch_disconnect() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            host.cancel()

        watcher = asyncio.create_task(watch_disconnect(), name="jobtrace-sse-disconnect")
        loop = asyncio.get_running_loop()
        deadline = None if not self._max_stream_s else loop.time() + self._max_stream_s
        try:
            async with contextlib.aclosing(responses):
                while True:
                    try:
                        async with asyncio.timeout_at(deadline):
                            item = await anext(responses)
                    except TimeoutError:
                        return  # the longest a stream may stay open: the client resumes
                    except StopAsyncIteration:
                        return
                    body = format_event(item)
                    try:
                        async with asyncio.timeout(self._stall_s):
                            await send(
                                {"type": "http.response.body", "body": body, "more_body": True}
                            )
                    except TimeoutError:
                        log.warning(
                            "%s: reader stalled for %g s; stream ended", METHOD, self._stall_s
                        )
                        gone = True  # no end either: the connection is dropped
                        return
                    if item.WhichOneof("kind") == "final_status":
                        return
        except asyncio.CancelledError:
            if gone and host.uncancel() == 0:
                return
            raise
        except ConnectError as exc:
            # An `error` event (the Connect error JSON), then the end.
            with contextlib.suppress(Exception):
                await send(
                    {
                        "type": "http.response.body",
                        "body": b"event: error\ndata: " + error_body(exc) + b"\n\n",
                        "more_body": True,
                    }
                )
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            if not gone:
                with contextlib.suppress(Exception):
                    await send({"type": "http.response.body", "body": b"", "more_body": False})


SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


async def _plain(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _error(send: Send, exc: ConnectError, extra_headers: list[tuple[bytes, bytes]]) -> None:
    await _plain(
        send,
        http_status(exc),
        error_body(exc),
        [(b"content-type", b"application/json"), *extra_headers],
    )
