"""WorkerService.Connect: the bidirectional worker stream."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections import deque
from collections.abc import AsyncIterator
from contextlib import aclosing
from functools import partial
from typing import Any

import grpc

from jobtrace.api import convert
from jobtrace.api.credentials import CredentialWatch, guarded
from jobtrace.api.errors import rpc, to_status
from jobtrace.api.handlers import MalformedRequest
from jobtrace.api.limits import StreamLimiter
from jobtrace.api.wellformed import check_request
from jobtrace.auth import Authenticator, Role
from jobtrace.domain import dispatch
from jobtrace.domain import errors as domain_errors
from jobtrace.domain.dispatch.fleet import Fleet
from jobtrace.domain.errors import (
    DomainError,
    FailedPrecondition,
    FieldViolation,
    Invalid,
    log_failure,
)
from jobtrace.domain.worker_identity import WorkerIdentity
from jobtrace.model import Failure
from jobtrace.pb import worker_service_pb2 as pb
from jobtrace.pb import worker_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 30.0
# Reports of one stream handled at once; more wait (backpressure on the worker).
MAX_IN_FLIGHT = 256


class WorkerServicer(pb_grpc.WorkerServiceServicer):
    def __init__(
        self,
        scheduler: dispatch.Scheduler,
        auth: Authenticator,
        streams: StreamLimiter,
        fleet: Fleet,
        *,
        traced: bool = False,
    ) -> None:
        self._scheduler = scheduler
        # OTLP on: assignments carry the attempt span's context (see convert).
        self._traced = traced
        self._auth = auth
        self._streams = streams
        self._fleet = fleet

    async def Connect(
        self, request_iterator: AsyncIterator[pb.ConnectRequest], context: Any
    ) -> AsyncIterator[pb.ConnectResponse]:
        try:
            principal = self._auth.require(context, Role.WORKER)
            hold = self._streams.hold(principal)
            hold.__enter__()
        except DomainError as exc:
            await context.abort_with_status(to_status(exc))
            return
        watch = CredentialWatch(self._auth, context, principal)
        try:
            async for message in self._session(request_iterator, context, principal, watch):
                yield message
        finally:
            await watch.stop()
            hold.__exit__(None, None, None)
        if watch.lapsed is not None:
            # The session ended like a lost stream (its leases handled as such).
            await context.abort_with_status(to_status(watch.lapsed))

    @rpc
    async def GetStepResult(
        self, request: pb.GetStepResultRequest, context: Any
    ) -> pb.GetStepResultResponse:
        principal = self._auth.require(context, Role.WORKER)
        identity = WorkerIdentity(
            principal.tenant, principal.subject, request.worker_id, principal.authenticated
        )
        result = await self._scheduler.step_result(
            identity,
            None if principal.is_admin else principal.allowed_tenants,
            request.job_id,
            request.attempt,
            request.step_name,
        )
        struct, exact = convert.json_forms(result, convert.wants_exact_json(context))
        return pb.GetStepResultResponse(result=struct, result_json=exact)

    @rpc
    async def ListWorkers(
        self, request: pb.ListWorkersRequest, context: Any
    ) -> pb.ListWorkersResponse:
        principal = self._auth.require(context, Role.READER)
        workers, token = await self._fleet.list_workers(
            principal.read_scope,
            convert.worker_filter(request.filter),
            request.page_size,
            request.page_token,
        )
        return pb.ListWorkersResponse(
            workers=[convert.worker_to_proto(w) for w in workers], next_page_token=token
        )

    @rpc
    async def WatchWorkers(
        self, request: pb.WatchWorkersRequest, context: Any
    ) -> AsyncIterator[pb.WatchWorkersResponse]:
        principal = self._auth.require(context, Role.READER)
        watch = self._fleet.watch(principal.read_scope, convert.worker_filter(request.filter))
        with self._streams.hold(principal):
            async with aclosing(guarded(self._auth, context, principal, watch)) as items:
                async for item in items:
                    yield convert.watch_item_to_proto(item)

    async def _session(
        self,
        request_iterator: AsyncIterator[pb.ConnectRequest],
        context: Any,
        principal: Any,
        watch: CredentialWatch,
    ) -> AsyncIterator[pb.ConnectResponse]:
        try:
            async with asyncio.timeout(HELLO_TIMEOUT_S):
                first = await anext(request_iterator)
        except (StopAsyncIteration, TimeoutError):
            return
        if first.WhichOneof("kind") != "hello":
            error = FailedPrecondition("the first message must be hello", reason="HELLO_REQUIRED")
            yield convert.outgoing_to_proto(refused(first, error, fatal=True))
            return
        hello = convert.hello_from_proto(first.hello, principal)
        try:
            check_request(first)
            session, welcome = await self._scheduler.open_session(hello)
        except DomainError as exc:
            yield convert.outgoing_to_proto(refused(first, exc, fatal=True))
            return
        except Exception as exc:
            yield convert.outgoing_to_proto(unexpected(hello.worker_id, first, exc, fatal=True))
            return
        watch.start(lambda error: session.close(f"credentials lapsed: {error.message}"))
        exact = convert.wants_exact_json(context)
        yield convert.outgoing_to_proto(welcome)
        reader = asyncio.create_task(self._read(request_iterator, session))
        lost = True
        try:
            while True:
                message = await session.next_outgoing()
                if message is None or watch.check() is not None:
                    break  # nothing is sent once the credentials have lapsed
                yield convert.outgoing_to_proto(message, exact, self._traced)
            lost = not self._scheduler_draining(session)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            await self._scheduler.close_session(session, lost=lost)

    def _scheduler_draining(self, session: dispatch.WorkerSession) -> bool:
        return session.close_reason == "server shutting down"

    async def _read(
        self, request_iterator: AsyncIterator[pb.ConnectRequest], session: dispatch.WorkerSession
    ) -> None:
        """Reports about different jobs are handled concurrently (so one stream
        fills a group commit); reports about the same job keep their order: one
        task per job takes them from that job's queue one after the other."""
        queues: dict[str, _KeyQueue] = {}
        runners: set[asyncio.Task[None]] = set()
        slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        try:
            async for received in request_iterator:
                if session.closed:
                    break
                items: list[Any] = (
                    self._batch_items(session, received)
                    if received.WhichOneof("kind") == "batch"
                    else [received]
                )
                for message in items:
                    await slots.acquire()
                    self._enqueue(session, message, queues, runners, slots)
            # Half-closed: what was received is still handled (and acknowledged).
            if runners:
                await asyncio.wait(list(runners), timeout=30)
        except (asyncio.CancelledError, grpc.RpcError):
            raise
        except BaseException:
            log.exception("worker %s: reading the stream failed", session.worker_id)
            raise
        else:
            log.debug("worker %s half-closed its stream", session.worker_id)
        finally:
            for runner in list(runners):
                runner.cancel()
            # The worker half-closed or went away: end the session.
            session.close(session.close_reason or "worker closed the stream")

    def _batch_items(
        self, session: dispatch.WorkerSession, message: pb.ConnectRequest
    ) -> list[_Item]:
        """A batch's reports, each to be handled like a report of its own (in
        order per job) and answered in the batch's one Acks; a malformed batch
        (empty, too long, a message id twice) is refused whole."""
        reports = message.batch.reports
        problem = ""
        if not reports:
            problem = f"batch.reports: required: 1 to {dispatch.MAX_BATCH_REPORTS} reports"
        elif len(reports) > dispatch.MAX_BATCH_REPORTS:
            problem = (
                f"batch.reports: at most {dispatch.MAX_BATCH_REPORTS} reports per batch "
                f"(got {len(reports)})"
            )
        else:
            seen: set[int] = set()
            for i, report in enumerate(reports):
                if report.message_id in seen:
                    problem = (
                        f"batch.reports[{i}].message_id: {report.message_id} "
                        "is used twice in the batch"
                    )
                    break
                seen.add(report.message_id)
        if problem:
            error = Invalid(
                [FieldViolation(problem.split(":", 1)[0], problem.split(": ", 1)[1])],
                message=f"malformed batch: {problem}",
            )
            session.send(refused(message, error))
            return []
        answer = _BatchAnswer(session, len(reports))
        items = []
        for i, report in enumerate(reports):
            kind = report.WhichOneof("kind")
            body = getattr(report, kind) if kind else None
            items.append(_Item(kind or "", body, report.message_id, answer, i))
        return items

    def _enqueue(
        self,
        session: dispatch.WorkerSession,
        message: Any,
        queues: dict[str, _KeyQueue],
        runners: set[asyncio.Task[None]],
        slots: asyncio.Semaphore,
    ) -> None:
        """Queue one message (or batched report) behind those of its job."""
        key = _order_key(message)
        waiting = queues.get(key)
        if waiting is not None:  # its runner takes it after the earlier ones
            waiting.messages.append(message)
            waiting.arrived.set()
            return
        queues[key] = _KeyQueue(message)
        runner = asyncio.create_task(self._run_queue(session, key, queues, slots))
        runners.add(runner)
        runner.add_done_callback(runners.discard)

    async def _run_queue(
        self,
        session: dispatch.WorkerSession,
        key: str,
        queues: dict[str, _KeyQueue],
        slots: asyncio.Semaphore,
    ) -> None:
        """Handle one key's messages in order until its queue is empty and they
        are all answered; a message arriving after that starts a new runner
        (nothing awaits in between).

        A message's write is queued before the next message of the key is
        handled, but the next one does not wait for that write's commit:
        writes run in queue order, so a job's progress reports and its
        completion, sent back to back, share a group commit and still apply
        (and are acknowledged) in order."""
        waiting = queues[key]
        handling: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        try:
            while True:
                while waiting.messages:
                    message = waiting.messages.popleft()
                    queued: asyncio.Future[None] = loop.create_future()
                    context = contextvars.copy_context()
                    context.run(dispatch.REPORT_QUEUED.set, queued)
                    task = loop.create_task(self._process_one(session, message), context=context)
                    handling.add(task)
                    task.add_done_callback(handling.discard)
                    task.add_done_callback(lambda _t: slots.release())
                    # Until its write is queued (or it is answered without one):
                    # a callback, not asyncio.wait (its waiter and callbacks on
                    # both, per message).
                    task.add_done_callback(partial(_settle, queued))
                    await queued
                if not handling:
                    break
                # Wait for an answer, or for the next message of the key.
                waiting.arrived.clear()
                arrival = loop.create_task(waiting.arrived.wait())
                try:
                    await asyncio.wait((*handling, arrival), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    arrival.cancel()
        finally:
            for task in handling:
                task.cancel()
            if queues.get(key) is waiting:
                del queues[key]

    async def _process_one(
        self, session: dispatch.WorkerSession, message: pb.ConnectRequest
    ) -> None:
        try:
            await self._process(session, message)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the stream is ending
            log.warning("worker %s: handling a message was cancelled", session.worker_id)
        except Exception:  # not answered; the job's later messages still are
            log.exception("worker %s: handling a message failed", session.worker_id)

    async def _process(self, session: dispatch.WorkerSession, message: Any) -> None:
        if isinstance(message, _Item):
            await self._process_item(session, message)
            return
        try:
            check_request(message)
            reply = await self._handle(session, message)
        except DomainError as exc:
            reply = refused(message, exc)
        except Exception as exc:  # a fault of ours: answered, logged, stream kept
            reply = unexpected(session.worker_id, message, exc)
        if reply is not None:
            await session.send_reply(reply)

    async def _process_item(self, session: dispatch.WorkerSession, item: _Item) -> None:
        """One report of a batch: handled as if sent alone, answered in the batch's Acks."""
        reply: dispatch.Acked | dispatch.Refused
        try:
            if item.body is None:
                raise Invalid(
                    [FieldViolation(f"batch.reports[{item.index}]", "set one of the report kinds")],
                    message=f"batch.reports[{item.index}]: empty report",
                )
            check_request(item.body)
            reply = await self._report(session, item.kind, item.body, item.message_id)
        except DomainError as exc:
            reply = item.refused(exc)
        except Exception as exc:  # a fault of ours: answered, logged, stream kept
            log_failure(
                log,
                exc,
                "worker %s: handling a batched %s failed",
                session.worker_id,
                item.kind or "report",
                extra={"worker_id": session.worker_id, "message_kind": item.kind},
            )
            reply = item.refused(domain_errors.unexpected(exc))
        await item.answer.put(item.index, reply)

    async def _handle(self, session: dispatch.WorkerSession, m: pb.ConnectRequest) -> Any:
        kind = m.WhichOneof("kind")
        s = self._scheduler
        if kind == "heartbeat":
            hb = m.heartbeat
            running = tuple((r.job_id, r.attempt) for r in hb.running)
            labels = dict(hb.labels.labels) if hb.HasField("labels") else None
            return await s.heartbeat(
                session, m.message_id, tuple(hb.affinity_keys), hb.draining, running, labels
            )
        if kind in _REPORTS:
            return await self._report(session, kind, getattr(m, kind), m.message_id)
        if kind == "hello":
            raise FailedPrecondition(
                "hello was already sent on this stream", reason="DUPLICATE_HELLO"
            )
        if isinstance(m, MalformedRequest):
            raise Invalid([], message=f"malformed message: {m.reason}")
        raise Invalid([], message="empty message: set one of the ConnectRequest kinds")

    async def _report(
        self, session: dispatch.WorkerSession, kind: str, body: Any, message_id: int
    ) -> dispatch.Acked:
        """Handle one report (alone or from a batch); its ack once handled."""
        s = self._scheduler
        if kind == "progress":
            p = body
            await s.progress(session, p.job_id, p.attempt, p.percent, p.message)
            return dispatch.Acked(message_id, p.job_id, p.attempt)
        if kind == "complete":
            c = body
            result, size = convert.exact_object(
                "complete.result_json", c.result_json, c.result, c.HasField("result")
            )
            summary = (
                convert.struct_to_dict(c.output_summary) if c.HasField("output_summary") else None
            )
            await s.complete(
                session, c.job_id, c.attempt, result, size, summary, c.output_summary.ByteSize()
            )
            return dispatch.Acked(message_id, c.job_id, c.attempt)
        if kind == "fail":
            f = body
            failure = Failure(
                reason=f.error.message,
                code=f.error.code,
                details=f.error.details or f.error.stack,
                retryable=f.retryable,
                attempt=f.attempt,
            )
            await s.fail(session, f.job_id, f.attempt, failure, f.retryable)
            return dispatch.Acked(message_id, f.job_id, f.attempt)
        if kind == "trace":
            t = body
            inputs = [convert.event_input_from_proto(e) for e in t.events]
            await s.trace_report(session, t.job_id, t.attempt, inputs)
            return dispatch.Acked(message_id, t.job_id, t.attempt)
        if kind == "annotate":
            a = body
            actor = a.actor if a.HasField("actor") else _worker_actor(session.worker_id)
            item, size = convert.annotation_input(
                actor, a.attributes, a.payload, a.HasField("payload")
            )
            await s.annotate(session, a.job_id, a.attempt, item, size)
            return dispatch.Acked(message_id, a.job_id, a.attempt)
        raise Invalid([], message=f"unknown report kind {kind!r}")


_REPORTS = frozenset({"progress", "trace", "annotate", "complete", "fail"})


class _BatchAnswer:
    """Collects the answers to a batch's reports; the last one sends the Acks."""

    __slots__ = ("left", "replies", "session")

    def __init__(self, session: dispatch.WorkerSession, size: int) -> None:
        self.session = session
        self.replies: list[dispatch.Acked | dispatch.Refused | None] = [None] * size
        self.left = size

    async def put(self, index: int, reply: dispatch.Acked | dispatch.Refused) -> None:
        self.replies[index] = reply
        self.left -= 1
        if self.left == 0:
            acked = [r for r in self.replies if isinstance(r, dispatch.Acked)]
            failed = [r for r in self.replies if isinstance(r, dispatch.Refused)]
            await self.session.send_reply(dispatch.BatchAnswer(acked, failed))


class _Item:
    """One report of a batch, queued like a message of its own."""

    __slots__ = ("answer", "body", "index", "kind", "message_id")

    def __init__(
        self, kind: str, body: Any, message_id: int, answer: _BatchAnswer, index: int
    ) -> None:
        self.kind = kind
        self.body = body
        self.message_id = message_id
        self.answer = answer
        self.index = index

    def refused(self, exc: DomainError) -> dispatch.Refused:
        job_id = getattr(self.body, "job_id", "")
        attempt = getattr(self.body, "attempt", 0)
        return dispatch.Refused(self.message_id, self.kind, job_id, attempt, exc)


class _KeyQueue:
    """The messages of one order key waiting for their runner."""

    __slots__ = ("arrived", "messages")

    def __init__(self, first: pb.ConnectRequest) -> None:
        self.messages: deque[pb.ConnectRequest] = deque((first,))
        self.arrived = asyncio.Event()


def _order_key(message: Any) -> str:
    """Messages with the same key are handled in arrival order."""
    if isinstance(message, _Item):
        return getattr(message.body, "job_id", "") or message.kind
    kind = message.WhichOneof("kind") or ""
    job_id = getattr(getattr(message, kind, None), "job_id", "") if kind else ""
    return job_id or kind


def _worker_actor(worker_id: str) -> Any:
    from jobtrace.pb import common_pb2

    return common_pb2.Actor(kind=common_pb2.ACTOR_KIND_WORKER, id=worker_id)


def unexpected(
    worker_id: str, message: pb.ConnectRequest, exc: Exception, fatal: bool = False
) -> dispatch.Refused:
    """The answer to a message whose handling failed for a reason of the server's
    (see api.errors.unexpected). The worker is never left waiting."""
    kind = message.WhichOneof("kind") or ""
    log_failure(
        log,
        exc,
        "worker %s: handling %s failed",
        worker_id,
        kind or "a message",
        extra={"worker_id": worker_id, "message_kind": kind},
    )
    return refused(message, domain_errors.unexpected(exc), fatal)


def refused(message: pb.ConnectRequest, exc: DomainError, fatal: bool = False) -> dispatch.Refused:
    kind = message.WhichOneof("kind") or ""
    body = getattr(message, kind) if kind else None
    job_id = getattr(body, "job_id", "")
    attempt = getattr(body, "attempt", 0)
    return dispatch.Refused(message.message_id, kind, job_id, attempt, exc, fatal)


def _settle(queued: asyncio.Future[None], _task: asyncio.Task[None]) -> None:
    """A message's task ended before its write was queued (it had none, or
    was refused first): its runner goes on."""
    if not queued.done():
        queued.set_result(None)
