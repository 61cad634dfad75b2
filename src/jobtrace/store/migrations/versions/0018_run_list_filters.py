"""Jobs, workflows and attestations are listed across runs by user, worker,
service, state, labels and time: the user each run was requested for and the
service of each job's attestation as columns (backfilled here), each run's
labels as rows of job_labels / workflow_labels (kept by a trigger on insert),
and the tenant-scoped indexes of those filters, in the listings' keyset order.

Revision ID: 0018
Revises: 0017
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

INDEXES = (
    ("jobs", "ix_jobs_tenant_user_seq", ["tenant", "user_id", "seq"]),
    ("jobs", "ix_jobs_tenant_worker_seq", ["tenant", "worker_id", "seq"]),
    ("jobs", "ix_jobs_tenant_created", ["tenant", "created_us"]),
    ("jobs", "ix_jobs_tenant_service_seq", ["tenant", "service", "seq"]),
    ("workflows", "ix_workflows_tenant_user_seq", ["tenant", "user_id", "seq"]),
    ("workflows", "ix_workflows_tenant_created", ["tenant", "created_us"]),
    ("attestations", "ix_attestations_tenant_seq", ["tenant", "seq"]),
    ("attestations", "ix_attestations_tenant_state_seq", ["tenant", "state", "seq"]),
    ("attestations", "ix_attestations_tenant_service_seq", ["tenant", "service", "seq"]),
    ("attestations", "ix_attestations_tenant_user_seq", ["tenant", "user_id", "seq"]),
    ("attestations", "ix_attestations_tenant_worker_seq", ["tenant", "worker_id", "seq"]),
    ("attestations", "ix_attestations_tenant_created", ["tenant", "created_us"]),
)
# (table of runs, its label table, the label table's column naming the run's seq)
LABELLED = (("jobs", "job_labels", "job_seq"), ("workflows", "workflow_labels", "workflow_seq"))


def _sqlite_trigger(runs: str, labels: str, ref: str) -> str:
    return (
        f"CREATE TRIGGER tr_{labels} AFTER INSERT ON {runs} WHEN NEW.labels <> '{{}}' BEGIN "
        f"INSERT INTO {labels} (tenant, key, value, {ref}) "
        f"SELECT NEW.tenant, l.key, l.value, NEW.seq FROM json_each(NEW.labels) AS l; END"
    )


def _pg_trigger(runs: str, labels: str, ref: str) -> list[str]:
    return [
        f"CREATE FUNCTION tr_{labels}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"INSERT INTO {labels} (tenant, key, value, {ref}) "
        f"SELECT NEW.tenant, l.key, l.value, NEW.seq FROM jsonb_each_text(NEW.labels::jsonb) AS l; "
        "RETURN NULL; END $$",
        f"CREATE TRIGGER tr_{labels} AFTER INSERT ON {runs} FOR EACH ROW "
        f"WHEN (NEW.labels <> '{{}}') EXECUTE FUNCTION tr_{labels}()",
    ]


def upgrade() -> None:
    pg = op.get_bind().dialect.name == "postgresql"
    for table in ("jobs", "workflows", "attestations"):
        op.add_column(
            table, sa.Column("user_id", sa.String(256), nullable=False, server_default="")
        )
    op.add_column(
        "attestations", sa.Column("service", sa.String(128), nullable=False, server_default="")
    )
    if pg:
        # A row whose text is not JSON (tampered with) is left without, as
        # SQLite's json_valid leaves it, instead of failing the upgrade.
        op.execute(
            "CREATE FUNCTION pg_temp.jobtrace_jsonb(t text) RETURNS jsonb LANGUAGE plpgsql"
            " IMMUTABLE AS $$ BEGIN RETURN t::jsonb; EXCEPTION WHEN others THEN RETURN NULL;"
            " END $$"
        )
        user = "pg_temp.jobtrace_jsonb(request_context) #>> '{user_context,user_id}'"
        op.execute(f"UPDATE jobs SET user_id = COALESCE({user}, '') WHERE workflow_id = ''")
        op.execute(f"UPDATE workflows SET user_id = COALESCE({user}, '')")
        op.execute(
            "UPDATE attestations SET user_id = COALESCE("
            "pg_temp.jobtrace_jsonb(data) #>> '{request_context,user_context,user_id}', ''),"
            " service = COALESCE(pg_temp.jobtrace_jsonb(data) ->> 'service', '')"
        )
    else:
        user = "json_extract(request_context, '$.user_context.user_id')"
        op.execute(
            f"UPDATE jobs SET user_id = COALESCE({user}, '')"
            " WHERE workflow_id = '' AND json_valid(request_context)"
        )
        op.execute(
            f"UPDATE workflows SET user_id = COALESCE({user}, '') WHERE json_valid(request_context)"
        )
        op.execute(
            "UPDATE attestations SET"
            " user_id = COALESCE(json_extract(data, '$.request_context.user_context.user_id'), ''),"
            " service = COALESCE(json_extract(data, '$.service'), '') WHERE json_valid(data)"
        )
    # Steps are requested for their workflow's user.
    op.execute(
        "UPDATE jobs SET user_id ="
        " (SELECT w.user_id FROM workflows w WHERE w.id = jobs.workflow_id)"
        " WHERE workflow_id <> ''"
    )
    for runs, labels, ref in LABELLED:
        op.create_table(
            labels,
            sa.Column("tenant", sa.String(128), primary_key=True),
            sa.Column("key", sa.String(128), primary_key=True),
            sa.Column("value", sa.String(256), primary_key=True),
            sa.Column(ref, sa.BigInteger(), primary_key=True),
        )
        # Every run's labels so far.
        # (Labels that are no JSON object, tampered with, are left out.)
        if pg:
            each = (
                "jsonb_each_text(CASE WHEN jsonb_typeof(pg_temp.jobtrace_jsonb(r.labels))"
                " = 'object' THEN pg_temp.jobtrace_jsonb(r.labels) END)"
            )
        else:
            each = (
                "json_each(CASE WHEN json_valid(r.labels) AND json_type(r.labels) = 'object'"
                " THEN r.labels ELSE '{}' END)"
            )
        op.execute(
            f"INSERT INTO {labels} (tenant, key, value, {ref}) "
            f"SELECT r.tenant, l.key, l.value, r.seq FROM {runs} r, {each} AS l "
            "WHERE r.labels <> '{}'"
        )
        triggers = _pg_trigger(runs, labels, ref) if pg else [_sqlite_trigger(runs, labels, ref)]
        for statement in triggers:
            op.execute(statement)
    if pg:
        op.execute("DROP FUNCTION pg_temp.jobtrace_jsonb(text)")
    for table, name, columns in INDEXES:
        op.create_index(name, table, columns)


def downgrade() -> None:
    pg = op.get_bind().dialect.name == "postgresql"
    for table, name, _ in reversed(INDEXES):
        op.drop_index(name, table_name=table)
    for runs, labels, _ in reversed(LABELLED):
        op.execute(f"DROP TRIGGER tr_{labels}" + (f" ON {runs}" if pg else ""))
        if pg:
            op.execute(f"DROP FUNCTION tr_{labels}()")
        op.drop_table(labels)
    with op.batch_alter_table("attestations") as batch:
        batch.drop_column("service")
    for table in ("attestations", "workflows", "jobs"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("user_id")
