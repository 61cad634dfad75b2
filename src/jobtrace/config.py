"""Typed settings, built from CLI flags over JOBTRACE_* environment variables over defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

DEFAULT_DB = "sqlite+aiosqlite:///./jobtrace.db"


def database_url(value: str) -> str:
    """A SQLAlchemy async URL; a bare path means a SQLite file."""
    if "://" in value:
        return value
    return f"sqlite+aiosqlite:///{Path(value)}"


@dataclass(frozen=True, slots=True)
class Settings:
    # Address to listen on, HOST:PORT; port 0 picks a free one.
    listen: str = "127.0.0.1:50051"
    # SQLAlchemy async URL of the database (or a SQLite file path).
    db: str = DEFAULT_DB
    # Start on a PostgreSQL whose synchronous_commit is off (refused otherwise:
    # a database crash would lose acknowledged writes); logged as a warning.
    allow_async_commit: bool = False
    # Run the event loop on uvloop (a libuv loop, faster per call and per
    # statement) when it is installed; off: asyncio's own loop.
    uvloop: bool = True
    # How often storage is probed (SELECT 1); health is NOT_SERVING while it fails.
    storage_probe_seconds: float = 1.0
    # Largest request or response message, in bytes.
    max_message_bytes: int = 8 * 1024 * 1024
    # Lease length granted per assignment, renewed by heartbeats.
    lease_seconds: float = 30.0
    # Heartbeat interval asked of workers.
    heartbeat_seconds: float = 10.0
    # A lost worker stream's leases wait this long for the worker to reconnect
    # (and resume them) before they are given back; None: one heartbeat
    # interval. Never beyond the lease.
    reconnect_grace_seconds: float | None = None
    # On SIGTERM: how long in-flight calls may take to finish.
    shutdown_grace_seconds: float = 10.0
    # Trace events older than this are deleted by a background sweep.
    trace_retention_days: float = 30.0
    # Idle trace streams get a keepalive frame this often.
    keepalive_seconds: float = 15.0
    # Ed25519 signing key (PEM); created on first start. Default: beside the database.
    signing_key_file: str = ""
    # Attestations older than this are deleted by a background sweep.
    attestation_retention_days: float = 7.0
    # How often the retention sweeps delete expired attestations and trace events.
    retention_sweep_seconds: float = 60.0
    # Bearer tokens: a YAML/JSON file of token hashes -> subject, tenant, roles.
    tokens_file: str = ""
    # JWT bearer tokens: HS256 (secret of at least 32 bytes) or RS256 (public key PEM file).
    jwt_algorithm: str = "HS256"
    jwt_secret: str = ""
    jwt_public_key_file: str = ""
    jwt_issuer: str = ""
    jwt_audience: str = "jobtrace"
    # Accept bearer tokens over plaintext on a non-loopback address (no
    # --tls-cert); refused otherwise, since anyone on the path could read them.
    # Logged as a warning.
    allow_insecure_auth: bool = False
    # TLS: server certificate and key (PEM); a client CA makes client certificates required.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    # The tokens file, the JWT public key file, the TLS files and the failure
    # rules file are checked for
    # changes this often, and reloaded when changed (also on SIGHUP); 0: on SIGHUP only.
    reload_interval_seconds: float = 2.0
    # Failure rules (YAML): how failed attempts are classified and retried;
    # see jobtrace.domain.failure_rules. Reloaded as the files above are; a
    # file that does not load keeps the rules in service.
    failure_rules: str = ""
    # Open streams (watches, trace streams, worker sessions) one caller may hold.
    max_streams_per_caller: int = 1000
    # Calls (HTTP/2 streams: unary calls and streams alike) one connection may
    # have in progress; the peer's next one is refused at the HTTP/2 layer
    # (RST_STREAM REFUSED_STREAM), and a well-behaved client queues it.
    max_calls_per_connection: int = 1000
    # Calls in progress in the whole server, over all connections, including
    # ones whose request has not arrived yet; past it a new call is answered
    # RESOURCE_EXHAUSTED at once. Bounds the memory that calls can hold.
    max_concurrent_calls: int = 10_000
    # Jobs a tenant may have waiting (QUEUED or PENDING) at once.
    max_queued_per_tenant: int = 100_000
    # Connections are recycled after this long: new calls move to a fresh
    # connection (clients reconnect transparently); streams already open on the
    # old one, such as worker streams, live on until they end.
    max_connection_age_seconds: float = 3600.0
    # A server stream (trace stream, watch, worker session) whose reader takes
    # nothing for this long ends RESOURCE_EXHAUSTED (READER_STALLED), releasing
    # what it holds.
    stream_stall_seconds: float = 30.0
    # The HTTP listener, HOST:PORT (port 0 picks a free one); empty: off.
    # JobService, TraceService and AttestationService over Connect (JSON and
    # binary, server streams over HTTP/1.1) and an EventSource endpoint of a
    # run's trace, in the same process as the gRPC server and under the same
    # authentication and limits. Plaintext: beyond loopback it needs
    # credentials and --allow-insecure-auth, like a gRPC listener without TLS.
    http_listen: str = ""
    # Origins (scheme://host[:port]) whose pages may call the HTTP listener
    # (CORS); none by default.
    cors_origins: tuple[str, ...] = ()
    # An EventSource stream is closed after this long (the browser reconnects
    # and resumes with Last-Event-ID); 0: never.
    http_max_stream_seconds: float = 0.0
    # How often each replica's scanner looks for due schedule ticks; 0: off
    # (this replica fires no schedule; others still do).
    schedule_scan_seconds: float = 1.0
    # Logging level name.
    log_level: str = "INFO"
    # Log lines: "json" (one object per line) or "text".
    log_format: str = "json"
    # Prometheus metrics over HTTP on this port; None: off, 0: pick a free port.
    metrics_port: int | None = None
    # Address the metrics endpoint binds; empty: the host part of `listen`.
    metrics_host: str = "127.0.0.1"
    # Services (tenant-chosen names) with a metrics label value of their own;
    # the rest are counted under service="(other)", so series stay bounded.
    metrics_max_services: int = 200
    # A metrics connection that sends nothing for this long is closed.
    metrics_idle_timeout_seconds: float = 10.0
    # OpenTelemetry over OTLP/gRPC (spans per RPC, run and attempt; the
    # service.heartbeat gauge; the Prometheus metrics): the collector's
    # endpoint, e.g. http://127.0.0.1:4317 (plaintext) or https://...; empty:
    # the standard OTEL_EXPORTER_OTLP_* variables, off when none is set.
    otlp_endpoint: str = ""
    # How often the heartbeat and the metrics are exported, seconds; None:
    # OTEL_METRIC_EXPORT_INTERVAL (milliseconds), else 15.
    otlp_heartbeat_seconds: float | None = None
    # The resource attribute deployment.environment (e.g. "production");
    # empty: as OTEL_RESOURCE_ATTRIBUTES says, if it does.
    deployment_environment: str = ""
    # Redaction of evidence (attestations, trace events, annotations): member
    # names matching these regular expressions (any case) are secrets too, and
    # so are these header names; see jobtrace.domain.redact. As environment
    # variables, one rule per line.
    redact_keys: tuple[str, ...] = ()
    redact_headers: tuple[str, ...] = ()
    # Turn the default rules off (raw evidence; logged as a warning at startup).
    no_default_redaction: bool = False

    @classmethod
    def load(
        cls, overrides: dict[str, Any] | None = None, env: dict[str, str] | None = None
    ) -> Settings:
        env = dict(os.environ) if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"JOBTRACE_{f.name.upper()}")
            if raw is not None:
                values[f.name] = _parse(f.type, raw)
        for key, value in (overrides or {}).items():
            if value is not None:
                values[key] = value
        settings = cls(**values)
        return settings.normalized()

    def normalized(self) -> Settings:
        from dataclasses import replace

        return replace(self, db=database_url(self.db))

    def key_path(self) -> Path:
        """Where the signing key lives: the configured file, or beside a SQLite
        database, or ./jobtrace-signing.key."""
        if self.signing_key_file:
            return Path(self.signing_key_file)
        from sqlalchemy.engine import make_url

        url = make_url(self.db)
        if url.get_backend_name() == "sqlite" and url.database:
            return Path(url.database).parent / "jobtrace-signing.key"
        return Path("jobtrace-signing.key")


def _parse(kind: Any, raw: str) -> Any:
    kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    inner = kind.replace(" ", "").removesuffix("|None")
    if inner != kind.replace(" ", ""):
        # Optional: empty, "none" or "off" means unset.
        return None if raw.strip().lower() in {"", "none", "off"} else _parse(inner, raw)
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    if kind.startswith("tuple"):
        return tuple(line.strip() for line in raw.splitlines() if line.strip())
    if kind == "bool":
        return raw.lower() in {"1", "true", "yes", "on"}
    return raw
