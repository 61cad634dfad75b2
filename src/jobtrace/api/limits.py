"""Per-caller limits on open streams."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

from jobtrace.auth import Principal
from jobtrace.domain.errors import ResourceExhausted


class StreamLimiter:
    def __init__(self, per_caller: int) -> None:
        self.per_caller = per_caller
        self._open: Counter[str] = Counter()

    @contextlib.contextmanager
    def hold(self, principal: Principal) -> Iterator[None]:
        key = f"{principal.tenant}/{principal.subject}"
        if self._open[key] >= self.per_caller:
            raise ResourceExhausted(
                f"{principal.subject!r} already holds {self.per_caller} open streams",
                reason="TOO_MANY_STREAMS",
                metadata={"limit": str(self.per_caller)},
            )
        self._open[key] += 1
        try:
            yield
        finally:
            self._open[key] -= 1
            if not self._open[key]:
                del self._open[key]

    def open_streams(self) -> int:
        return sum(self._open.values())
