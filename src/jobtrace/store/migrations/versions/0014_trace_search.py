"""Full-text search over trace events' message and user_message, kept in step
with every insert and delete by the database itself, existing events indexed.

PostgreSQL: a stored generated tsvector column with a GIN index. SQLite: an
external-content FTS5 table over trace_events (it keeps only the index, and
reads the text from trace_events by rowid) with triggers. Both index the same
words: runs of letters and digits, lowercased, never stemmed nor dropped as
stop words ('simple', not 'english': identifiers such as CUDA, OOM, E11000 or
job ids stay as they are, and "not found" keeps its "not"); punctuation
separates words on both (PostgreSQL's parser would otherwise keep
example.com or 1.2.3 as one word that SQLite splits).

Whatever rebuilds trace_events on SQLite (a batch migration that copies it)
drops the triggers and renumbers rowids: it must recreate both and run
INSERT INTO trace_events_search(trace_events_search) VALUES ('rebuild').

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

# The words of an event, as store/search.py matches them.
PG_VECTOR = (
    "to_tsvector('simple'::regconfig, regexp_replace("
    "message || ' ' || user_message, '[^[:alnum:]]+', ' ', 'g'))"
)

SQLITE = (
    # Letters and digits only, as PostgreSQL's [:alnum:] runs; diacritics kept
    # (PostgreSQL's 'simple' keeps them too). No column sizes: they serve
    # ranking (bm25) alone, which search does not use (newest first), and
    # would cost a write per event.
    "CREATE VIRTUAL TABLE trace_events_search USING fts5("
    "message, user_message, content='trace_events', content_rowid='rowid',"
    " columnsize=0, tokenize='unicode61 remove_diacritics 0')",
    "CREATE TRIGGER trace_events_search_insert AFTER INSERT ON trace_events BEGIN"
    " INSERT INTO trace_events_search (rowid, message, user_message)"
    " VALUES (new.rowid, new.message, new.user_message); END",
    # An external-content index deletes by the values it indexed.
    "CREATE TRIGGER trace_events_search_delete AFTER DELETE ON trace_events BEGIN"
    " INSERT INTO trace_events_search (trace_events_search, rowid, message, user_message)"
    " VALUES ('delete', old.rowid, old.message, old.user_message); END",
    # Events are never updated; should one be, its words follow.
    "CREATE TRIGGER trace_events_search_update AFTER UPDATE OF message, user_message"
    " ON trace_events BEGIN"
    " INSERT INTO trace_events_search (trace_events_search, rowid, message, user_message)"
    " VALUES ('delete', old.rowid, old.message, old.user_message);"
    " INSERT INTO trace_events_search (rowid, message, user_message)"
    " VALUES (new.rowid, new.message, new.user_message); END",
    # The events stored before this revision.
    "INSERT INTO trace_events_search (trace_events_search) VALUES ('rebuild')",
)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # Adding a stored generated column computes it for every existing row.
        op.execute(
            "ALTER TABLE trace_events ADD COLUMN search_vector tsvector"
            f" GENERATED ALWAYS AS ({PG_VECTOR}) STORED"
        )
        op.execute("CREATE INDEX ix_trace_events_search ON trace_events USING gin (search_vector)")
        return
    for statement in SQLITE:
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP INDEX ix_trace_events_search")
        op.execute("ALTER TABLE trace_events DROP COLUMN search_vector")
        return
    for trigger in ("insert", "delete", "update"):
        op.execute(f"DROP TRIGGER trace_events_search_{trigger}")
    op.execute("DROP TABLE trace_events_search")
