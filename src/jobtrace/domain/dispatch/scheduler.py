"""The Scheduler: one object the worker service talks to, made of the dispatch parts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from jobtrace.clock import now_us
from jobtrace.domain.dispatch.placement import Placement
from jobtrace.domain.dispatch.reports import Reports
from jobtrace.domain.dispatch.sessions import Drained, Hello, Welcome, WorkerSession, check_hello
from jobtrace.domain.dispatch.supervisor import Supervisor
from jobtrace.domain.errors import FailedPrecondition
from jobtrace.ids import new_id

log = logging.getLogger(__name__)


class Scheduler(Placement, Supervisor, Reports):
    """Dispatches eligible jobs to connected workers and supervises leases."""

    # --- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        # Job changes wake the dispatcher and reach the workers holding them.
        self._jobs.add_listener(self._on_jobs_changed)
        self._tasks = [
            asyncio.create_task(self._dispatch_loop(), name="jobtrace-dispatch"),
            asyncio.create_task(self._supervise_loop(), name="jobtrace-supervise"),
        ]

    async def drain(self, grace_ms: int) -> None:
        """Shutdown: tell every worker, end their streams, keep their leases."""
        self._draining = True
        for session in list(self.sessions.values()):
            session.send(Drained("server shutting down", grace_ms))
            session.close("server shutting down")
        # Leases waiting for their worker are kept too: after a restart they
        # expire, unless the worker resumes them.
        for task in [*self._tasks, *self._give_backs]:
            task.cancel()
        for task in [*self._tasks, *self._give_backs]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    # --- sessions ----------------------------------------------------------

    async def open_session(self, hello: Hello) -> tuple[WorkerSession, Welcome]:
        check_hello(hello)
        if self._draining:
            raise FailedPrecondition("server is shutting down", reason="DRAINING")

        running = dict(hello.running)
        session = WorkerSession(
            identity=hello.identity,
            session_id=new_id("ses"),
            services=frozenset(hello.services),
            max_concurrency=hello.max_concurrency or 1,
            affinity_keys=frozenset(hello.affinity_keys),
            labels=dict(hello.labels),
            tenants=hello.allowed_tenants,
            reviewer=hello.reviewer,
            accepts_batches=hello.accepts_batches,
            version=hello.version,
            last_heartbeat_us=now_us(),
            # The claimed jobs take their slots while their leases are checked.
            held=dict(running),
        )
        # The new stream takes over before anything is awaited: once the old
        # one is closed, its end must find it replaced and keep the leases this
        # hello resumes (a proxy may keep a dead stream open meanwhile).
        # Only the same tenant, subject and worker id is the same worker.
        previous = self.sessions.get(session.holder)
        self.sessions[session.holder] = session
        if previous is not None:
            previous.close("replaced by a new session of the same worker")
        try:
            resumed, revoked = await self._resume(session, running)
        except BaseException:
            session.close("hello failed")
            await self.close_session(session, lost=True)
            raise
        # An older stream's leases that this hello did not resume are not
        # running anywhere: they need not wait out its grace.
        session.resumed = True
        self._sessions_changed()
        self.wake()
        log.info(
            "worker connected",
            extra={
                "worker_id": session.worker_id,
                "session_id": session.session_id,
                "services": sorted(session.services),
                "max_concurrency": session.max_concurrency,
                "resumed": len(resumed),
            },
        )
        welcome = Welcome(session.session_id, self.heartbeat_ms, self.lease_ms, resumed, revoked)
        return session, welcome

    # --- introspection -------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The connected sessions by session id."""
        return {
            s.session_id: {"worker_id": s.worker_id, "held": dict(s.held), "max": s.max_concurrency}
            for s in self.sessions.values()
        }
