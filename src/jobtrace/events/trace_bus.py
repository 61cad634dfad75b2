"""In-process fan-out of committed trace events to live stream subscribers."""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from collections.abc import Iterator
from contextlib import contextmanager

from jobtrace.model import TraceEvent

SUBSCRIBER_BUFFER = 1024


class TraceSubscription:
    """Events of one run for one stream, bounded. A reader that falls behind is
    marked `overflowed` and catches up from the database; the server never
    buffers more than SUBSCRIBER_BUFFER events for it."""

    def __init__(self, maxsize: int = SUBSCRIBER_BUFFER) -> None:
        self._events: deque[TraceEvent] = deque()
        self._maxsize = maxsize
        self.overflowed = False
        self.run_ended = False
        self.wakeup = asyncio.Event()
        # The last sequence the stream has handled; None until its first read
        # from the database is done.
        self.position: int | None = None

    def push(self, events: list[TraceEvent], run_ended: bool) -> None:
        if not self.overflowed:
            if len(self._events) + len(events) > self._maxsize:
                self.overflowed = True
                self._events.clear()
            else:
                self._events.extend(events)
        self.run_ended = self.run_ended or run_ended
        self.wakeup.set()

    def take(self) -> tuple[list[TraceEvent], bool]:
        """(events, overflowed); resets both."""
        events = list(self._events)
        self._events.clear()
        overflowed, self.overflowed = self.overflowed, False
        self.wakeup.clear()
        return events, overflowed


class TraceBus:
    def __init__(self) -> None:
        self._subs: defaultdict[str, set[TraceSubscription]] = defaultdict(set)
        # Highest sequence published per run with subscribers here.
        self.high_water: dict[str, int] = {}

    @contextmanager
    def subscribe(self, run_id: str) -> Iterator[TraceSubscription]:
        sub = TraceSubscription()
        self._subs[run_id].add(sub)
        try:
            yield sub
        finally:
            subs = self._subs.get(run_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[run_id]
                    self.high_water.pop(run_id, None)

    def publish(self, run_id: str, events: list[TraceEvent], run_ended: bool = False) -> None:
        subs = self._subs.get(run_id)
        if not subs:
            return
        if events:
            self.high_water[run_id] = max(self.high_water.get(run_id, 0), events[-1].seq)
        for sub in subs:
            sub.push(events, run_ended)

    def watched(self, run_id: str) -> bool:
        return bool(self._subs.get(run_id))

    def lowest_position(self, run_id: str) -> int | None:
        """The least sequence a live subscriber of the run has handled (None when
        none is live yet): events after it reach every one of them without a gap."""
        positions = [s.position for s in self._subs.get(run_id, ()) if s.position is not None]
        return min(positions, default=None)

    def poke(self, run_id: str, run_ended: bool = False) -> None:
        """Another replica stored events of this run: its subscribers catch up
        from the database (which holds them in sequence order)."""
        for sub in self._subs.get(run_id, ()):
            sub.overflowed = True
            sub.run_ended = sub.run_ended or run_ended
            sub.wakeup.set()

    def poke_all(self) -> None:
        """Notices may have been lost: every subscriber catches up from the database."""
        for run_id in list(self._subs):
            self.poke(run_id)

    @property
    def subscriber_count(self) -> int:
        return sum(len(s) for s in self._subs.values())
