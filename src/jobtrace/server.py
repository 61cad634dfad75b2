"""Boot and shutdown: the gRPC server, health, reflection and the services."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jobtrace.api.attestation_service import AttestationServicer
from jobtrace.api.handlers import add_service
from jobtrace.api.health import follow_storage
from jobtrace.api.interceptor import CallObserver
from jobtrace.api.job_service import JobServicer
from jobtrace.api.limits import PageBytes, StreamLimiter
from jobtrace.api.schedule_service import ScheduleServicer, build
from jobtrace.api.trace_service import TraceServicer
from jobtrace.api.worker_service import WorkerServicer
from jobtrace.auth import Authenticator, JwtSettings
from jobtrace.auth.reload import CredentialFiles, read_jwt_public_key
from jobtrace.clock import Clock
from jobtrace.config import Settings
from jobtrace.domain import failures
from jobtrace.domain.annotations import Annotations
from jobtrace.domain.attest import Attestor, Signer
from jobtrace.domain.dispatch import Scheduler
from jobtrace.domain.dispatch.fleet import Fleet
from jobtrace.domain.errors import log_failure
from jobtrace.domain.evidence import data_budget
from jobtrace.domain.failure_rules import FailureRules, load_rules_file
from jobtrace.domain.flow import RateLimits
from jobtrace.domain.jobs import Jobs
from jobtrace.domain.lifecycle import Lifecycle
from jobtrace.domain.pagination import open_tokens
from jobtrace.domain.pause import QUEUES_NOTICE, Pauses
from jobtrace.domain.redact import Redaction, UnsafePattern
from jobtrace.domain.schedules import Schedules
from jobtrace.domain.search import TraceSearch
from jobtrace.domain.summary import RunSummaries
from jobtrace.domain.trace import Trace
from jobtrace.metrics import Metrics, StateSample
from jobtrace.pb import SERVICE_NAMES, service_descriptor
from jobtrace.store.db import Database
from jobtrace.store.statement_count import StatementCounter
from jobtrace.tracing import enabled as otlp_enabled

if TYPE_CHECKING:
    from jobtrace.otel import Telemetry
    from jobtrace.web.listener import HttpListener

log = logging.getLogger(__name__)

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# How long a scrape waits for the queue-depth query before reporting without it.
QUEUE_DEPTH_TIMEOUT_S = 3.0
# gRPC's "no limit" for millisecond channel arguments (INT_MAX).
UNBOUNDED_MS = 2**31 - 1


class JobtraceServer:
    """One jobtrace replica: start() binds and serves, stop() drains and closes."""

    def __init__(
        self, settings: Settings, *, resolve: Resolver | None = None, clock: Clock | None = None
    ) -> None:
        self.settings = settings
        # The schedule scanner's clock (tests give a ManualClock).
        self.clock = clock or Clock()
        # How host names become addresses for the exposure check (tests fake it).
        self._resolve = resolve
        self.db = Database(
            settings.db,
            probe_every_s=settings.storage_probe_seconds,
            allow_async_commit=settings.allow_async_commit,
        )
        self.health = health.aio.HealthServicer()
        self.port = 0
        # The bound metrics port, once serving (settings.metrics_port None: off).
        self.metrics_port: int | None = None
        self.metrics: Metrics | None = None
        self.shutting_down = asyncio.Event()
        self._server: grpc.aio.Server | None = None
        self.credential_files: CredentialFiles | None = None
        # The HTTP listener (settings.http_listen) and its bound port, once serving.
        self.http: HttpListener | None = None
        self.http_port: int | None = None
        # OpenTelemetry (settings.otlp_endpoint or OTEL_EXPORTER_OTLP_*), once started.
        self.telemetry: Telemetry | None = None

    async def start(self) -> int:
        try:
            return await self._start()
        except BaseException:
            if self.telemetry is not None:  # started before the failure: stop its threads
                await asyncio.to_thread(self.telemetry.shutdown)
                self.telemetry = None
            raise

    async def _start(self) -> int:
        s = self.settings
        auth = build_authenticator(s)
        check_exposure(s, auth, self._resolve or resolve)
        if not s.stream_stall_seconds > 0:
            raise OSError("--stream-stall-seconds must be positive")
        if s.max_calls_per_connection < 1 or s.max_concurrent_calls < 1:
            raise OSError("--max-calls-per-connection and --max-concurrent-calls must be positive")
        self.auth = auth
        redaction = _redaction(s)
        files = CredentialFiles.open(s, auth)
        self.credential_files = files
        rules = _failure_rules(s)
        streams = StreamLimiter(s.max_streams_per_caller)
        self.streams = streams
        if s.metrics_port is not None:
            if not 0 <= s.metrics_port <= 65535:
                raise OSError(f"invalid metrics port {s.metrics_port} (0-65535)")
            if not s.metrics_idle_timeout_seconds > 0 or s.metrics_max_services < 0:
                raise OSError(
                    "--metrics-idle-timeout-seconds must be positive and "
                    "--metrics-max-services not negative"
                )
        otlp = otlp_enabled(s.otlp_endpoint)
        if s.metrics_port is not None or otlp:
            # OTLP exports the same registry (served over HTTP only with a port).
            self.metrics = Metrics(max_services=s.metrics_max_services)
            self.db.on_batch = self.metrics.batch_committed
        if otlp:
            from jobtrace import otel

            assert self.metrics is not None
            self.telemetry = otel.start(
                otel.Options(
                    endpoint=s.otlp_endpoint,
                    service_name=otel.SERVER_SERVICE_NAME,
                    interval_s=s.otlp_heartbeat_seconds,
                    environment=s.deployment_environment,
                ),
                self.metrics.registry,
            )
            self.db.spans = self.telemetry.run_spans()
        counting = os.environ.get("JOBTRACE_BENCH_COUNT_STATEMENTS") == "1"
        if counting:
            self.db.statement_counter = StatementCounter()
        await self.db.start()
        tokens = await open_tokens(self.db)
        self.trace = Trace(
            self.db,
            tokens,
            retention_s=s.trace_retention_days * 86400,
            keepalive_s=s.keepalive_seconds,
            redaction=redaction,
        )
        self.attestor = Attestor(
            self.db,
            Signer.load_or_create(s.key_path()),
            tokens,
            retention_s=s.attestation_retention_days * 86400,
            redaction=redaction,
        )
        await self.attestor.register_key()
        self.annotations = Annotations(self.db, tokens, self.trace)
        self.search = TraceSearch(self.db, tokens, self.trace)
        life = Lifecycle(
            self.trace, self.attestor, evidence_budget=data_budget(s.max_message_bytes)
        )
        self.lifecycle = life
        life.spans = self.db.spans
        if s.failure_rules:
            life.failure_rules = rules
            files.watch(
                "failure rules",
                Path(s.failure_rules),
                lambda: load_rules_file(Path(s.failure_rules)),
                lambda new: self._use_failure_rules(new),
            )
        jobs = Jobs(self.db, tokens, life, max_queued_per_tenant=s.max_queued_per_tenant)
        self.jobs = jobs
        self.scheduler = Scheduler(
            self.db,
            jobs,
            life,
            lease_ms=int(s.lease_seconds * 1000),
            heartbeat_ms=int(s.heartbeat_seconds * 1000),
            reconnect_grace_ms=(
                None if s.reconnect_grace_seconds is None else int(s.reconnect_grace_seconds * 1000)
            ),
        )
        self.fleet = Fleet(self.db, tokens, self.scheduler, jobs, keepalive_s=s.keepalive_seconds)
        self.pauses = Pauses(self.db, jobs, life, self.scheduler.queues_changed)
        self.schedules = Schedules(self.db, tokens, jobs, build, clock=self.clock)
        options = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            # An aged connection takes no new calls (they move to a fresh one),
            # but its streams live on however long they last: a worker stream
            # holds leases of jobs that may run for hours. Keepalive, not age,
            # finds dead peers.
            ("grpc.max_connection_age_ms", int(s.max_connection_age_seconds * 1000)),
            ("grpc.max_connection_age_grace_ms", UNBOUNDED_MS),
            # Every call is an HTTP/2 stream: a connection may have this many
            # open at once; the peer's next HEADERS is refused (RST_STREAM).
            ("grpc.max_concurrent_streams", s.max_calls_per_connection),
        ]
        observer = CallObserver(self.metrics, stall_s=s.stream_stall_seconds)
        # Calls in progress, whole server: past this, a new call is answered
        # RESOURCE_EXHAUSTED at once (its memory is freed at once too).
        interceptors: list[Any] = [observer]
        if self.telemetry is not None:
            # Inside the observer: the instrumentation wraps the servicers'
            # own handlers (its stream wrapper is an async generator).
            interceptors.append(self.telemetry.server_interceptor())
        server = grpc.aio.server(
            options=options,
            interceptors=interceptors,
            maximum_concurrent_rpcs=s.max_concurrent_calls,
        )
        pages = PageBytes(s.max_message_bytes)
        # One servicer per service, answering gRPC and (--http-listen) Connect calls.
        servicers: dict[str, Any] = {
            "JobService": JobServicer(
                jobs,
                auth,
                streams,
                pages=pages,
                waiting=self.scheduler.waiting_reason,
                pauses=self.pauses,
            ),
            "WorkerService": WorkerServicer(
                self.scheduler, auth, streams, self.fleet, traced=self.telemetry is not None
            ),
            "TraceService": TraceServicer(
                self.trace,
                auth,
                streams,
                pages=pages,
                search=self.search,
                summaries=RunSummaries(self.db, self.trace),
            ),
            "AttestationService": AttestationServicer(
                self.attestor, self.annotations, auth, pages=pages
            ),
            "ScheduleService": ScheduleServicer(self.schedules, RateLimits(self.db), auth),
        }
        for name, servicer in servicers.items():
            add_service(server, service_descriptor(name), servicer)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if os.environ.get("JOBTRACE_BENCH_NOOP") == "1":
            # `jobtrace bench` measures the gRPC ceiling against this empty handler.
            server.add_generic_rpc_handlers((_noop_handler(),))
        if self.db.statement_counter is not None:
            # `jobtrace bench` reads the statements this process has sent.
            server.add_generic_rpc_handlers((_statements_handler(self.db.statement_counter),))
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, HEALTH_SERVICE, reflection.SERVICE_NAME),
            server,
            pool=_MethodAwarePool(descriptor_pool.Default()),
        )
        try:
            if s.tls_cert:
                self.port = server.add_secure_port(s.listen, files.server_credentials())
            else:
                self.port = server.add_insecure_port(s.listen)
        except RuntimeError as exc:
            self.port = 0
            cause: Exception | None = exc
        else:
            cause = None
        if self.port == 0:
            await self.db.close()
            raise OSError(f"could not listen on {s.listen} (address in use or invalid)") from cause
        if s.http_listen:
            from jobtrace.web.listener import HttpListener

            self.http = HttpListener(
                s.http_listen,
                servicers,
                max_message_bytes=s.max_message_bytes,
                max_concurrent_calls=s.max_concurrent_calls,
                cors_origins=s.cors_origins,
                stall_s=s.stream_stall_seconds,
                max_stream_s=s.http_max_stream_seconds or None,
                metrics=self.metrics,
            )
            try:
                self.http_port = self.http.bind()
            except OSError:
                self.http = None
                await self.db.close()
                raise
        if self.metrics is not None:
            self.metrics.sample_state(self._sample_state, asyncio.get_running_loop())
        if self.metrics is not None and s.metrics_port is not None:
            try:
                self.metrics_port = self.metrics.serve(
                    s.metrics_host or listen_host(s.listen),
                    s.metrics_port,
                    idle_timeout_s=s.metrics_idle_timeout_seconds,
                )
            except OSError:
                if self.http is not None:
                    await self.http.stop()
                    self.http = None
                await self.db.close()
                raise
        await server.start()
        self._server = server
        if self.http is not None:
            await self.http.start(s.shutdown_grace_seconds)
        await self.db.listen(self._on_notices, self._on_listen_restored)
        self.scheduler.start()
        # The replica as the fleet view names it: where it listens, and a
        # random id of this process (two processes on one port differ).
        self.fleet.start(f"{socket.gethostname()}:{self.port}/{self.db.replica_id}")
        self.trace.start(s.retention_sweep_seconds)
        if s.schedule_scan_seconds > 0:
            self.schedules.start(s.schedule_scan_seconds)
        files.start(s.reload_interval_seconds)
        self._maintenance = asyncio.create_task(
            self._maintain(s.retention_sweep_seconds), name="jobtrace-retention"
        )
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        for name in SERVICE_NAMES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._health = asyncio.create_task(
            follow_storage(self.health, self.db.availability, SERVICE_NAMES),
            name="jobtrace-health",
        )
        loop_kind = type(asyncio.get_running_loop()).__module__.partition(".")[0]
        log.info(
            "jobtrace listening on %s (port %d), database %s, event loop %s",
            s.listen,
            self.port,
            _redact(s.db),
            loop_kind,
            extra={"port": self.port, "metrics_port": self.metrics_port, "event_loop": loop_kind},
        )
        if self.http is not None:
            log.info(
                "HTTP (Connect, EventSource) on http://%s:%d/",
                listen_host(s.http_listen),
                self.http_port,
                extra={"http_port": self.http_port},
            )
        if self.metrics_port is not None:
            log.info(
                "metrics on http://%s:%d/metrics",
                s.metrics_host or listen_host(s.listen),
                self.metrics_port,
            )
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight unary calls finish, end streams, close the DB."""
        if self._server is None:
            return
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        self._health.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._health
        await self.health.enter_graceful_shutdown()
        self.shutting_down.set()
        self.jobs.stopping.set()
        await self.schedules.stop()
        await self.trace.stop()
        if self.credential_files is not None:
            await self.credential_files.stop()
        self._maintenance.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._maintenance
        await self.scheduler.drain(int(grace * 1000))
        await self.fleet.stop()
        if self.http is not None:
            http_stop = asyncio.ensure_future(self.http.stop(grace))
        await self._server.stop(grace)
        self._server = None
        if self.http is not None:
            await http_stop
            self.http = None
            self.http_port = None
        if self.metrics is not None:
            await self.metrics.close()
            self.metrics_port = None
        if self.telemetry is not None:
            # Flushes the batched spans and a last export of the metrics.
            await asyncio.to_thread(self.telemetry.shutdown)
            self.telemetry = None
        await self.db.close()
        log.info("jobtrace stopped")

    def _use_failure_rules(self, rules: FailureRules) -> str:
        self.lifecycle.failure_rules = rules  # one assignment: every failure sees old or new
        return f"{len(rules.rules)} rules in service"

    def reload_credentials(self) -> None:
        """Reload the tokens file, the JWT public key, the TLS files and the
        failure rules now (SIGHUP);
        before the server has started there is nothing to reload."""
        if self.credential_files is not None:
            self.credential_files.request_reload()

    async def _sample_state(self) -> StateSample:
        """The state metrics report at each scrape (called on the event loop)."""
        sessions = list(self.scheduler.sessions.values())
        watches = self.jobs.feed.subscribers_by_kind()
        fleet = self.fleet.by_service()
        sample = StateSample(
            queue_depth=None,
            connected_workers=len(sessions),
            active_leases=sum(len(session.held) for session in sessions),
            subscribers={
                "trace_stream": self.trace.bus.subscriber_count,
                "job_watch": watches["job"],
                "workflow_watch": watches["workflow"],
                "worker_session": len(sessions),
                "worker_watch": self.fleet.feed.subscriber_count,
            },
            retries=dict(self.lifecycle.retries),
            failures=dict(self.lifecycle.failures),
            lease_expiries=dict(self.scheduler.lease_expiries),
            events_appended=self.trace.events_appended,
            events_delivered=self.trace.events_delivered,
            stream_catchups=self.trace.stream_catchups,
            workers={service: n for service, (n, _, _) in fleet.items()},
            free_slots={service: n for service, (_, n, _) in fleet.items()},
            held_jobs={service: n for service, (_, _, n) in fleet.items()},
        )
        try:
            async with asyncio.timeout(QUEUE_DEPTH_TIMEOUT_S):
                depth = await self.jobs.queue_depth()
        except Exception:
            log.warning("metrics: reading the queue depth failed", exc_info=True)
            return sample
        return replace(sample, queue_depth=[(svc, st.name, n) for svc, st, n in depth])

    def _on_notices(self, notices: list[dict[str, Any]]) -> None:
        """Changes committed by other replicas (PostgreSQL LISTEN/NOTIFY)."""
        for n in notices:
            kind = n.get("k")
            if kind == "jobs":
                for job_id, workflow_id, state, holder, attempt in n.get("j", []):
                    self.scheduler.remote_change(job_id, state, holder, attempt)
                    self.jobs.feed.remote_change(job_id, workflow_id)
            elif kind == "trace":
                self.trace.remote_events(n.get("run", ""))
            elif kind == "end":
                self.trace.bus.poke(n.get("run", ""), run_ended=True)
            elif kind == "workers":
                self.fleet.feed.poke(n.get("s", []))
            elif kind == QUEUES_NOTICE:
                self.scheduler.queues_changed()

    def _on_listen_restored(self) -> None:
        """The LISTEN connection was lost and is back; notices sent meanwhile
        are gone. Every local trace stream and watch catches up from the
        database, and the dispatcher looks for queued work."""
        self.trace.bus.poke_all()
        self.jobs.feed.poke_all()
        self.fleet.feed.poke_all()
        self.scheduler.queues_changed()

    async def _maintain(self, every_s: float = 60.0) -> None:
        """Retention of attestations and failure records; each sweep is a series
        of short writes."""
        while True:
            try:
                pruned = await self.attestor.sweep_once()
                if pruned:
                    log.info("pruned %d expired attestations", pruned)
            except Exception as exc:
                log_failure(log, exc, "attestation sweep failed; retrying later")
            try:
                # Failed attempts are kept as long as trace events (their FAILED events).
                retention_s = self.settings.trace_retention_days * 86400
                pruned = await failures.sweep_once(self.db, retention_s)
                if pruned:
                    log.info("pruned %d expired failure records", pruned)
            except Exception as exc:
                log_failure(log, exc, "failure records sweep failed; retrying later")
            await asyncio.sleep(every_s)

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def _noop_handler() -> grpc.GenericRpcHandler:
    async def ping(request: bytes, context: Any) -> bytes:
        return b""

    return grpc.method_handlers_generic_handler(
        "jobtrace.bench.Noop", {"Ping": grpc.unary_unary_rpc_method_handler(ping)}
    )


