"""The server interceptor: each RPC's log context, the write deadline of its
responses when it streams them, and, when metrics are on, its count and
latency by status code."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from typing import Any

import grpc

from jobtrace import logs
from jobtrace.api.delivery import deliver
from jobtrace.metrics import Metrics, RpcCounters

log = logging.getLogger(__name__)

# A caller's x-request-id is kept when it is printable ASCII without spaces.
REQUEST_ID_RE = re.compile(r"[\x21-\x7e]{1,128}+")

_KINDS = {
    (False, False): "unary",
    (False, True): "server_stream",
    (True, False): "client_stream",
    (True, True): "bidi_stream",
}
_FACTORIES = {
    "unary": (grpc.unary_unary_rpc_method_handler, "unary_unary"),
    "server_stream": (grpc.unary_stream_rpc_method_handler, "unary_stream"),
    "client_stream": (grpc.stream_unary_rpc_method_handler, "stream_unary"),
    "bidi_stream": (grpc.stream_stream_rpc_method_handler, "stream_stream"),
}


def status_name(exc: BaseException, context: Any, elapsed: float) -> str:
    """The status code an RPC ends with when its handler raised `exc`, `elapsed`
    seconds after it started."""
    if isinstance(exc, grpc.aio.AbortError):
        # abort() / abort_with_status() (the domain errors) set the code first.
        code = context.code()
        return code.name if code is not None else "UNKNOWN"
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        # grpc cancels the handler when the client cancels or the deadline
        # passes. The deadline sent on the wire is rounded up (to 10 ms for a
        # 1 s timeout, coarser for longer ones), so the client's own deadline
        # may cancel the call a little before the server's: that counts too.
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0.01 + 0.02 * (elapsed + remaining):
            return "DEADLINE_EXCEEDED"
        return "CANCELLED"
    # grpc answers any other exception with UNKNOWN.
    return "UNKNOWN"


def _ok_name(context: Any) -> str:
    code = context.code()  # a handler may set a code and return normally
    return code.name if code is not None else "OK"


def _request_id(context: Any) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id":
            if isinstance(value, str) and REQUEST_ID_RE.fullmatch(value):
                return value
            break
    return logs.new_request_id()


class CallObserver(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Wraps every handler once per method. A call binds its log context
    (request id, method) in its own task context and, with metrics, counts
    itself started and, when it ends, handled with its code and duration. A
    streaming handler's responses are written under a deadline of `stall_s`
    seconds each (see delivery.deliver)."""

    def __init__(self, metrics: Metrics | None, stall_s: float = 30.0) -> None:
        self._metrics = metrics
        self._stall_s = stall_s
        self._handlers: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        method: str = details.method
        cached = self._handlers.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        self._handlers[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: Any) -> Any:
        kind = _KINDS[(bool(handler.request_streaming), bool(handler.response_streaming))]
        factory, attribute = _FACTORIES[kind]
        behavior = getattr(handler, attribute)
        counters = self._metrics.rpc(method, kind) if self._metrics is not None else None
        if inspect.isasyncgenfunction(behavior):
            observed: Any = _observe_stream(behavior, method, counters, self._stall_s)
        elif inspect.iscoroutinefunction(behavior):
            observed = _observe_call(behavior, method, counters)
        else:
            return handler  # a synchronous handler: not served by this async server
        return factory(
            observed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _observe_call(
    behavior: Callable[[Any, Any], Awaitable[Any]], method: str, counters: RpcCounters | None
) -> Callable[[Any, Any], Awaitable[Any]]:
    async def call(request: Any, context: Any) -> Any:
        logs.bind_request(_request_id(context), method)
        if counters is None:
            return await behavior(request, context)
        with _counted(counters, context):
            return await behavior(request, context)

    return call


def _observe_stream(
    behavior: Callable[[Any, Any], AsyncGenerator[Any, None]],
    method: str,
    counters: RpcCounters | None,
    stall_s: float,
) -> Callable[[Any, Any], Awaitable[None]]:
    async def stream(request: Any, context: Any) -> None:
        logs.bind_request(_request_id(context), method)
        with contextlib.nullcontext() if counters is None else _counted(counters, context):
            # The handler is closed (its cleanup runs) before the call is counted.
            await deliver(behavior(request, context), context, stall_s, method)

    return stream


@contextlib.contextmanager
def _counted(counters: RpcCounters, context: Any) -> Iterator[None]:
    """Count a call started now and, when it ends, handled with its code and duration."""
    counters.started.inc()
    start = time.perf_counter()
    code = ""
    try:
        yield
    except BaseException as exc:
        code = status_name(exc, context, time.perf_counter() - start)
        raise
    finally:
        counters.handled(code or _ok_name(context), time.perf_counter() - start)
