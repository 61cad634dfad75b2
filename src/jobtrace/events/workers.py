"""In-process fan-out of fleet registry changes (session ids) to WatchWorkers streams."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

# Changed sessions a watcher may have pending before it re-reads the whole fleet.
WATCH_BUFFER = 1024


class WorkerSubscription:
    """The sessions changed since the watcher last looked, bounded: past
    WATCH_BUFFER they are dropped and `overflowed` set, and the watcher re-reads
    every worker (changes coalesce, the latest state is never missed)."""

    def __init__(self, maxsize: int | None = None) -> None:
        self.maxsize = WATCH_BUFFER if maxsize is None else maxsize
        self.changed: set[str] = set()
        self.overflowed = False
        self.wakeup = asyncio.Event()

    def push(self, session_ids: Iterable[str]) -> None:
        if not self.overflowed:
            self.changed.update(session_ids)
            if len(self.changed) > self.maxsize:
                self.overflowed = True
                self.changed.clear()
        self.wakeup.set()

    def everything(self) -> None:
        self.overflowed = True
        self.changed.clear()
        self.wakeup.set()

    def take(self) -> tuple[set[str], bool]:
        changed, overflowed = self.changed, self.overflowed
        self.changed, self.overflowed = set(), False
        self.wakeup.clear()
        return changed, overflowed


class WorkerFeed:
    """WatchWorkers streams register before reading their snapshot, so no
    change committed after it is missed."""

    def __init__(self) -> None:
        self._subs: set[WorkerSubscription] = set()

    @contextmanager
    def subscribe(self) -> Iterator[WorkerSubscription]:
        sub = WorkerSubscription()
        self._subs.add(sub)
        try:
            yield sub
        finally:
            self._subs.discard(sub)

    def poke(self, session_ids: Iterable[str]) -> None:
        """These sessions changed (here, or on another replica)."""
        ids = list(session_ids)
        if ids:
            for sub in self._subs:
                sub.push(ids)

    def poke_all(self) -> None:
        """Notices may have been lost: every watcher re-reads the fleet."""
        for sub in self._subs:
            sub.everything()

    @property
    def subscriber_count(self) -> int:
        return len(self._subs)
