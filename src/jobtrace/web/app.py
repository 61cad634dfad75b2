"""The ASGI application of the HTTP listener: Connect services, the
EventSource endpoint, CORS and the request size limit."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from connectrpc import _codec
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from google.protobuf.json_format import ParseError
from google.protobuf.message import DecodeError

from jobtrace.api.delivery import reader_stalled
from jobtrace.domain.errors import FieldViolation, Invalid
from jobtrace.web.context import error_from_domain
from jobtrace.web.errors import error_body, http_status
from jobtrace.web.sse import EVENTS_PATH, EventsEndpoint

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Request headers a browser may send cross-origin (answered in preflights).
ALLOW_HEADERS = (
    "authorization, content-type, connect-protocol-version, connect-timeout-ms, "
    "connect-accept-encoding, connect-content-encoding, content-encoding, accept-encoding, "
    "x-request-id, traceparent, jobtrace-json, x-user-agent, last-event-id"
)
# Response headers a cross-origin script may read.
EXPOSE_HEADERS = (
    "content-encoding, connect-content-encoding, grpc-status, grpc-message, grpc-status-details-bin"
)
PREFLIGHT_MAX_AGE_S = 7200
# Envelope prefix of a streamed message (flags + length).
ENVELOPE_BYTES = 5


def malformed(reason: str) -> ConnectError:
    """A request body that does not parse, answered as gRPC answers it
    (api/handlers.py MalformedRequest): INVALID_ARGUMENT with its details."""
    return error_from_domain(
        Invalid(
            [FieldViolation("", f"request is not a valid protobuf message: {reason}")],
            message=f"malformed request: {reason}",
        )
    )


class _SafeCodec:
    """A connect-python codec whose decode failure is INVALID_ARGUMENT with
    our details rather than UNKNOWN with the parser's text."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def name(self) -> str:
        name: str = self._inner.name()
        return name

    def encode(self, message: Any) -> bytes:
        data: bytes = self._inner.encode(message)
        return data

    def decode(self, data: bytes | bytearray, message: Any) -> Any:
        try:
            return self._inner.decode(data, message)
        except (DecodeError, ParseError, ValueError, RuntimeError, TypeError) as exc:
            raise malformed(str(exc) or type(exc).__name__) from None


def install_safe_codecs() -> None:
    # connect-python 0.9 looks codecs up in this registry by name; there is
    # no public hook for decode errors.
    for name, codec in list(_codec._codecs.items()):
        if not isinstance(codec, _SafeCodec):
            _codec._codecs[name] = _SafeCodec(codec)


class HttpApp:
    """Routes `/<package.Service>/<Method>` to that service's Connect
    application, when `methods` lists that method for it (None: every method
    of a mounted service), and `/v1/runs/{run_id}/events` to the EventSource
    endpoint; everything else is 404 (WorkerService's worker protocol, health,
    reflection: not routed at all, whatever the fallback serves). Requests with an
    `Origin` get CORS headers only when the origin is in `cors_origins`;
    preflights from other origins are refused (403)."""

    def __init__(
        self,
        services: Mapping[str, ASGIApp],
        events: EventsEndpoint,
        *,
        methods: Mapping[str, Iterable[str] | None] | None = None,
        cors_origins: Iterable[str] = (),
        max_message_bytes: int,
        stall_s: float = 30.0,
    ) -> None:
        install_safe_codecs()
        self._services = dict(services)
        self._methods: dict[str, frozenset[str] | None] = {
            name: None
            if methods is None or methods.get(name) is None
            else frozenset(methods[name] or ())
            for name in self._services
        }
        self._events = events
        self._origins = frozenset(o.rstrip("/") for o in cors_origins)
        self._max_body = max_message_bytes
        self._stall_s = stall_s
        # Where a request no route takes goes (the console's assets, say);
        # None: 404.
        self.fallback: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        origin = _header(scope, b"origin")
        cors: list[tuple[bytes, bytes]] = []
        if origin is not None:
            allowed = origin.rstrip("/") in self._origins
            if scope["method"] == "OPTIONS" and _header(scope, b"access-control-request-method"):
                await self._preflight(send, origin, allowed)
                return
            if allowed:
                cors = [
                    (b"access-control-allow-origin", origin.encode()),
                    (b"access-control-expose-headers", EXPOSE_HEADERS.encode()),
                    (b"vary", b"Origin"),
                ]
        path: str = scope["path"]
        match = EVENTS_PATH.fullmatch(path)
        if match is not None:
            await self._events(match["run_id"], scope, receive, send, cors)
            return
        service, _, rpc = path.lstrip("/").partition("/")
        app = self._services.get(service) if service else None
        served = self._methods.get(service)
        if app is not None and served is not None and rpc not in served:
            app = None  # a method of a mounted service not served over HTTP
        # `/<package.Service>/<Method>` not served here (WorkerService's
        # worker protocol, health, reflection) is 404 whatever the fallback serves.
        is_rpc = "." in service and bool(rpc) and "/" not in rpc
        if app is None and self.fallback is not None and not is_rpc:
            await self.fallback(scope, receive, _with_headers(send, cors))
            return
        if app is None:
            await _respond(send, 404, b"not found\n", [(b"content-type", b"text/plain"), *cors])
            return
        await app(scope, self._limited(receive), self._guarded(_with_headers(send, cors), path))

    def _limited(self, receive: Receive) -> Receive:
        """The request body, refused RESOURCE_EXHAUSTED once it exceeds the
        largest message (before it is all held in memory)."""
        limit = self._max_body + ENVELOPE_BYTES
        seen = 0

        async def read() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise ConnectError(
                        Code.RESOURCE_EXHAUSTED,
                        f"request message larger than the limit of {self._max_body} bytes",
                    )
            return message

        return read

    def _guarded(self, send: Send, method: str) -> Send:
        """Responses written under the stall limit (--stream-stall-seconds),
        as gRPC streams are (api/delivery.py): a reader that takes nothing
        for that long ends its call RESOURCE_EXHAUSTED (READER_STALLED), and
        the servicer's stream is closed, releasing what it holds."""
        stall_s = self._stall_s
        stalled = False

        async def sender(message: dict[str, Any]) -> None:
            nonlocal stalled
            if stalled:
                return  # the end of a stream no one reads
            try:
                async with asyncio.timeout(stall_s):
                    await send(message)
            except TimeoutError:
                stalled = True
                log.warning("%s: reader stalled for %g s; stream ended", method, stall_s)
                raise error_from_domain(reader_stalled(stall_s)) from None

        return sender

    async def _preflight(self, send: Send, origin: str, allowed: bool) -> None:
        if not allowed:
            await _respond(send, 403, b"origin not allowed\n", [(b"content-type", b"text/plain")])
            return
        await _respond(
            send,
            204,
            b"",
            [
                (b"access-control-allow-origin", origin.encode()),
                (b"access-control-allow-methods", b"GET, POST"),
                (b"access-control-allow-headers", ALLOW_HEADERS.encode()),
                (b"access-control-max-age", str(PREFLIGHT_MAX_AGE_S).encode()),
                (b"vary", b"Origin"),
            ],
        )


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


def _with_headers(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    if not extra:
        return send

    async def sender(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *extra]}
        await send(message)

    return sender


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


__all__ = ["HttpApp", "error_body", "http_status"]
