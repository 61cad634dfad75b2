"""Wall-clock time as integer microseconds since the Unix epoch (UTC)."""

from __future__ import annotations

import time


def now_us() -> int:
    return time.time_ns() // 1_000


def iso(us: int) -> str:
    """RFC 3339 UTC, microsecond precision; empty for 0 (unset)."""
    import datetime as dt

    if not us:
        return ""
    return dt.datetime.fromtimestamp(us / 1e6, dt.UTC).isoformat().replace("+00:00", "Z")


class Clock:
    """The wall clock, as an object a component can be given (the schedule
    scanner); tests give a ManualClock instead and move time themselves."""

    def now_us(self) -> int:
        return now_us()


class ManualClock(Clock):
    """Virtual time for tests: it stands still until advanced."""

    def __init__(self, start_us: int | None = None) -> None:
        self._now = now_us() if start_us is None else start_us

    def now_us(self) -> int:
        return self._now

    def set(self, us: int) -> None:
        self._now = us

    def advance(self, seconds: float) -> None:
        self._now += int(seconds * 1_000_000)
