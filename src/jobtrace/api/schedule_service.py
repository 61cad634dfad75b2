"""ScheduleService: cron and interval schedules of a job or workflow template."""

from __future__ import annotations

from typing import Any

from jobtrace.api import convert
from jobtrace.api.errors import rpc
from jobtrace.api.flow_service import FlowServicer
from jobtrace.auth import Authenticator, Role
from jobtrace.domain.flow import RateLimits
from jobtrace.domain.jobs import JobSubmission, WorkflowSubmission
from jobtrace.domain.schedules import Schedule, ScheduleDef, Schedules
from jobtrace.model import Caller
from jobtrace.pb import common_pb2, job_service_pb2, struct_pb2
from jobtrace.pb import schedule_service_pb2 as pb

# The actor of the trigger annotations a schedule adds to its runs.
SCHEDULER_ACTOR = "jobtrace-scheduler"


def _duration_us(d: Any) -> int:
    return int(d.seconds) * 1_000_000 + int(d.nanos) // 1_000


def schedule_def(p: pb.Schedule) -> ScheduleDef:
    """The settable fields of a Schedule message, for the domain's checks."""
    kind = p.WhichOneof("template") or ""
    template = b""
    request_id_set = False
    if kind:
        message = getattr(p, kind)
        request_id_set = bool(message.request_id)
        template = message.SerializeToString(deterministic=True)
    return ScheduleDef(
        id=p.id,
        description=p.description,
        cron=p.cron.strip(),
        time_zone=p.time_zone,
        interval_us=_duration_us(p.interval),
        interval_set=p.HasField("interval"),
        jitter_us=_duration_us(p.jitter),
        overlap=int(p.overlap_policy),
        catch_up=int(p.catch_up_policy),
        catch_up_window_us=_duration_us(p.catch_up_window),
        window_set=p.HasField("catch_up_window"),
        kind=kind,
        template=template,
        request_id_set=request_id_set,
        paused=p.paused,
    )


def build(
    kind: str, template: bytes, request_id: str, attributes: dict[str, Any]
) -> JobSubmission | WorkflowSubmission:
    """One tick's submission: the template with its request id and the
    trigger annotations (actor kind SYSTEM) added."""
    request: Any = (
        job_service_pb2.SubmitJobRequest()
        if kind == "job"
        else job_service_pb2.SubmitWorkflowRequest()
    )
    request.ParseFromString(template)
    request.request_id = request_id
    annotation = common_pb2.AnnotationInput(
        actor=common_pb2.Actor(kind=common_pb2.ACTOR_KIND_SYSTEM, id=SCHEDULER_ACTOR)
    )
    for key, value in attributes.items():
        annotation.attributes[key].CopyFrom(struct_pb2.Value(string_value=str(value)))
    request.annotations.append(annotation)
    if kind == "job":
        return convert.job_submission(request)
    return convert.workflow_submission(request)


def schedule_to_proto(s: Schedule) -> pb.Schedule:
    r = s.row
    out = pb.Schedule(
        id=r["id"],
        description=r["description"],
        cron=r["cron"],
        time_zone=r["time_zone"],
        overlap_policy=r["overlap"],
        catch_up_policy=r["catch_up"],
        paused=bool(r["paused"]),
        last_run_id=r["last_run_id"],
        last_run_state=s.last_run_state,  # type: ignore[arg-type]
        skipped_ticks=r["skipped_ticks"],
        owner=r["owner"],
    )
    if r["interval_us"]:
        out.interval.CopyFrom(convert.us_to_duration(r["interval_us"]))
    if r["jitter_us"]:
        out.jitter.CopyFrom(convert.us_to_duration(r["jitter_us"]))
    if r["catch_up_window_us"]:
        out.catch_up_window.CopyFrom(convert.us_to_duration(r["catch_up_window_us"]))
    if r["kind"] == "job":
        out.job.ParseFromString(r["template"])
    else:
        out.workflow.ParseFromString(r["template"])
    for name, us in (
        ("next_run_time", 0 if r["paused"] else r["next_tick_us"]),
        ("last_run_time", r["last_run_us"]),
        ("buffered_run_time", r["buffered_us"]),
        ("created_at", r["created_us"]),
        ("updated_at", r["updated_us"]),
    ):
        ts = convert.us_to_ts(us)
        if ts is not None:
            getattr(out, name).CopyFrom(ts)
    return out


