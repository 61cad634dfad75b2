"""Fan-out steps (for_each): one child job per item of a list in an upstream
step's result. The children are jobs of the same workflow named
"<step>[<index>]" (a name no submitted step can have), each with the step's
payload and its item under ITEM_KEY; the step's job runs no attempt itself and
completes with its children's results, in item order."""

from __future__ import annotations

import re
from typing import Any

from jobtrace.model import ForEach

MAX_ITEMS = 1000
ITEM_KEY = "item"
MAX_PATH = 256
# A child's step_index: after every submitted step, in item order.
CHILD_INDEX_BASE = 1_000_000
# A child's name adds "[999]" to its step's: the step's name is bounded so it fits.
MAX_STEP_NAME = 128 - len(f"[{MAX_ITEMS - 1}]")
PATH_RE = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
_CHILD_RE = re.compile(r"(.+)\[(\d+)\]")


def child_name(step: str, index: int) -> str:
    return f"{step}[{index}]"


def parent_of(step_name: str) -> tuple[str, int] | None:
    """(fan-out step, item index) of a child's name; None for any other step."""
    m = _CHILD_RE.fullmatch(step_name)
    return None if m is None else (m.group(1), int(m.group(2)))


def items(result: Any, for_each: ForEach) -> list[Any] | str:
    """The items a fan-out step runs over, or why there are none to run."""
    value = result
    walked = for_each.step
    for key in for_each.path.split(".") if for_each.path else ():
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            return f"for_each: the result of step {for_each.step!r} has no {for_each.path!r}"
        walked += "." + key
    if not isinstance(value, list):
        where = f"{for_each.path!r} in the result" if for_each.path else "the result"
        return (
            f"for_each: {where} of step {for_each.step!r} is not a list"
            f" (got {type(value).__name__})"
        )
    if len(value) > MAX_ITEMS:
        return (
            f"for_each: {len(value)} items at {walked!r}; a step fans out to at most {MAX_ITEMS:,}"
        )
    return value
