"""What handlers are: the shapes Worker.handler accepts (checked when one is
registered), how each is called, and the blocking context of plain `def`
handlers, which run in a thread pool."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any, TypeVar

from jobtrace.pb import common_pb2

if TYPE_CHECKING:
    from jobtrace.client.worker import JobContext

# What a handler returns: the job's result (a JSON object), or None for none.
Result = Mapping[str, Any] | None
Handler = Callable[["JobContext"], Awaitable[Result]]
# The handler shapes Worker.handler accepts: async or plain, of (ctx) or (job, ctx).
AnyHandler = (
    Callable[["JobContext"], Awaitable[Result]]
    | Callable[[common_pb2.Job, "JobContext"], Awaitable[Result]]
    | Callable[["SyncJobContext"], Result]
    | Callable[[common_pb2.Job, "SyncJobContext"], Result]
)
H = TypeVar("H", bound=AnyHandler)


class NonRetryableError(Exception):
    """Raise from a handler to fail the job without retries."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class SyncJobContext:
    """What a plain `def` handler sees: the same job, payload and cancellation as
    JobContext, with blocking methods. The handler runs in the worker's thread
    pool; each method hands its report to the worker's event loop and waits for
    it there."""

    def __init__(self, ctx: JobContext, loop: asyncio.AbstractEventLoop) -> None:
        self.context = ctx
        self._loop = loop

    @property
    def job(self) -> common_pb2.Job:
        """The job as the server assigned it (spec, attempt, labels...)."""
        return self.context.job

    @property
    def job_id(self) -> str:
        """The job's id (job_...)."""
        return self.context.job.id

    @property
    def attempt(self) -> int:
        """This attempt's number (1 for the first run)."""
        return self.context.attempt

    @property
    def payload(self) -> dict[str, Any]:
        """The job's payload, as plain Python values."""
        return self.context.payload

    @property
    def upstream(self) -> dict[str, Any]:
        """Step name -> result of each step this one depends on (a workflow
        step only), as plain Python values."""
        return self.context.upstream

    @property
    def request_context(self) -> common_pb2.RequestContext:
        """The request that caused the job (body, user, metadata)."""
        return self.context.request_context

    @property
    def traceparent(self) -> str:
        """The W3C traceparent of the submitting call, if it carried one."""
        return self.context.traceparent

    @property
    def cancelled(self) -> bool:
        """Whether the server cancelled this attempt. A thread cannot be
        interrupted: poll this, and return early when it turns True."""
        return self.context._cancelled_in_threads.is_set()

    @property
    def cancel_reason(self) -> str:
        """Why it was cancelled (empty until it is)."""
        return self.context.cancel_reason

    def wait_cancelled(self, timeout: float | None = None) -> bool:
        """Block until the attempt is cancelled or `timeout` seconds pass;
        whether it was cancelled. A cancellable sleep: `if ctx.wait_cancelled(5): return`."""
        return self.context._cancelled_in_threads.wait(timeout)

    def progress(self, percent: float, message: str = "") -> None:
        """Blocking JobContext.progress: report progress (0-100), best effort."""
        self._call(self.context.progress(percent, message))

    def log(
        self,
        message: str,
        *,
        level: str = "info",
        category: str = "business",
        user_message: str = "",
        data: dict[str, Any] | None = None,
        milestone: bool = False,
        node_id: str = "",
        event_key: str | None = None,
    ) -> None:
        """Blocking JobContext.log: add an event to the run's trace."""
        self._call(
            self.context.log(
                message,
                level=level,
                category=category,
                user_message=user_message,
                data=data,
                milestone=milestone,
                node_id=node_id,
                event_key=event_key,
            )
        )

    def annotate(
        self,
        attributes: dict[str, Any],
        *,
        actor: common_pb2.Actor | None = None,
        payload: dict[str, Any] | None = None,
    ) -> None:
        """Blocking JobContext.annotate: record annotations for this attempt;
        returns once the server accepted them (AnnotationRefused otherwise)."""
        self._call(self.context.annotate(attributes, actor=actor, payload=payload))

    def set_output_summary(self, summary: Mapping[str, Any] | None) -> None:
        """JobContext.set_output_summary: what the trace shows of the result."""
        self.context.set_output_summary(summary)

    def _call(self, step: Awaitable[None]) -> None:
        async def run() -> None:
            await step

        if self._loop.is_closed():
            raise ConnectionError("the worker has stopped")
        asyncio.run_coroutine_threadsafe(run(), self._loop).result()


def adapt(service: str, fn: Callable[..., Any], threads: Callable[[], Executor]) -> Handler:
    """The handler as one shape, `async (ctx) -> result` (see Worker.handler); a
    plain `def` runs on the executor `threads()` returns, with a SyncJobContext."""
    arity, is_async = handler_shape(service, fn)

    async def run_in_thread(ctx: JobContext) -> Result:
        loop = asyncio.get_running_loop()
        sync_ctx = SyncJobContext(ctx, loop)
        args = (ctx.job, sync_ctx) if arity == 2 else (sync_ctx,)
        # In a copy of this task's context: the handler's OpenTelemetry span
        # (and log context) is current in the thread too.
        result = await loop.run_in_executor(
            threads(), functools.partial(contextvars.copy_context().run, fn, *args)
        )
        if inspect.isawaitable(result):
            if inspect.iscoroutine(result):
                result.close()
            raise NonRetryableError(
                f"the handler of {service!r} is a plain def that returned an awaitable; "
                "declare it `async def`",
                code="HANDLER_SHAPE",
            )
        return result  # type: ignore[no-any-return]

    if not is_async:
        return run_in_thread
    if arity == 2:

        async def both(ctx: JobContext) -> Result:
            return await fn(ctx.job, ctx)  # type: ignore[no-any-return]

        return both
    return fn


def handler_shape(service: str, fn: object) -> tuple[int, bool]:
    """How a handler is called: (1 for (ctx), 2 for (job, ctx); whether it is
    async). A TypeError naming the service for anything else."""
    where = f"the handler of {service!r}"
    if not callable(fn):
        raise TypeError(f"{where} must be a function, got {type(fn).__name__}")
    # A callable object: what decides its shape is its __call__.
    call = fn if inspect.isroutine(fn) or isinstance(fn, functools.partial) else type(fn).__call__
    if inspect.isgeneratorfunction(call) or inspect.isasyncgenfunction(call):
        raise TypeError(
            f"{where} is a generator; it must return its result (a mapping or None), not yield"
        )
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{where} has no signature to check: {exc}") from None
    params = signature.parameters.values()
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    arity = 2 if len(positional) >= 2 else 1
    try:
        signature.bind(*([None] * arity))
    except TypeError as exc:
        bare = signature.replace(
            parameters=[p.replace(annotation=p.empty) for p in params],
            return_annotation=signature.empty,
        )
        raise TypeError(
            f"{where} must take (ctx) or (job, ctx), but its signature is {bare} ({exc})"
        ) from None
    is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)
    return arity, is_async
