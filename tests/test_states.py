"""The run state machine's table is consistent with the states and actions it
names (the per-RPC walk of every (state, action) pair through the real server
lives with the RPCs that take each action)."""

from __future__ import annotations

import pytest

from jobtrace.domain import states
from jobtrace.domain.errors import FailedPrecondition
from jobtrace.domain.states import Action, RunKind
from jobtrace.model import TERMINAL_STATES, RunState


@pytest.mark.parametrize("kind", list(RunKind))
def test_every_state_has_a_row_and_terminal_states_go_nowhere(kind: RunKind) -> None:
    table = states.transitions(kind)
    for state in TERMINAL_STATES:
        assert table[state] == frozenset()
    for state, targets in table.items():
        assert state not in targets, f"{state.name} lists itself"
        assert RunState.UNSPECIFIED not in targets


@pytest.mark.parametrize("kind", list(RunKind))
def test_every_action_lands_on_a_listed_transition(kind: RunKind) -> None:
    for action, target in states.ACTION_TARGETS.items():
        for state in states.allowed_from(kind, action):
            assert target in states.transitions(kind)[state], (kind, action, state)


def test_refusal_names_the_current_state_and_keeps_the_terminal_reason() -> None:
    with pytest.raises(FailedPrecondition) as info:
        states.require(RunKind.WORKFLOW, "wf_1", RunState.COMPLETED, Action.PAUSE)
    assert info.value.reason == "WORKFLOW_TERMINAL"
    assert info.value.metadata["state"] == "COMPLETED"
    assert "COMPLETED" in info.value.message and "pause" in info.value.message
    with pytest.raises(FailedPrecondition) as info:
        states.require(RunKind.WORKFLOW, "wf_1", RunState.RUNNING, Action.RESUME)
    assert info.value.reason == "WORKFLOW_STATE"
    assert "needs PAUSED" in info.value.message
    with pytest.raises(FailedPrecondition) as info:
        states.check_transition(RunKind.JOB, "job_1", RunState.QUEUED, RunState.COMPLETED)
    assert info.value.metadata["state"] == "QUEUED"


def test_allowed_actions_pass() -> None:
    states.require(RunKind.JOB, "job_1", RunState.RUNNING, Action.TERMINATE)
    states.require(RunKind.WORKFLOW, "wf_1", RunState.PAUSED, Action.RESUME)
    assert states.can(RunKind.JOB, RunState.WAITING_FOR_HUMAN, Action.APPROVE)
    assert not states.can(RunKind.JOB, RunState.QUEUED, Action.PAUSE)


def test_a_narrower_condition_refuses_other_allowed_states_as_a_state_refusal() -> None:
    queued = frozenset({RunState.QUEUED})
    states.require_among(RunKind.JOB, "job_1", RunState.QUEUED, Action.CANCEL, queued)
    states.require_among(RunKind.JOB, "job_1", RunState.RUNNING, Action.CANCEL, frozenset())
    with pytest.raises(FailedPrecondition) as info:
        states.require_among(RunKind.JOB, "job_1", RunState.RUNNING, Action.CANCEL, queued)
    assert info.value.reason == "JOB_STATE" and "needs QUEUED" in info.value.message
    with pytest.raises(FailedPrecondition) as info:
        states.require_among(RunKind.JOB, "job_1", RunState.COMPLETED, Action.CANCEL, queued)
    assert info.value.reason == "JOB_TERMINAL"
