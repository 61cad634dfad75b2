"""Label requirements and weighted affinity: which workers may take a job, and
how much each is preferred. Pure functions, no I/O."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from jobtrace.model import Comparator, JobSpec, LabelRequirement

# What a worker's label must look like to be compared as a number (no "nan",
# "inf" or "1_000": what a person would call a number).
_NUMBER_RE = re.compile(r"\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?\s*")


def label_number(label: str) -> float | None:
    """A worker label read as a number; None when it is not one."""
    if len(label) > 64 or not _NUMBER_RE.fullmatch(label):
        return None
    number = float(label)
    return number if math.isfinite(number) else None


def holds(req: LabelRequirement, labels: Mapping[str, str]) -> bool:
    """Whether a worker with these labels meets the requirement. NOT_EQUAL holds
    when the label is missing; every other comparator needs the label. A number
    value compares the label as a number (a label that is not one fails, but
    for NOT_EQUAL); a string value compares the label as it is."""
    label = labels.get(req.key)
    cmp = req.comparator
    if label is None:
        return cmp == Comparator.NOT_EQUAL
    value = req.value
    if isinstance(value, str):
        equal = label == value
        return equal if cmp != Comparator.NOT_EQUAL else not equal
    if value is None:
        return False
    number = label_number(label)
    if number is None:
        return cmp == Comparator.NOT_EQUAL
    if cmp == Comparator.NOT_EQUAL:
        return number != value
    if cmp == Comparator.GREATER:
        return number > value
    if cmp == Comparator.AT_LEAST:
        return number >= value
    if cmp == Comparator.LESS:
        return number < value
    if cmp == Comparator.AT_MOST:
        return number <= value
    return number == value  # EQUAL (UNSPECIFIED is stored as EQUAL)


def required_of(spec: JobSpec) -> tuple[LabelRequirement, ...]:
    return tuple(r for r in spec.worker_labels if r.required)


def meets(required: Iterable[LabelRequirement], labels: Mapping[str, str]) -> bool:
    return all(holds(r, labels) for r in required)


def describe(req: LabelRequirement) -> str:
    """A requirement as a person writes it: "gpu=a100", "vram_gb>=40"."""
    ops = {
        Comparator.EQUAL: "=",
        Comparator.NOT_EQUAL: "!=",
        Comparator.GREATER: ">",
        Comparator.AT_LEAST: ">=",
        Comparator.LESS: "<",
        Comparator.AT_MOST: "<=",
    }
    value = req.value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"{req.key}{ops.get(req.comparator, '=')}{value}"


class Score(NamedTuple):
    """A worker's score for a job, and what made it."""

    score: float
    matched_labels: tuple[str, ...]
    matched_keys: tuple[str, ...]


def affinity_weights(spec: JobSpec) -> dict[str, float]:
    """The job's affinity keys by weight: today's affinity_keys weigh 1, a key
    named in `affinity` takes its weight there."""
    weights = dict.fromkeys(spec.affinity_keys, 1.0)
    weights.update(spec.affinity)
    return weights


def score(
    spec: JobSpec,
    labels: Mapping[str, str],
    cached: frozenset[str],
    weights: Mapping[str, float] | None = None,
) -> Score | None:
    """The worker's score for the job (None: a required label does not hold):
    the weights of the preferences that hold plus those of the cached keys."""
    total = 0.0
    matched: list[str] = []
    for req in spec.worker_labels:
        if holds(req, labels):
            matched.append(describe(req))
            if not req.required:
                total += req.weight
        elif req.required:
            return None
    keys: list[str] = []
    if weights is None:
        weights = affinity_weights(spec)
    if weights:
        for key, weight in weights.items():
            if key in cached:
                keys.append(key)
                total += weight
    return Score(total, tuple(matched), tuple(keys))
