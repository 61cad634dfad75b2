"""The run state machine: every state a job or a workflow can be in, every
transition between them, and which operator action is allowed from which
state. It is the one place these rules live; every write that changes a run's
state checks it here, under the run's lock, so cancel, terminate, pause,
approve, rerun, timeouts and step completion race safely (the first to take
the lock wins, the others see the state it left and are refused).

A refused action is FAILED_PRECONDITION naming the run, its current state,
the action and the states it would have needed."""

from __future__ import annotations

import enum
from collections.abc import Mapping

from jobtrace.domain.errors import FailedPrecondition
from jobtrace.model import TERMINAL_STATES, RunState

S = RunState


class RunKind(enum.Enum):
    JOB = "job"
    WORKFLOW = "workflow"


class Action(enum.Enum):
    """What an operator (or the server on a deadline) asks of a run."""

    CANCEL = "cancel"  # ask the worker to stop, wait for it: CANCELLED
    TERMINATE = "terminate"  # end now without waiting for the worker: TERMINATED
    TIME_OUT = "time out"  # a deadline passed: TIMED_OUT
    PAUSE = "pause"  # a workflow dispatches no new step: PAUSED
    RESUME = "resume"  # a paused workflow goes on where it stopped
    APPROVE = "approve"  # a person decides an approval gate step
    RERUN = "rerun"  # a new run of an ended one (the old run does not change)


_ENDINGS = frozenset({S.COMPLETED, S.FAILED, S.CANCELLED, S.TERMINATED})

# Every transition a job (standalone or a workflow step) may make.
JOB_TRANSITIONS: Mapping[RunState, frozenset[RunState]] = {
    # A step waiting for its dependencies: queued when they are done, an
    # approval gate waits for people, a fan-out step runs its children (or
    # ends at once on an empty or invalid list); the workflow's end cancels it.
    S.PENDING: frozenset({S.QUEUED, S.RUNNING, S.WAITING_FOR_HUMAN, *_ENDINGS}),
    S.QUEUED: frozenset({S.RUNNING, S.CANCELLED, S.TERMINATED, S.FAILED}),
    # Back to QUEUED: a retry, a lost lease, a worker that gave the job back.
    S.RUNNING: frozenset({S.QUEUED, *_ENDINGS, S.TIMED_OUT}),
    # An approval gate: approved (COMPLETED), rejected (FAILED, or CANCELLED
    # when the step says on_reject: skip), past its timeout, or ended with
    # its workflow.
    S.WAITING_FOR_HUMAN: frozenset({*_ENDINGS, S.TIMED_OUT}),
    **{t: frozenset() for t in TERMINAL_STATES},
}

# Every transition a workflow run may make. PAUSED and WAITING_FOR_HUMAN are
# not terminal: running steps finish while paused (and may end the run).
WORKFLOW_TRANSITIONS: Mapping[RunState, frozenset[RunState]] = {
    S.QUEUED: frozenset({S.RUNNING, S.WAITING_FOR_HUMAN, S.PAUSED, *_ENDINGS, S.TIMED_OUT}),
    S.RUNNING: frozenset({S.WAITING_FOR_HUMAN, S.PAUSED, *_ENDINGS, S.TIMED_OUT}),
    # Back to QUEUED when its gate is decided before any step started.
    S.WAITING_FOR_HUMAN: frozenset({S.QUEUED, S.RUNNING, S.PAUSED, *_ENDINGS, S.TIMED_OUT}),
    S.PAUSED: frozenset({S.QUEUED, S.RUNNING, S.WAITING_FOR_HUMAN, *_ENDINGS, S.TIMED_OUT}),
    **{t: frozenset() for t in TERMINAL_STATES},
}

_LIVE_JOB = frozenset({S.PENDING, S.QUEUED, S.RUNNING, S.WAITING_FOR_HUMAN})
_LIVE_WORKFLOW = frozenset({S.QUEUED, S.RUNNING, S.WAITING_FOR_HUMAN, S.PAUSED})

