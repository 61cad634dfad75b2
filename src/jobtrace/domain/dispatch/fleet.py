"""The fleet registry: this replica's worker sessions written to the database,
and the whole fleet listed and watched from it."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncSession

from jobtrace.clock import now_us
from jobtrace.domain.dispatch.sessions import HeldJobs, WorkerSession
from jobtrace.domain.errors import Unavailable, Violations, log_failure
from jobtrace.domain.jobs import Jobs
from jobtrace.domain.pagination import PageTokens, position
from jobtrace.domain.validation import SERVICE_RE, check_id, check_labels, check_page_size
from jobtrace.events.workers import WorkerFeed
from jobtrace.model import Job, RunState
from jobtrace.store import fleet as store
from jobtrace.store.db import Database, Tx
from jobtrace.store.fleet import HeldAttempt, WorkerRecord

if TYPE_CHECKING:
    from jobtrace.domain.dispatch.scheduler import Scheduler

log = logging.getLogger(__name__)

# Rows read per query while a page or a snapshot is filled.
READ_CHUNK = 500
# Session ids per notice (a NOTIFY payload is under 8000 bytes).
SESSIONS_PER_NOTICE = 100
# How long a clean stop waits to take this replica's rows out.
STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class WorkerFilter:
    """Which workers to list or watch; every part set must match."""

    service: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    draining: bool | None = None
    holding_job: str = ""

    def check(self, v: Violations, at: str = "filter") -> None:
        if self.service and not SERVICE_RE.fullmatch(self.service):
            v.add(f"{at}.service", "must be 1-128 characters of [A-Za-z0-9._:/-]")
        check_labels(v, f"{at}.labels", self.labels, free_keys=True)
        if self.holding_job:
            check_id(v, f"{at}.holding_job", self.holding_job)

    def matches(self, w: WorkerRecord) -> bool:
        return (
            (not self.service or self.service in w.services)
            and all(w.labels.get(k) == value for k, value in self.labels.items())
            and (self.draining is None or w.draining == self.draining)
            and (not self.holding_job or any(h.job_id == self.holding_job for h in w.held))
        )

    def as_token_scope(self) -> dict[str, object]:
        return {
            "service": self.service,
            "labels": dict(sorted(self.labels.items())),
            "draining": self.draining,
            "holding_job": self.holding_job,
        }


class Change(enum.IntEnum):
    """What happened to a worker (the numbers of the WorkerChangeType enum)."""

    PRESENT = 1
    CONNECTED = 2
    UPDATED = 3
    DISCONNECTED = 4
    EXPIRED = 5
    UNMATCHED = 6


@dataclass(frozen=True, slots=True)
class WatchItem:
    """One message of a WatchWorkers stream: a change, the snapshot's end
    (`snapshot_done`: how many workers it held), or a keepalive."""

    change: Change | None = None
    worker: WorkerRecord | None = None
    snapshot_done: int | None = None
    keepalive_us: int = 0


class Fleet:
    """Writes this replica's sessions to the registry (on connect and
    disconnect at once; their changes at most once per heartbeat interval, all
    sessions in one statement; each row refreshed before it expires), and
    answers for the whole fleet from it."""

    def __init__(
        self,
        db: Database,
        tokens: PageTokens,
        scheduler: Scheduler,
        jobs: Jobs,
        *,
        keepalive_s: float = 15.0,
    ) -> None:
        self._db = db
        self._jobs = jobs
        self._tokens = tokens
        self._scheduler = scheduler
        self.keepalive_s = keepalive_s
        self.replica = db.replica_id
        self.feed = WorkerFeed()
        self.stopping = asyncio.Event()
        self._lease_us = scheduler.lease_ms * 1000
        # Changes are written at most this often (connects and disconnects at once).
        self.tick_s = max(0.05, scheduler.heartbeat_ms / 1000)
        # What the registry holds for each local session (as last written).
        self._written: dict[str, WorkerRecord] = {}
        self._refresh_by_us = 0  # rewrite every row before then
        self._next_sweep_us = 0
        # Services of the jobs local sessions hold (claims commit here).
        self._services: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None

    # --- writing this replica's sessions -------------------------------------

    def start(self, replica: str) -> None:
        self.replica = replica
        self._jobs.add_listener(self._on_jobs_changed)
        self._task = asyncio.create_task(self._write_loop(), name="jobtrace-fleet")

    async def stop(self) -> None:
        """A clean stop: watchers end, and this replica's rows leave the
        registry (its workers reconnect elsewhere)."""
        self.stopping.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        ids = list(self._written)

        async def op(db: AsyncSession, tx: Tx) -> None:
            await store.delete_replica(db, self.replica)
            self._announce(tx, ids)

        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await self._db.write(op)
        except Exception as exc:  # they expire anyway
            log_failure(log, exc, "could not remove this replica's workers from the registry")
        self._written.clear()

    def _on_jobs_changed(self, jobs: list[Job]) -> None:
        for job in jobs:
            if job.state == RunState.RUNNING and job.lease_holder:
                self._services[job.id] = job.spec.service

    async def _write_loop(self) -> None:
        while True:
            changes = self._scheduler.session_changes
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.tick_s):
                    await changes.wait()
            try:
                await self.write_once()
            except Exception as exc:
                log_failure(log, exc, "writing the fleet registry failed; retrying")
                await asyncio.sleep(self.tick_s)

    def _record(self, s: WorkerSession, now: int) -> WorkerRecord:
        held = s.held
        since = held.since_us if isinstance(held, HeldJobs) else (lambda _j, _a: 0)
        only = next(iter(s.services)) if len(s.services) == 1 else ""
        return WorkerRecord(
            session_id=s.session_id,
            worker_id=s.worker_id,
            replica=self.replica,
            holder=s.holder,
            tenants=s.tenants,
            services=tuple(sorted(s.services)),
            labels=dict(s.labels),
            version=s.version,
            max_concurrency=s.max_concurrency,
            held=tuple(
                HeldAttempt(
                    job_id, attempt, since(job_id, attempt) or now, self._services.get(job_id, only)
                )
                for job_id, attempt in held.items()
            ),
            affinity_keys=tuple(sorted(s.affinity_keys)),
            draining=s.draining,
            connected_us=s.connected_us,
            completed=s.completed,
            failed=s.failed,
            lease_losses=s.lease_losses,
            last_heartbeat_us=s.last_heartbeat_us,
            expires_us=now + self._lease_us,
        )

    async def write_once(self) -> None:
        """Write what changed since the last write: new and changed sessions
        (every session when their rows are due for a refresh), ended ones;
        sweep rows whose replica died, once per lease."""
        now = now_us()
        current: dict[str, WorkerRecord] = {}
        for s in list(self._scheduler.sessions.values()):
            if not s.closed:
                current[s.session_id] = self._record(s, now)
        changed = [r for sid, r in current.items() if self._written.get(sid) != r]
        gone = [sid for sid in self._written if sid not in current]
        refresh = now >= self._refresh_by_us and bool(current)
        sweep = now >= self._next_sweep_us
        if not (changed or gone or refresh or sweep):
            return
        upsert = list(current.values()) if refresh else changed

        async def op(db: AsyncSession, tx: Tx) -> None:
            await store.upsert_workers(db, upsert)
            await store.delete_workers(db, gone)
            if sweep:
                # Expired a lease ago: no replica is refreshing them.
                await store.sweep_expired(db, now - self._lease_us)
            self._announce(tx, [r.session_id for r in changed] + gone)

        await self._db.write(op)
        for sid in gone:
            self._written.pop(sid, None)
        for r in upsert:
            self._written[r.session_id] = r
        if refresh:
            # Rewritten with half the lease left (and at least two ticks).
            self._refresh_by_us = now + max(self._lease_us // 2, 0)
            self._refresh_by_us = min(
                self._refresh_by_us, now + self._lease_us - int(2 * self.tick_s * 1e6)
            )
        if sweep:
            self._next_sweep_us = now + self._lease_us
        held = {job for s in self._scheduler.sessions.values() for job in s.held}
        if len(self._services) > 2 * len(held) + 64:
            self._services = {j: v for j, v in self._services.items() if j in held}

    def by_service(self) -> dict[str, tuple[int, int, int]]:
        """Per service, this replica's connected workers that run it, their free
        slots, and the jobs of that service they hold (metrics)."""
        out: dict[str, list[int]] = {}
        for s in self._scheduler.sessions.values():
            if s.closed:
                continue
            only = next(iter(s.services)) if len(s.services) == 1 else ""
            for service in s.services:
                counts = out.setdefault(service, [0, 0, 0])
                counts[0] += 1
                counts[1] += s.free_slots
            for job_id in s.held:
                service = self._services.get(job_id, only)
                if service:
                    out.setdefault(service, [0, 0, 0])[2] += 1
        return {service: (a, b, c) for service, (a, b, c) in out.items()}

    def _announce(self, tx: Tx, session_ids: list[str]) -> None:
        """Watchers here (after the commit) and on other replicas (a notice)."""
        if not session_ids:
            return
        for start in range(0, len(session_ids), SESSIONS_PER_NOTICE):
            tx.notify({"k": "workers", "s": session_ids[start : start + SESSIONS_PER_NOTICE]})
        tx.on_commit(lambda: self.feed.poke(session_ids))

    # --- reading the fleet ---------------------------------------------------

    async def list_workers(
        self, tenant: str | None, flt: WorkerFilter, page_size: int, page_token: str
    ) -> tuple[list[WorkerRecord], str]:
        """A page of the workers `tenant` (None: an admin) may see that match."""
        v = Violations()
        flt.check(v)
        size = check_page_size(v, "page_size", page_size)
        scope = flt.as_token_scope()
        start = position(self._tokens, v, "page_token", page_token, "workers", scope)
        v.raise_if_any()
        items: list[WorkerRecord] = []
        more = False
        now = now_us()
        after = start
        async with self._db.read() as db:
            while not more:
                rows = await store.live_workers(db, now, after, READ_CHUNK)
                for row in rows:
                    if row.visible_to(tenant) and flt.matches(row):
                        if len(items) == size:
                            more = True
                            break
                        items.append(row)
                if len(rows) < READ_CHUNK:
                    break
                after = rows[-1].seq
        token = self._tokens.encode("workers", scope, items[-1].seq) if more else ""
        return items, token

    async def _all(
        self, db: AsyncSession, tenant: str | None, flt: WorkerFilter
    ) -> list[WorkerRecord]:
        out: list[WorkerRecord] = []
        after, now = 0, now_us()
        while True:
            rows = await store.live_workers(db, now, after, READ_CHUNK)
            out += [r for r in rows if r.visible_to(tenant) and flt.matches(r)]
            if len(rows) < READ_CHUNK:
                return out
            after = rows[-1].seq

    async def watch(self, tenant: str | None, flt: WorkerFilter) -> AsyncIterator[WatchItem]:
        """The matching workers now, then each change. Subscribes before the
        snapshot is read, so nothing committed after it is missed; a session
        whose expiry passes is looked at again then (its replica may have died)."""
        v = Violations()
        flt.check(v)
        v.raise_if_any()
        with self.feed.subscribe() as sub:
            async with self._db.read() as db:
                known = {w.session_id: w for w in await self._all(db, tenant, flt)}
            for w in known.values():
                yield WatchItem(Change.PRESENT, w)
            yield WatchItem(snapshot_done=len(known))
            while True:
                now = now_us()
                next_expiry = min((w.expires_us for w in known.values()), default=None)
                wait = self.keepalive_s
                if next_expiry is not None:
                    wait = min(wait, max(0.0, (next_expiry - now) / 1e6) + 0.01)
                woke = await self._wait(sub.wakeup, wait)
                if self.stopping.is_set():
                    raise Unavailable("server shutting down; watch again", reason="SHUTTING_DOWN")
                changed, overflowed = sub.take()
                now = now_us()
                changed |= {sid for sid, w in known.items() if w.expires_us <= now}
                if not changed and not overflowed:
                    if not woke:
                        yield WatchItem(keepalive_us=now)
                    continue
                async with self._db.read() as db:
                    if overflowed:
                        rows = await self._all(db, tenant, flt)
                        changed = set(known) | {r.session_id for r in rows}
                    else:
                        rows = await store.workers_by_session(db, changed)
                for item in _diff(
                    known, {r.session_id: r for r in rows}, changed, tenant, flt, now
                ):
                    yield item

    async def _wait(self, wakeup: asyncio.Event, timeout: float) -> bool:
        """True when woken, False after `timeout` (or on stop)."""
        if wakeup.is_set():
            return True
        stop = asyncio.ensure_future(self.stopping.wait())
        woke = asyncio.ensure_future(wakeup.wait())
        try:
            done, _ = await asyncio.wait(
                {stop, woke}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stop.cancel()
            woke.cancel()
        return woke in done


def _diff(
    known: dict[str, WorkerRecord],
    rows: dict[str, WorkerRecord],
    changed: set[str],
    tenant: str | None,
    flt: WorkerFilter,
    now: int,
) -> list[WatchItem]:
    """The changes of these sessions from what the watcher knows to their rows
    (updating `known`)."""
    items: list[WatchItem] = []
    for sid in sorted(changed, key=lambda s: (rows[s].seq if s in rows else 0, s)):
        before, row = known.get(sid), rows.get(sid)
        if row is None or row.expires_us <= now:
            if before is not None:
                del known[sid]
                kind = Change.DISCONNECTED if row is None else Change.EXPIRED
                items.append(WatchItem(kind, before))
            continue
        if not (row.visible_to(tenant) and flt.matches(row)):
            if before is not None:
                del known[sid]
                items.append(WatchItem(Change.UNMATCHED, row))
            continue
        known[sid] = row
        if before is None:
            items.append(WatchItem(Change.CONNECTED, row))
        elif before != row:
            items.append(WatchItem(Change.UPDATED, row))
    return items
