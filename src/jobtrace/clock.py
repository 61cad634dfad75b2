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
