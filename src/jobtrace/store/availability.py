"""Whether storage answers: from the failures operations meet, and a periodic probe."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

# A probe that takes longer than this counts as a failed one.
PROBE_TIMEOUT_S = 5.0


class Availability:
    """Storage is *down* from the first operation that fails for a transient
    reason (a refused or lost connection: `store.errors.is_transient`), or the
    first failed probe, until a probe succeeds with no operation having failed
    since that probe began. An outage is logged twice, whatever its length:
    one warning when it begins and one when it ends, with the number of
    operations that failed meanwhile; not a traceback per failed call.

    `changed` is set at each transition (its watcher clears it and reads `up`)."""

    def __init__(self, probe_every_s: float = 1.0) -> None:
        self.probe_every_s = probe_every_s
        self.up = True
        self.changed = asyncio.Event()
        # Of the current (or last) outage.
        self.failed_calls = 0
        self.outages = 0
        self._down_since = 0.0
        self._last_failure = 0.0
        self._wake = asyncio.Event()

    def failed(self, error: BaseException) -> None:
        """An operation met a transient storage failure (its caller is told
        UNAVAILABLE); the probe checks at once whether storage is back."""
        self._last_failure = time.monotonic()
        if self.up:
            self._go_down(f"{type(error).__name__}: {_first_line(error)}")
        self.failed_calls += 1
        self._wake.set()

    def _go_down(self, why: str) -> None:
        self.up = False
        self.outages += 1
        self.failed_calls = 0
        self._down_since = time.monotonic()
        log.warning(
            "storage unavailable (%s): calls are answered UNAVAILABLE and health is "
            "NOT_SERVING until it answers again",
            why,
            extra={"storage": "down"},
        )
        self.changed.set()

    def _go_up(self) -> None:
        self.up = True
        elapsed = time.monotonic() - self._down_since
        log.warning(
            "storage back after %d failed calls over %.1f s",
            self.failed_calls,
            elapsed,
            extra={"storage": "up", "failed_calls": self.failed_calls, "outage_s": elapsed},
        )
        self.changed.set()

    async def watch(self, probe: Callable[[], Awaitable[None]]) -> None:
        """Probe every `probe_every_s` (at once after a failure), forever."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.probe_every_s):
                    await self._wake.wait()
            self._wake.clear()
            started = time.monotonic()
            try:
                async with asyncio.timeout(PROBE_TIMEOUT_S):
                    await probe()
            except Exception as exc:  # every way of not answering is "down"
                if self.up:
                    self._go_down(f"probe failed: {type(exc).__name__}: {_first_line(exc)}")
                continue
            if not self.up and self._last_failure < started:
                self._go_up()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else "no message"
