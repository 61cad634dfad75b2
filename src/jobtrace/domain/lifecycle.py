"""State transitions of jobs and their workflows, inside one write transaction."""

from __future__ import annotations

from dataclasses import replace

from sqlalchemy.ext.asyncio import AsyncSession

from jobtrace.model import JSON, Failure, Job, RunState
from jobtrace.store import codec
from jobtrace.store import jobs as store

LEASE_EXPIRED = "lease expired"


async def set_job(session: AsyncSession, job: Job, **changes: object) -> Job:
    """Write the changed fields of a job and return the new record."""
    new = replace(job, **changes)  # type: ignore[arg-type]
    values: dict[str, object] = {}
    for name, value in changes.items():
        if name == "state":
            values["state"] = int(value)  # type: ignore[call-overload]
        elif name == "failure":
            values["failure"] = codec.failure_dumps(value)  # type: ignore[arg-type]
        elif name == "result":
            values["result"] = None if value is None else codec.dumps(value)
        else:  # record fields are named like their columns
            values[name] = value
    await store.update_job(session, job.id, **values)
    return new


async def complete(session: AsyncSession, job: Job, result: JSON | None, now: int) -> list[Job]:
    done = await set_job(
        session,
        job,
        state=RunState.COMPLETED,
        result=result,
        completed_us=now,
        updated_us=now,
        lease_deadline_us=0,
        failure=None,
        progress_percent=100.0,
    )
    return [done, *await _step_finished(session, done, now)]


async def fail_attempt(
    session: AsyncSession, job: Job, failure: Failure, retryable: bool, now: int
) -> list[Job]:
    """A failed attempt: retry with backoff while attempts remain and the failure
    is retryable, else fail the job (and its workflow)."""
    if retryable and job.attempt < job.spec.max_attempts:
        delay_us = job.spec.backoff.delay_ms(job.attempt) * 1000
        queued = await set_job(
            session,
            job,
            state=RunState.QUEUED,
            failure=replace(failure, retryable=True),
            lease_deadline_us=0,
            next_attempt_us=now + delay_us,
            updated_us=now,
        )
        return [queued]
    return await end_job(session, job, RunState.FAILED, replace(failure, retryable=retryable), now)


async def end_job(
    session: AsyncSession, job: Job, state: RunState, failure: Failure | None, now: int
) -> list[Job]:
    ended = await set_job(
        session,
        job,
        state=state,
        failure=failure,
        completed_us=now,
        updated_us=now,
        lease_deadline_us=0,
        next_attempt_us=0,
    )
    return [ended, *await _step_finished(session, ended, now)]


async def started(session: AsyncSession, job: Job, now: int) -> None:
    """A step's first start makes its workflow RUNNING."""
    if not job.workflow_id:
        return
    row = await store.get_workflow_row(session, job.workflow_id)
    if row is not None and row.state == int(RunState.QUEUED):
        await store.update_workflow(
            session, job.workflow_id, state=int(RunState.RUNNING), started_us=now, updated_us=now
        )


async def _step_finished(session: AsyncSession, step: Job, now: int) -> list[Job]:
    """Advance or end the workflow of a step that reached a terminal state."""
    if not step.workflow_id:
        return []
    steps = (await store.workflow_jobs(session, [step.workflow_id]))[step.workflow_id]
    changed: list[Job] = []
    if step.state == RunState.COMPLETED:
        done = {s.step_name for s in steps if s.state == RunState.COMPLETED}
        for s in steps:
            if s.state == RunState.PENDING and all(d in done for d in s.depends_on):
                changed.append(await set_job(session, s, state=RunState.QUEUED, updated_us=now))
        if len(done) == len(steps):
            await store.update_workflow(
                session,
                step.workflow_id,
                state=int(RunState.COMPLETED),
                completed_steps=len(done),
                completed_us=now,
                updated_us=now,
            )
        else:
            await store.update_workflow(
                session, step.workflow_id, completed_steps=len(done), updated_us=now
            )
        return changed
    # A step ended without completing: the workflow fails (or is cancelled) and
    # every step that has not ended is cancelled.
    workflow_state = RunState.CANCELLED if step.state == RunState.CANCELLED else RunState.FAILED
    failure = Failure(
        reason=f"step {step.step_name!r} {step.state.name.lower()}"
        + (f": {step.failure.reason}" if step.failure else ""),
        code=step.failure.code if step.failure else step.state.name,
        attempt=step.attempt,
    )
    for s in steps:
        if not s.state.terminal:
            changed.append(
                await set_job(
                    session,
                    s,
                    state=RunState.CANCELLED,
                    completed_us=now,
                    updated_us=now,
                    lease_deadline_us=0,
                    next_attempt_us=0,
                    failure=Failure(
                        reason=f"workflow {workflow_state.name.lower()}: "
                        f"step {step.step_name!r} did not complete",
                        code="DEPENDENCY_FAILED",
                        attempt=s.attempt,
                    ),
                )
            )
    await store.update_workflow(
        session,
        step.workflow_id,
        state=int(workflow_state),
        failure=codec.failure_dumps(failure),
        completed_us=now,
        updated_us=now,
    )
    return changed