def _statements_handler(counter: StatementCounter) -> grpc.GenericRpcHandler:
    """Bench-only (JOBTRACE_BENCH_COUNT_STATEMENTS=1): the statements and
    transactions this process has sent its database, as JSON."""

    async def read(request: bytes, context: Any) -> bytes:
        return json.dumps({**counter.snapshot(), "pid": os.getpid()}).encode()

    return grpc.method_handlers_generic_handler(
        "jobtrace.bench.Statements", {"Read": grpc.unary_unary_rpc_method_handler(read)}
    )


class _MethodAwarePool:
    """The default descriptor pool, plus lookups of methods (and fields) by full
    name, which the upb pool does not index: `grpcurl describe pkg.Service.Method`
    asks for the file containing the method."""

    def __init__(self, pool: descriptor_pool.DescriptorPool) -> None:
        self._pool = pool

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    def FindFileContainingSymbol(self, name: str) -> Any:
        try:
            return self._pool.FindFileContainingSymbol(name)
        except KeyError:
            parent = name.rpartition(".")[0]
            if not parent:
                raise
            return self._pool.FindFileContainingSymbol(parent)


def listen_host(listen: str) -> str:
    host, _, _ = listen.rpartition(":")
    return host


Resolver = Callable[[str], list[str]]


def resolve(host: str) -> list[str]:
    """Every address `host` resolves to (an address resolves to itself)."""
    infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    return sorted({str(info[4][0]) for info in infos})


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def check_exposure(s: Settings, auth: Authenticator, resolve: Resolver = resolve) -> None:
    """Without credentials configured, refuse to listen (or serve metrics)
    beyond loopback; with credentials but no TLS, refuse to listen beyond
    loopback (tokens would cross the network in clear) unless
    --allow-insecure-auth says so. Beyond loopback: any address the host
    resolves to is not a loopback address; a host that does not resolve is an
    error."""
    if s.http_listen:
        check_http_exposure(s, auth, resolve)
    if auth.enabled:
        if s.tls_cert:
            return
        outside = _outside("listen on", s.listen, listen_host(s.listen), resolve)
        if outside is None:
            return
        name, addresses = outside
        if not s.allow_insecure_auth:
            raise OSError(
                f"refusing to accept tokens over plaintext on {s.listen}: {name!r} resolves to "
                f"{addresses}, not a loopback address; configure --tls-cert/--tls-key, "
                "use 127.0.0.1, or pass --allow-insecure-auth"
            )
        log.warning(
            "--allow-insecure-auth: accepting tokens over plaintext on %s (%r resolves to %s); "
            "anyone on the network path can read them",
            s.listen,
            name,
            addresses,
        )
        return
    endpoints = [("listen on", s.listen, listen_host(s.listen))]
    if s.metrics_port is not None:
        host = s.metrics_host or listen_host(s.listen)
        endpoints.append(("serve metrics on", f"{host}:{s.metrics_port}", host))
    for action, where, host in endpoints:
        outside = _outside(action, where, host, resolve)
        if outside is not None:
            name, addresses = outside
            raise OSError(
                f"refusing to {action} {where} without authentication: {name!r} resolves to "
                f"{addresses}, not a loopback address; configure "
                "--tokens-file or --jwt-* (and --tls-cert/--tls-key), or use 127.0.0.1"
            )


