"""In-process fan-out of committed job changes to watchers, keyed by job and workflow id."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

from jobtrace.ids import run_kind
from jobtrace.model import Job

WATCH_BUFFER = 256


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


class JobFeed:
    """Subscribers register before reading their snapshot, so no change
    committed after the snapshot can be missed."""

    def __init__(self) -> None:
        self._subs: defaultdict[str, set[Subscription]] = defaultdict(set)

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

    def publish(self, jobs: list[Job]) -> None:
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

    def poke_all(self) -> None:
        """Notices may have been lost: every watcher re-reads the database."""
        self.poke(*self._subs)

    @property
    def subscriber_count(self) -> int:
        return sum(len(s) for s in self._subs.values())

    def subscribers_by_kind(self) -> dict[str, int]:
        """Watchers of jobs ("job") and of workflows ("workflow")."""
        counts = {"job": 0, "workflow": 0}
        for key, subs in self._subs.items():
            kind = run_kind(key)
            if kind:
                counts[kind] += len(subs)
        return counts
