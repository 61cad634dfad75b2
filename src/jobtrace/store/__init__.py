"""Persistence: SQLAlchemy 2 async tables, queries, group commit and migrations."""