def check_http_exposure(s: Settings, auth: Authenticator, resolve: Resolver = resolve) -> None:
    """The HTTP listener under the same rule as a gRPC listener without TLS
    (it is plaintext): beyond loopback only with credentials configured and
    --allow-insecure-auth."""
    outside = _outside("listen for HTTP on", s.http_listen, listen_host(s.http_listen), resolve)
    if outside is None:
        return
    name, addresses = outside
    if not auth.enabled:
        raise OSError(
            f"refusing to listen for HTTP on {s.http_listen} without authentication: {name!r} "
            f"resolves to {addresses}, not a loopback address; configure --tokens-file or "
            "--jwt-*, or use 127.0.0.1"
        )
    if not s.allow_insecure_auth:
        raise OSError(
            f"refusing to accept tokens over plaintext HTTP on {s.http_listen}: {name!r} "
            f"resolves to {addresses}, not a loopback address; use 127.0.0.1 (behind a TLS "
            "proxy), or pass --allow-insecure-auth"
        )
    log.warning(
        "--allow-insecure-auth: accepting tokens over plaintext HTTP on %s (%r resolves to %s)",
        s.http_listen,
        name,
        addresses,
    )


def _outside(action: str, where: str, host: str, resolve: Resolver) -> tuple[str, str] | None:
    """None when `host` is loopback only (or `where` a local socket); else the
    host's name and its non-loopback addresses, for the message."""
    if where.startswith(("unix:", "unix-abstract:")):
        return None  # a local socket
    name = host.removeprefix("[").removesuffix("]")
    if name in ("", "*"):
        addresses = ["0.0.0.0"]  # every interface
    else:
        try:
            addresses = resolve(name)
        except (OSError, UnicodeError) as exc:
            raise OSError(f"cannot resolve {name!r} (to {action} {where}): {exc}") from exc
    outside = [a for a in addresses if not _loopback(a)]
    if outside or not addresses:
        return name, ", ".join(outside) or "nothing"
    return None


