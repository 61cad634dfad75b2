"""In-process fan-out of committed job changes to watchers, keyed by job and
workflow id, and to the live feeds of a tenant's runs (WatchRuns)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

from jobtrace.ids import run_kind
from jobtrace.model import Job

WATCH_BUFFER = 256
# Changes a feed of runs may have waiting (local jobs plus other replicas' ids).
RUNS_BUFFER = 1024


class Subscription:
    """A bounded queue of changes for one watcher. On overflow the queue is
    dropped and `overflowed` set: the watcher re-reads the database, so it may
    coalesce changes but never misses the latest state."""

    def __init__(self, maxsize: int = WATCH_BUFFER) -> None:
        self.queue: asyncio.Queue[Job] = asyncio.Queue(maxsize)
        self.overflowed = False
        self.wakeup = asyncio.Event()

    def push(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            self.overflowed = True
            while not self.queue.empty():
                self.queue.get_nowait()
        self.wakeup.set()

    def drain(self) -> tuple[list[Job], bool]:
        items: list[Job] = []
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        overflowed, self.overflowed = self.overflowed, False
        self.wakeup.clear()
        return items, overflowed


class RunsSubscription:
    """Every change of one tenant's runs (every tenant's: None) for one feed,
    bounded: this replica's as committed jobs, other replicas' as ids to read
    again. A feed cannot re-read a tenant's whole history, so past
    RUNS_BUFFER waiting changes it keeps nothing more and is `overflowed`
    (its stream ends); `lost` when other replicas' notices may have been lost."""

    def __init__(self, tenant: str | None, maxsize: int = RUNS_BUFFER) -> None:
        self.tenant = tenant
        self._maxsize = maxsize
        self._jobs: list[Job] = []
        # job id -> its workflow id ("" for a standalone job), oldest first.
        self._remote: dict[str, str] = {}
        self.overflowed = False
        self.lost = False
        self.wakeup = asyncio.Event()

    def push(self, jobs: list[Job]) -> None:
        mine = [j for j in jobs if self.tenant is None or j.tenant == self.tenant]
        if mine and not self.overflowed:
            self._jobs.extend(mine)
            self._check()
            self.wakeup.set()

    def poke(self, job_id: str, workflow_id: str) -> None:
        if not self.overflowed:
            self._remote[job_id] = workflow_id
            self._check()
            self.wakeup.set()

    def lose(self) -> None:
        self.lost = True
        self.wakeup.set()

    def _check(self) -> None:
        if len(self._jobs) + len(self._remote) > self._maxsize:
            self.overflowed = True
            self._jobs.clear()
            self._remote.clear()

    def take(self) -> tuple[list[Job], dict[str, str]]:
        """(this replica's changed jobs in commit order, other replicas' changed
        job ids -> workflow id); empties the subscription."""
        jobs, remote = self._jobs, self._remote
        self._jobs, self._remote = [], {}
        self.wakeup.clear()
        return jobs, remote


class JobFeed:
    """Subscribers register before reading their snapshot, so no change
    committed after the snapshot can be missed."""

    def __init__(self) -> None:
        self._subs: defaultdict[str, set[Subscription]] = defaultdict(set)
        self._runs: set[RunsSubscription] = set()

    @contextmanager
    def subscribe(self, key: str) -> Iterator[Subscription]:
        sub = Subscription()
        self._subs[key].add(sub)
        try:
            yield sub
        finally:
            subs = self._subs.get(key)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[key]

    @contextmanager
    def subscribe_runs(self, tenant: str | None) -> Iterator[RunsSubscription]:
        """Every run change of `tenant` (of every tenant: None)."""
        sub = RunsSubscription(tenant)
        self._runs.add(sub)
        try:
            yield sub
        finally:
            self._runs.discard(sub)

    def publish(self, jobs: list[Job]) -> None:
        for runs in self._runs:
            runs.push(jobs)
        for job in jobs:
            for key in (job.id, job.workflow_id):
                for sub in self._subs.get(key, ()) if key else ():
                    sub.push(job)

    def poke(self, *keys: str) -> None:
        """Another replica changed these jobs or workflows: watchers re-read them."""
        for key in keys:
            for sub in self._subs.get(key, ()) if key else ():
                sub.overflowed = True
                sub.wakeup.set()

    def remote_change(self, job_id: str, workflow_id: str) -> None:
        """Another replica changed this job (and so maybe its workflow)."""
        self.poke(job_id, workflow_id)
        for runs in self._runs:
            runs.poke(job_id, workflow_id)

    def poke_all(self) -> None:
        """Notices may have been lost: every watcher re-reads the database;
        feeds of runs, which cannot, are told so."""
        self.poke(*self._subs)
        for runs in self._runs:
            runs.lose()

    @property
    def subscriber_count(self) -> int:
        return sum(len(s) for s in self._subs.values()) + len(self._runs)

    @property
    def runs_subscriber_count(self) -> int:
        return len(self._runs)

    def subscribers_by_kind(self) -> dict[str, int]:
        """Watchers of jobs ("job") and of workflows ("workflow")."""
        counts = {"job": 0, "workflow": 0}
        for key, subs in self._subs.items():
            kind = run_kind(key)
            if kind:
                counts[kind] += len(subs)
        return counts
