"""Failed attempts as the failures summary counts them: one row each, and the summary query."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from jobtrace.model import FailureGroup
from jobtrace.store import sql
from jobtrace.store.sql import Query

# A failure's message is kept this long here (its whole text is on the job and
# in its trace event): enough to recognise it in a summary.
MAX_MESSAGE = 1000
MAX_GROUPS = 1000

_INSERT = Query(
    "INSERT INTO failures (tenant, job_id, attempt, service, kind, code, message, failed_us)"
    " VALUES (:tenant, :job_id, :attempt, :service, :kind, :code, :message, :failed_us)"
)


def _summary(by_tenant: bool, by_service: bool) -> Query:
    where = "failed_us >= :since AND failed_us < :until"
    if by_tenant:  # an admin's summary covers every tenant
        where = "tenant = :tenant AND " + where
    if by_service:
        where += " AND service = :service"
    return Query(
        "SELECT f.kind, f.service, g.n, f.job_id, f.attempt, f.failed_us, f.code, f.message"
        " FROM (SELECT kind, service, count(*) AS n, max(seq) AS last FROM failures"
        f" WHERE {where} GROUP BY kind, service) AS g JOIN failures f ON f.seq = g.last"
        f" ORDER BY g.n DESC, f.kind, f.service LIMIT {MAX_GROUPS}"
    )


_SUMMARY = {(t, s): _summary(t, s) for t in (False, True) for s in (False, True)}


async def insert_failure(
    session: AsyncSession,
    *,
    tenant: str,
    job_id: str,
    attempt: int,
    service: str,
    kind: str,
    code: str,
    message: str,
    failed_us: int,
) -> None:
    await sql.execute(
        session,
        _INSERT,
        {
            "tenant": tenant,
            "job_id": job_id,
            "attempt": attempt,
            "service": service,
            "kind": kind,
            "code": code,
            "message": message[:MAX_MESSAGE],
            "failed_us": failed_us,
        },
    )


async def summarize(
    session: AsyncSession, tenant: str | None, since_us: int, until_us: int, service: str = ""
) -> list[FailureGroup]:
    """The tenant's (None: every tenant's) failed attempts in [since, until),
    grouped by kind and service, most first, each with its last failure."""
    params: sql.Params = {"since": since_us, "until": until_us}
    if tenant is not None:
        params["tenant"] = tenant
    if service:
        params["service"] = service
    rows = await sql.fetch(session, _SUMMARY[tenant is not None, bool(service)], params)
    return [
        FailureGroup(
            kind=r["kind"],
            service=r["service"],
            count=int(r["n"]),
            job_id=r["job_id"],
            attempt=int(r["attempt"]),
            failed_us=int(r["failed_us"]),
            code=r["code"],
            message=r["message"],
        )
        for r in rows
    ]


_DELETE_OLDER = Query(
    "DELETE FROM failures WHERE seq IN (SELECT seq FROM failures WHERE failed_us < :cutoff"
    " ORDER BY failed_us LIMIT :limit)"
)


async def delete_older_than(session: AsyncSession, cutoff_us: int, limit: int) -> int:
    """Delete up to `limit` of the oldest failures recorded before the cutoff."""
    return await sql.execute(session, _DELETE_OLDER, {"cutoff": cutoff_us, "limit": limit})
