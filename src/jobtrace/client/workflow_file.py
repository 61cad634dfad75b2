"""Workflow files: the YAML (or JSON) shape `jobtrace submit --workflow FILE`
reads, checked field by field before anything is sent (SCHEMA documents it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jobtrace.client.errors import FieldViolation, InvalidInput
from jobtrace.client.inputs import check
from jobtrace.pb import job_service_pb2

SCHEMA = """\
A workflow file (YAML or JSON) holds one mapping; unknown keys and wrong types
are refused with their path (steps[1].job.max_attempts: ...):

  name: media-pipeline             # required
  request_id: upload-42            # optional; submitting it again returns the same workflow
  priority: 0                      # optional, -1000..1000; steps with priority 0 take it
  labels: {team: media}            # optional, text values
  timeout: 3600                    # optional; seconds (or "3600s") for the whole run from
                                   #   submission, at most 7 days: then it ends TIMED_OUT
  request_context:                 # optional; kept for attestations, handed to every step
    user_context: {user_id: alice}
    body: {upload: 42}
  annotations:                     # optional; trigger provenance
    - actor: {kind: user, id: alice}
      attributes: {trigger.source: upload}
  steps:                           # required, 1 to 1,000
    - name: download               # required, unique
      service: download            # shorthand for job: {service: ..., payload: ...}
      payload: {url: "https://example.com/a.mov"}
    - name: transcode
      job:                         # the step's job: service, payload, priority,
        service: transcode         #   max_attempts, timeout, not_before,
        payload: {codec: av1}      #   affinity_keys, labels, backoff
        max_attempts: 2            # attempts in all (0: 3); retries belong to the job
        timeout: 600               # seconds per attempt, or "600s"
        backoff: {initial_interval: 1s, multiplier: 2, maximum_interval: 60s}
        rate_limits:               # named limits (jobtrace rate-limits) it takes tokens
          - {key: gpu-minutes, units: 2, partition: "{codec}"}   #   of; partition: a
        concurrency:               #   bucket per payload value; at most max_running
          key: "codec:{codec}"     #   running with the resolved key; when full:
          max_running: 4           #   queue (wait), cancel_newest, cancel_oldest
          strategy: queue
      depends_on: [download]       # default: the previous step
    - name: notify                 # no depends_on: after the previous step
      service: notify
    - name: audit
      service: audit
      independent: true            # depends on nothing: starts with the workflow
    - name: thumbnail              # fan-out: one job per item of a list (at most 1,000)
      service: thumbnail           #   in the result of a step it depends on; each job
      depends_on: [download]       #   gets the payload plus its item under "item"
      for_each: {step: download, path: frames}   # path: dotted, into the result
    - name: review                 # an approval gate instead of a job: no worker runs
      depends_on: [transcode]      #   it; it waits (WAITING_FOR_HUMAN) for people to
      approval:                    #   decide (jobtrace approve WF review [--reject])
        approvers: [alice, "role:reviewer"]   # subjects, or any reviewer; deciders
        min_approvals: 1           #   need the reviewer role; distinct approvals needed
        timeout: 86400             # optional: seconds (or "86400s") of waiting at most
        on_timeout: fail           # fail (default): TIMED_OUT; reject: as a rejection
        on_reject: fail            # fail (default): the workflow fails; skip: the gate
        policy_version: change-3   #   completes unapproved and the next steps run
"""

# Keys of a step that stand for members of its job.
_SHORTHAND = ("service", "payload")


@dataclass(frozen=True, slots=True)
class WorkflowFile:
    """A checked workflow file: the arguments of Client.submit_workflow."""

    name: str
    steps: list[dict[str, Any]]
    request_id: str | None = None
    priority: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    request_context: dict[str, Any] | None = None
    annotations: list[dict[str, Any]] = field(default_factory=list)
    # The whole run's timeout in seconds (None: no deadline).
    timeout: float | None = None


def load_workflow(text: str, *, source: str = "") -> WorkflowFile:
    """The workflow a YAML or JSON text describes (see SCHEMA). InvalidInput,
    naming `source` (the file) and every bad field by its path, otherwise."""
    import yaml

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" (line {mark.line + 1}, column {mark.column + 1})"
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise InvalidInput(f"not valid YAML/JSON: {problem}{where}", source=source) from None
    return workflow_from(doc, source=source)


def workflow_from(doc: object, *, source: str = "") -> WorkflowFile:
    """The workflow a mapping (a parsed workflow file) describes; see load_workflow."""
    if not isinstance(doc, Mapping):
        raise InvalidInput(
            "expected a mapping at the top level (name:, steps:, ...)", source=source
        )
    violations: list[FieldViolation] = []
    doc = dict(doc)
    if isinstance(doc.get("labels"), Mapping):
        # YAML reads `version: 2` as a number; labels are text either way.
        doc["labels"] = {str(k): str(v) for k, v in doc["labels"].items()}
    raw_steps = doc.get("steps")
    if raw_steps is None or raw_steps == []:
        violations.append(FieldViolation("steps", "required: a list of one or more steps"))
    elif isinstance(raw_steps, list):
        doc["steps"] = [_expand(s, f"steps[{i}]", violations) for i, s in enumerate(raw_steps)]
    if not doc.get("name"):
        violations.append(FieldViolation("name", "required: the workflow's name"))
    plain = check(job_service_pb2.SubmitWorkflowRequest.DESCRIPTOR, doc, "", violations)
    if violations:
        raise InvalidInput(violations, source=source)
    return WorkflowFile(
        name=plain["name"],
        steps=plain["steps"],
        request_id=plain.get("request_id") or None,
        priority=plain.get("priority", 0),
        labels=plain.get("labels", {}),
        request_context=plain.get("request_context"),
        annotations=plain.get("annotations", []),
        timeout=float(plain["timeout"].removesuffix("s")) if "timeout" in plain else None,
    )


def _expand(step: object, where: str, violations: list[FieldViolation]) -> object:
    """A step with its shorthand (`service:`, `payload:`) moved into its job."""
    if isinstance(step, Mapping) and "approval" in step:
        if "job" in step or any(k in step for k in _SHORTHAND):
            violations.append(
                FieldViolation(where, "an approval gate runs no job: set approval or a job")
            )
            return {k: v for k, v in step.items() if k not in ("job", *_SHORTHAND)}
    if not isinstance(step, Mapping) or not any(k in step for k in _SHORTHAND):
        return step
    step = dict(step)
    job = step.get("job") or {}
    if not isinstance(job, Mapping):
        return step  # reported by check()
    job = dict(job)
    for key in _SHORTHAND:
        if key in step:
            if key in job:
                violations.append(
                    FieldViolation(f"{where}.{key}", f"given twice: here and as {where}.job.{key}")
                )
            job[key] = step.pop(key)
    step["job"] = job
    return step
