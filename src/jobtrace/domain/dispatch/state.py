"""What the scheduler's parts share: storage, the connected sessions, and the wake-ups."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import TYPE_CHECKING

from jobtrace.domain import lifecycle
from jobtrace.domain.dispatch.sessions import WorkerSession
from jobtrace.domain.jobs import Jobs
from jobtrace.model import LabelRequirement, WaitingReason
from jobtrace.store.db import Database

if TYPE_CHECKING:
    from jobtrace.domain.dispatch.placement import _Claim


class SchedulerState:
    """Storage, settings, connected sessions and the events the loops wait on."""

    def __init__(
        self,
        db: Database,
        jobs: Jobs,
        life: lifecycle.Lifecycle,
        *,
        lease_ms: int,
        heartbeat_ms: int,
        reconnect_grace_ms: int | None = None,
    ) -> None:
        self._db = db
        self._jobs = jobs
        self._life = life
        self.lease_ms = lease_ms
        self.heartbeat_ms = heartbeat_ms
        # How long a lost stream's leases wait for the worker to come back:
        # one heartbeat interval unless told, never beyond the lease.
        grace = heartbeat_ms if reconnect_grace_ms is None else reconnect_grace_ms
        self.reconnect_grace_ms = max(0, min(grace, lease_ms))
        # Connected sessions by holder (WorkerIdentity.holder).
        self.sessions: dict[str, WorkerSession] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._draining = False
        # Lost sessions' leases waiting for their worker or their grace.
        self._give_backs: set[asyncio.Task[None]] = set()
        # Set (and replaced) each time a session has resumed its leases or ended.
        self._session_changes = asyncio.Event()
        # Claims that may be stored although their worker was not told (their
        # commit went unanswered, or their stream ended as they committed), by
        # job id: settled (see _settle_claims) before anything else is dispatched.
        self._unsettled: dict[str, _Claim] = {}
        # Leases lost (deadline passed or stream ended), by service (metrics).
        self.lease_expiries: Counter[str] = Counter()
        # What the last dispatch read found the queue to be: every eligible job
        # of these (service, tenants) was claimed, and the next waiting one is
        # due then (None: none waits). Forgotten at every wake but a freed slot.
        # (The reads are keyed by service, tenants and placement classes skipped.)
        self._queue_seen: (
            tuple[frozenset[tuple[str, frozenset[str] | None, frozenset[str]]], int | None] | None
        ) = None
        self._wakes = 0
        # The classes of required labels of the jobs the dispatcher has read
        # (store codec.placement_class -> the required labels): a read skips
        # those its workers do not meet. The version changes with the set.
        self._placement_classes: dict[str, tuple[LabelRequirement, ...]] = {}
        self._classes_version = 0
        # The paused queues (service -> tenants) as last read, and whether
        # they must be read again before the next dispatch read (a pause or
        # resume here or on another replica, a lost LISTEN connection, an
        # idle dispatcher's look-again). Stale, they cost a refused claim:
        # the claim checks queue_pauses itself (see domain.pause).
        self.paused_queues: dict[str, frozenset[str]] = {}
        self._paused_stale = True
        # Flow control (domain.flow): the buckets and concurrency keys a claim
        # here found blocked (flow key -> until when (us), why). The dispatch
        # read skips their jobs until then (a bucket: when it holds a token
        # again; a full key: until one of its jobs ends, seen here, or at most
        # flow.FULL_RETRY_US); empty while no flow-controlled job waits.
        self.flow_blocked: dict[str, tuple[int, WaitingReason]] = {}
        # Services whose last claim found a flow key blocked: their next read
        # asks for this many rows at most (what the claim could start, and
        # 2 more), not a page per free slot: the rows past the tokens would
        # only be read to be skipped. A read that fills the cap looks again.
        self.flow_read_cap: dict[str, int] = {}

    def wake(self, *, slot_freed: bool = False) -> None:
        """Wake the dispatcher. Only `slot_freed` (a worker's slot came free,
        nothing else changed) lets it trust its last look at the queue, when
        that found every eligible job it could see (see Placement)."""
        if not slot_freed:
            self._queue_seen = None
            self._wakes += 1
        self._wake.set()

    def queues_changed(self) -> None:
        """A queue was paused or resumed (here or elsewhere): read them again."""
        self._paused_stale = True
        self.wake()

    @property
    def session_changes(self) -> asyncio.Event:
        """Set (and replaced) each time a session has opened or ended."""
        return self._session_changes

    def _sessions_changed(self) -> None:
        """Wake whoever waits for a worker to come back (see _worker_back_or_gone)."""
        self._session_changes.set()
        self._session_changes = asyncio.Event()