class ScheduleServicer(FlowServicer):
    """ScheduleService: schedules, and the rate limits (FlowServicer's RPCs)."""

    def __init__(self, schedules: Schedules, limits: RateLimits, auth: Authenticator) -> None:
        super().__init__(limits, auth)
        self._schedules = schedules

    @rpc
    async def CreateSchedule(
        self, request: pb.CreateScheduleRequest, context: Any
    ) -> pb.CreateScheduleResponse:
        principal = self._auth.require(context, Role.SUBMITTER)
        schedule, deduplicated = await self._schedules.create(
            principal.tenant,
            schedule_def(request.schedule),
            Caller(principal.subject, principal.may(Role.REVIEWER)),
        )
        return pb.CreateScheduleResponse(
            schedule=schedule_to_proto(schedule), deduplicated=deduplicated
        )

    @rpc
    async def GetSchedule(
        self, request: pb.GetScheduleRequest, context: Any
    ) -> pb.GetScheduleResponse:
        principal = self._auth.require(context, Role.READER)
        schedule = await self._schedules.get(principal.tenant, request.schedule_id)
        return pb.GetScheduleResponse(schedule=schedule_to_proto(schedule))

    @rpc
    async def ListSchedules(
        self, request: pb.ListSchedulesRequest, context: Any
    ) -> pb.ListSchedulesResponse:
        principal = self._auth.require(context, Role.READER)
        items, token = await self._schedules.list(
            principal.tenant, request.page_size, request.page_token
        )
        return pb.ListSchedulesResponse(
            schedules=[schedule_to_proto(s) for s in items], next_page_token=token
        )

    @rpc
    async def UpdateSchedule(
        self, request: pb.UpdateScheduleRequest, context: Any
    ) -> pb.UpdateScheduleResponse:
        principal = self._auth.require(context, Role.SUBMITTER)
        schedule = await self._schedules.update(
            principal.tenant,
            schedule_def(request.schedule),
            Caller(principal.subject, principal.may(Role.REVIEWER)),
        )
        return pb.UpdateScheduleResponse(schedule=schedule_to_proto(schedule))

    @rpc
    async def DeleteSchedule(
        self, request: pb.DeleteScheduleRequest, context: Any
    ) -> pb.DeleteScheduleResponse:
        principal = self._auth.require(context, Role.SUBMITTER)
        await self._schedules.delete(principal.tenant, request.schedule_id)
        return pb.DeleteScheduleResponse()

    @rpc
    async def PauseSchedule(
        self, request: pb.PauseScheduleRequest, context: Any
    ) -> pb.PauseScheduleResponse:
        principal = self._auth.require(context, Role.SUBMITTER)
        schedule = await self._schedules.set_paused(principal.tenant, request.schedule_id, True)
        return pb.PauseScheduleResponse(schedule=schedule_to_proto(schedule))

    @rpc
    async def ResumeSchedule(
        self, request: pb.ResumeScheduleRequest, context: Any
    ) -> pb.ResumeScheduleResponse:
        principal = self._auth.require(context, Role.SUBMITTER)
        schedule = await self._schedules.set_paused(principal.tenant, request.schedule_id, False)
        return pb.ResumeScheduleResponse(schedule=schedule_to_proto(schedule))

    @rpc
    async def TriggerSchedule(
        self, request: pb.TriggerScheduleRequest, context: Any
    ) -> pb.TriggerScheduleResponse:
        principal = self._auth.require(context, Role.SUBMITTER)
        run_id, deduplicated = await self._schedules.trigger(
            principal.tenant,
            request.schedule_id,
            request.request_id,
            Caller(principal.subject, principal.may(Role.REVIEWER)),
        )
        return pb.TriggerScheduleResponse(run_id=run_id, deduplicated=deduplicated)
