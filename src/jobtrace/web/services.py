"""Connect services that delegate every method to the gRPC servicer of the
same service: one implementation, two protocols."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from google.protobuf.descriptor import ServiceDescriptor

from jobtrace import logs
from jobtrace.api.interceptor import REQUEST_ID_RE
from jobtrace.domain.errors import DeadlineExceeded
from jobtrace.metrics import Metrics
from jobtrace.web.context import HttpCallContext, error_from_domain

log = logging.getLogger(__name__)


def snake_case(name: str) -> str:
    """A method's name as connect-python's generated code spells it (GetJob: get_job)."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def call_context(ctx: RequestContext[Any, Any]) -> HttpCallContext:
    return HttpCallContext(
        ctx.request_headers().allitems(),
        peer=ctx.client_address(),
        timeout_ms=ctx.timeout_ms(),
        trailers=ctx.response_trailers(),
    )


def _request_id(context: HttpCallContext) -> str:
    for key, value in context.invocation_metadata():
        if key == "x-request-id":
            if REQUEST_ID_RE.fullmatch(value):
                return value
            break
    return logs.new_request_id()


def _deadline_exceeded() -> ConnectError:
    return error_from_domain(
        DeadlineExceeded("deadline exceeded: the call took longer than connect-timeout-ms")
    )


class Delegate:
    """The Connect implementation of one service: each method (by its
    generated snake_case name) calls the gRPC servicer's method of the same
    RPC with an HttpCallContext, under the caller's deadline, in the log
    context (request id, method) a gRPC call gets, counted in the RPC
    metrics as gRPC calls are. Built from the service descriptor, so an RPC
    added to the proto is served over HTTP with no change here.

    `served`: the RPC names served over HTTP (None: all). Every other method
    (and any client or bidi stream, which HTTP/1.1 cannot carry) gets a
    function that refuses, so the generated application, which reads each
    method eagerly, still builds; HttpApp does not route to them at all."""

    def __init__(
        self,
        descriptor: ServiceDescriptor,
        servicer: Any,
        metrics: Metrics | None = None,
        *,
        served: Iterable[str] | None = None,
    ) -> None:
        allowed = None if served is None else frozenset(served)
        self._methods: dict[str, Callable[..., Any]] = {}
        for method in descriptor.methods:
            full = f"/{descriptor.full_name}/{method.name}"
            if method.client_streaming or (allowed is not None and method.name not in allowed):
                self._methods[snake_case(method.name)] = _refused(full, method.server_streaming)
                continue
            behavior = getattr(servicer, method.name)
            kind = "server_stream" if method.server_streaming else "unary"
            counters = metrics.rpc(full, kind) if metrics is not None else None
            if method.server_streaming:
                self._methods[snake_case(method.name)] = _stream(behavior, full, counters)
            else:
                self._methods[snake_case(method.name)] = _unary(behavior, full, counters)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        try:
            return self._methods[name]
        except KeyError:
            raise AttributeError(name) from None


def _refused(method: str, streaming: bool) -> Callable[..., Any]:
    """A method not served over HTTP: NOT_FOUND, should a request reach it."""

    def error() -> ConnectError:
        return ConnectError(Code.NOT_FOUND, f"{method} is not served over HTTP")

    if streaming:

        async def stream(request: Any, ctx: RequestContext[Any, Any]) -> AsyncIterator[Any]:
            raise error()
            yield  # an async generator, as the generated code expects

        return stream

    async def call(request: Any, ctx: RequestContext[Any, Any]) -> Any:
        raise error()

    return call


def _unary(
    behavior: Callable[[Any, Any], Awaitable[Any]], method: str, counters: Any
) -> Callable[[Any, RequestContext[Any, Any]], Awaitable[Any]]:
    async def call(request: Any, ctx: RequestContext[Any, Any]) -> Any:
        context = call_context(ctx)
        logs.bind_request(_request_id(context), method)
        with _counted(counters, context):
            try:
                async with asyncio.timeout_at(_loop_deadline(context)):
                    return await behavior(request, context)
            except TimeoutError:
                raise _deadline_exceeded() from None

    return call


def _stream(
    behavior: Callable[[Any, Any], AsyncGenerator[Any, None]], method: str, counters: Any
) -> Callable[[Any, RequestContext[Any, Any]], AsyncIterator[Any]]:
    async def stream(request: Any, ctx: RequestContext[Any, Any]) -> AsyncIterator[Any]:
        context = call_context(ctx)
        logs.bind_request(_request_id(context), method)
        with _counted(counters, context):
            async with contextlib.aclosing(behavior(request, context)) as responses:
                deadline = _loop_deadline(context)
                while True:
                    try:
                        async with asyncio.timeout_at(deadline):
                            response = await anext(responses)
                    except StopAsyncIteration:
                        return
                    except TimeoutError:
                        raise _deadline_exceeded() from None
                    yield response

    return stream


def _loop_deadline(context: HttpCallContext) -> float | None:
    """The caller's deadline on the event loop's clock."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return asyncio.get_running_loop().time() + remaining


@contextlib.contextmanager
def _counted(counters: Any, context: HttpCallContext) -> Any:
    if counters is None:
        yield
        return
    import time

    counters.started.inc()
    start = time.perf_counter()
    code = "OK"
    try:
        yield
    except ConnectError as exc:
        code = exc.code.name if exc.code != Code.CANCELED else "CANCELLED"
        raise
    except BaseException:
        code = "CANCELLED"
        raise
    finally:
        counters.handled(code, time.perf_counter() - start)