# The states each action may be taken from, per kind of run. An action not
# listed for a kind is refused from every state.
ACTIONS: Mapping[tuple[RunKind, Action], frozenset[RunState]] = {
    (RunKind.JOB, Action.CANCEL): _LIVE_JOB,
    (RunKind.JOB, Action.TERMINATE): _LIVE_JOB,
    (RunKind.JOB, Action.TIME_OUT): frozenset({S.RUNNING, S.WAITING_FOR_HUMAN}),
    (RunKind.JOB, Action.APPROVE): frozenset({S.WAITING_FOR_HUMAN}),
    (RunKind.JOB, Action.RERUN): TERMINAL_STATES,
    (RunKind.WORKFLOW, Action.CANCEL): _LIVE_WORKFLOW,
    (RunKind.WORKFLOW, Action.TERMINATE): _LIVE_WORKFLOW,
    (RunKind.WORKFLOW, Action.TIME_OUT): _LIVE_WORKFLOW,
    (RunKind.WORKFLOW, Action.PAUSE): frozenset({S.QUEUED, S.RUNNING, S.WAITING_FOR_HUMAN}),
    (RunKind.WORKFLOW, Action.RESUME): frozenset({S.PAUSED}),
    (RunKind.WORKFLOW, Action.RERUN): TERMINAL_STATES,
}

# Where an action leaves the run (RESUME and APPROVE depend on the run: the
# state it was paused from, the gate's decision; RERUN leaves the old run be).
ACTION_TARGETS: Mapping[Action, RunState] = {
    Action.CANCEL: S.CANCELLED,
    Action.TERMINATE: S.TERMINATED,
    Action.TIME_OUT: S.TIMED_OUT,
    Action.PAUSE: S.PAUSED,
}


def transitions(kind: RunKind) -> Mapping[RunState, frozenset[RunState]]:
    return JOB_TRANSITIONS if kind is RunKind.JOB else WORKFLOW_TRANSITIONS


def allowed_from(kind: RunKind, action: Action) -> frozenset[RunState]:
    """The states `action` may be taken from (empty: never, for this kind)."""
    return ACTIONS.get((kind, action), frozenset())


def _names(states: frozenset[RunState]) -> str:
    return ", ".join(s.name for s in sorted(states)) or "none"


def _refused(
    kind: RunKind, run_id: str, current: RunState, what: str, needed: frozenset[RunState]
) -> FailedPrecondition:
    noun = kind.value
    # Terminal keeps the reason callers already match on (JOB_TERMINAL).
    reason = f"{noun.upper()}_{'TERMINAL' if current.terminal else 'STATE'}"
    verb = "already ended" if current.terminal else "is"
    return FailedPrecondition(
        f"{noun} {run_id!r} {verb} {current.name}: cannot {what} (needs {_names(needed)})",
        reason=reason,
        metadata={f"{noun}_id": run_id, "state": current.name, "action": what},
    )


def require(kind: RunKind, run_id: str, current: RunState, action: Action) -> None:
    """Refuse `action` on a run in state `current` unless the table allows it."""
    needed = allowed_from(kind, action)
    if current not in needed:
        raise _refused(kind, run_id, current, action.value, needed)


def check_transition(kind: RunKind, run_id: str, current: RunState, target: RunState) -> None:
    """Refuse a move the state machine does not list (a transition to the
    same state is not a move and is refused too)."""
    allowed = transitions(kind).get(current, frozenset())
    if target not in allowed:
        raise _refused(kind, run_id, current, f"move to {target.name}", allowed)


def can(kind: RunKind, current: RunState, action: Action) -> bool:
    return current in allowed_from(kind, action)


def require_among(
    kind: RunKind, run_id: str, current: RunState, action: Action, among: frozenset[RunState]
) -> None:
    """As require, and refuse too unless `current` is among `among` when it
    is given: a caller's narrower condition (a bulk operation's state filter,
    checked again under the run's lock)."""
    require(kind, run_id, current, action)
    if among and current not in among:
        raise _refused(kind, run_id, current, action.value, allowed_from(kind, action) & among)