# RFC 7518 section 3.2: an HS256 key of at least the hash's size (256 bits).
MIN_HS256_SECRET_BYTES = 32


def build_authenticator(s: Settings) -> Authenticator:
    jwt = None
    if s.jwt_secret or s.jwt_public_key_file:
        if s.jwt_algorithm not in ("HS256", "RS256"):
            raise OSError(f"unsupported JWT algorithm {s.jwt_algorithm!r} (HS256 or RS256)")
        try:
            key = (
                s.jwt_secret
                if s.jwt_algorithm == "HS256"
                else read_jwt_public_key(Path(s.jwt_public_key_file))
            )
        except (OSError, ValueError) as exc:
            raise OSError(f"cannot load the JWT public key: {exc}") from exc
        if s.jwt_algorithm == "HS256" and len(key.encode()) < MIN_HS256_SECRET_BYTES:
            raise OSError(
                f"the HS256 JWT secret (JOBTRACE_JWT_SECRET) is {len(key.encode())} bytes; "
                f"it must be at least {MIN_HS256_SECRET_BYTES} (a short one can be guessed offline)"
            )
        if not s.jwt_issuer:
            raise OSError("--jwt-issuer is required with JWT authentication")
        jwt = JwtSettings(s.jwt_algorithm, key, s.jwt_issuer, s.jwt_audience)
    try:
        return Authenticator.from_files(s.tokens_file, jwt)
    except (OSError, ValueError) as exc:
        raise OSError(f"cannot load tokens: {exc}") from exc


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _failure_rules(s: Settings) -> FailureRules:
    """The failure rules file's rules (none without one); OSError, naming the
    file, the rule and the field, for a file that cannot be used."""
    if not s.failure_rules:
        return FailureRules()
    try:
        rules = load_rules_file(Path(s.failure_rules))
    except (OSError, ValueError) as exc:
        raise OSError(f"cannot load the failure rules: {exc}") from None
    log.info("failure rules: %d rules from %s", len(rules.rules), s.failure_rules)
    return rules


def _redaction(s: Settings) -> Redaction:
    """The redaction rules from the settings; OSError (a startup error) for an
    operator rule that is not safe to apply. Turning the defaults off is logged."""
    try:
        redaction = Redaction.configure(
            defaults=not s.no_default_redaction, headers=s.redact_headers, keys=s.redact_keys
        )
    except UnsafePattern as exc:
        raise OSError(str(exc)) from None
    if s.no_default_redaction:
        log.warning(
            "default redaction is off (--no-default-redaction): credentials sent by "
            "callers and workers may enter attestations, trace events and annotations"
        )
    return redaction
