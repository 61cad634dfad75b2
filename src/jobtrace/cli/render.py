"""Terminal output: tables, colours, progress bars, times and JSON forms of messages."""

from __future__ import annotations

import base64
import json
import os
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO, cast

from google.protobuf import json_format
from google.protobuf.message import Message

from jobtrace.pb import common_pb2, timestamp_pb2

TERMINAL_STATES = {
    common_pb2.RUN_STATE_COMPLETED,
    common_pb2.RUN_STATE_FAILED,
    common_pb2.RUN_STATE_CANCELLED,
    common_pb2.RUN_STATE_TERMINATED,
    common_pb2.RUN_STATE_TIMED_OUT,
}


def exit_code_for(state: int) -> int:
    """0 completed; 1 failed, timed out or terminated; 3 cancelled (2 is for errors)."""
    if state == common_pb2.RUN_STATE_COMPLETED:
        return 0
    if state == common_pb2.RUN_STATE_CANCELLED:
        return 3
    return 1


def as_json(message: Message) -> dict[str, Any]:
    """A message in its proto3 JSON form, with the .proto field names; exact
    JSON fields (payload_json, result_json...) shown as the JSON they hold,
    under the name without _json (not as base64)."""
    return cast(
        dict[str, Any],
        _exact_json(json_format.MessageToDict(message, preserving_proto_field_name=True)),
    )


# The bytes fields that hold exact JSON, shown in place of their Struct twin.
_EXACT_FIELDS = ("payload_json", "result_json", "outputs_json", "upstream_json")


def _exact_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_exact_json(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: _exact_json(v) for k, v in value.items()}
    for name in _EXACT_FIELDS:
        if isinstance(out.get(name), str):
            out[name.removesuffix("_json")] = json.loads(base64.b64decode(out.pop(name)))
    return out


def print_json(value: Any, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    out.write(json.dumps(value, ensure_ascii=False) + "\n")
    out.flush()


class Style:
    """ANSI colours, on only for a terminal and when NO_COLOR is unset (or forced)."""

    _LEVELS: dict[int, str] = {
        common_pb2.LEVEL_DEBUG: "2",
        common_pb2.LEVEL_INFO: "36",
        common_pb2.LEVEL_WARN: "33",
        common_pb2.LEVEL_ERROR: "31",
        common_pb2.LEVEL_CRITICAL: "1;31",
    }
    _STATES: dict[int, str] = {
        common_pb2.RUN_STATE_PENDING: "2",
        common_pb2.RUN_STATE_QUEUED: "34",
        common_pb2.RUN_STATE_RUNNING: "36",
        common_pb2.RUN_STATE_COMPLETED: "32",
        common_pb2.RUN_STATE_FAILED: "31",
        common_pb2.RUN_STATE_TIMED_OUT: "31",
        common_pb2.RUN_STATE_TERMINATED: "31",
        common_pb2.RUN_STATE_CANCELLED: "33",
    }

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    @classmethod
    def choose(cls, mode: str, out: TextIO) -> Style:
        if mode == "always":
            return cls(True)
        if mode == "never":
            return cls(False)
        return cls(out.isatty() and not os.environ.get("NO_COLOR"))

    def paint(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.enabled and code else text

    def level(self, level: int, text: str | None = None) -> str:
        return self.paint(self._LEVELS.get(level, ""), text or level_name(level))

    def state(self, state: int, text: str | None = None) -> str:
        return self.paint(self._STATES.get(state, ""), text or state_name(state))

    def dim(self, text: str) -> str:
        return self.paint("2", text)

    def bold(self, text: str) -> str:
        return self.paint("1", text)


def state_name(state: int) -> str:
    return common_pb2.RunState.Name(cast(Any, state)).removeprefix("RUN_STATE_")


def level_name(level: int) -> str:
    return common_pb2.Level.Name(cast(Any, level)).removeprefix("LEVEL_")


def when(ts: timestamp_pb2.Timestamp, *, date: bool = True) -> str:
    """A timestamp in UTC, to the second; '-' when unset."""
    if not ts.seconds and not ts.nanos:
        return "-"
    moment = datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S" if date else "%H:%M:%S")


def bar(fraction: float, width: int = 20) -> str:
    fraction = min(max(fraction, 0.0), 1.0)
    filled = round(fraction * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO | None = None) -> None:
    """Columns aligned to their widest cell (ANSI colour codes do not count)."""
    out = out or sys.stdout
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], visible_len(cell))
    for row in [headers, *rows]:
        cells = [cell + " " * (widths[i] - visible_len(cell)) for i, cell in enumerate(row)]
        out.write("  ".join(cells).rstrip() + "\n")
    out.flush()


ANSI = re.compile(r"(\x1b\[[0-9;]*m)")


def visible_len(text: str) -> int:
    return len(ANSI.sub("", text))


def clip(text: str, width: int) -> str:
    """At most `width` visible characters; colour codes are kept, and reset if cut."""
    if visible_len(text) <= width:
        return text
    out: list[str] = []
    left = width
    for part in ANSI.split(text):  # text and colour codes, alternating
        if ANSI.fullmatch(part):
            out.append(part)
        elif left > 0:
            out.append(part[:left])
            left -= len(out[-1])
    return "".join(out) + "\x1b[0m"


def shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"
