"""CLI commands that run or administer a server: serve, worker, token new, keys rotate,
and the offline `attest verify`."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable

from jobtrace.config import Settings


def serve(args: argparse.Namespace) -> int:
    from jobtrace.server import JobtraceServer

    settings = Settings.load(
        {
            "listen": args.listen,
            "db": args.db,
            "max_message_bytes": args.max_message_bytes,
            "lease_seconds": args.lease_seconds,
            "heartbeat_seconds": args.heartbeat_seconds,
            "reconnect_grace_seconds": args.reconnect_grace_seconds,
            "log_level": args.log_level,
            "trace_retention_days": args.trace_retention_days,
            "keepalive_seconds": args.keepalive_seconds,
            "signing_key_file": args.signing_key_file,
            "attestation_retention_days": args.attestation_retention_days,
            "retention_sweep_seconds": args.retention_sweep_seconds,
            "allow_async_commit": args.allow_async_commit,
            "uvloop": args.uvloop,
            "storage_probe_seconds": args.storage_probe_seconds,
            "tokens_file": args.tokens_file,
            "jwt_algorithm": args.jwt_algorithm,
            "jwt_public_key_file": args.jwt_public_key_file,
            "jwt_issuer": args.jwt_issuer,
            "jwt_audience": args.jwt_audience,
            "allow_insecure_auth": args.allow_insecure_auth,
            "tls_cert": args.tls_cert,
            "tls_key": args.tls_key,
            "tls_client_ca": args.tls_client_ca,
            "reload_interval_seconds": args.reload_interval_seconds,
            "failure_rules": args.failure_rules,
            "max_streams_per_caller": args.max_streams_per_caller,
            "max_queued_per_tenant": args.max_queued_per_tenant,
            "stream_stall_seconds": args.stream_stall_seconds,
            "max_calls_per_connection": args.max_calls_per_connection,
            "max_concurrent_calls": args.max_concurrent_calls,
            "metrics_port": args.metrics_port,
            "metrics_host": args.metrics_host,
            "metrics_max_services": args.metrics_max_services,
            "metrics_idle_timeout_seconds": args.metrics_idle_timeout_seconds,
            "schedule_scan_seconds": args.schedule_scan_seconds,
            "log_format": args.log_format,
            "redact_keys": tuple(args.redact_key) if args.redact_key else None,
            "redact_headers": tuple(args.redact_header) if args.redact_header else None,
            "no_default_redaction": args.no_default_redaction,
            "http_listen": args.http_listen,
            "cors_origins": tuple(args.cors_origin) if args.cors_origin else None,
            "http_max_stream_seconds": args.http_max_stream_seconds,
            "otlp_endpoint": args.otlp_endpoint,
            "otlp_heartbeat_seconds": args.otlp_heartbeat_seconds,
            "deployment_environment": args.deployment_environment,
        }
    )
    from jobtrace import logs

    logs.configure(settings.log_level, settings.log_format)

    # The database driver works in a thread: hand the GIL over sooner than the
    # default 5 ms so a busy event loop does not stall every query behind it.
    sys.setswitchinterval(0.0005)

    async def run() -> None:
        server = JobtraceServer(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # SIGHUP reloads the credential and failure rules files (by default it
        # would end the process).
        loop.add_signal_handler(signal.SIGHUP, server.reload_credentials)
        await server.start()
        await stop.wait()
        await server.stop()

    try:
        with asyncio.Runner(loop_factory=event_loop_factory(settings.uvloop)) as runner:
            runner.run(run())
    except OSError as exc:
        print(f"jobtrace serve: {exc}", file=sys.stderr)
        return 1
    return 0


def event_loop_factory(use_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when wanted and installed (it is a dependency, but a
    platform without a wheel may lack it), else asyncio's default."""
    if not use_uvloop:
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def worker(args: argparse.Namespace) -> int:
    from jobtrace.client.worker import JobContext, Worker

    if not args.demo:
        print(
            "jobtrace worker: only --demo is built in; write handlers with jobtrace.client.Worker",
            file=sys.stderr,
        )
        return 2
    from jobtrace import logs
    from jobtrace.cli.client_commands import endpoint_of, parse_pairs

    logs.configure(args.log_level, args.log_format)
    if not 0 <= args.report_window_ms <= 1000:
        print("jobtrace worker: --report-window-ms must be between 0 and 1000", file=sys.stderr)
        return 2

    worker = Worker(
        endpoint=endpoint_of(args),
        worker_id=args.worker_id,
        max_concurrency=args.concurrency,
        affinity_keys=tuple(args.affinity or ()),
        labels=parse_pairs(args.label, "--label"),
        report_window_ms=args.report_window_ms,
    )

    async def demo(job: JobContext) -> dict[str, object]:
        """Sleeps payload.seconds (default 2) in four steps, reporting progress."""
        seconds = float(job.payload.get("seconds", 2))
        if job.payload.get("fail"):
            raise RuntimeError(str(job.payload["fail"]))
        for step in range(1, 5):
            await asyncio.sleep(seconds / 4)
            await job.progress(step * 25.0, f"step {step} of 4")
        return {"slept_seconds": seconds, "worker_id": worker.worker_id, "attempt": job.attempt}

    for service in args.service or ["demo"]:
        worker.handler(service)(demo)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(worker.drain()))
        await worker.run()

    asyncio.run(run())
    return 0


def attest_verify_offline(args: argparse.Namespace) -> int:
    """Offline: check an exported DSSE envelope against public keys alone."""
    import json
    from pathlib import Path

    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    from jobtrace.dsse import key_id_of, load_public_key, verify_offline

    keys = {}
    try:
        for path in args.public_key:
            key = load_public_key(Path(path).read_text())
            raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            keys[key_id_of(raw)] = key
    except (OSError, ValueError, UnsupportedAlgorithm) as exc:
        print(f"jobtrace attest verify: cannot read public key: {_one_line(exc)}", file=sys.stderr)
        return 2
    try:
        envelope = json.loads(Path(args.target_key).read_text())
        # verify_offline checks the envelope's shape first: a malformed one is
        # a ValueError naming its first wrong part.
        verdict = verify_offline(envelope, keys)
    except RecursionError:
        print("jobtrace attest verify: cannot read envelope: nested too deeply", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"jobtrace attest verify: cannot read envelope: {_one_line(exc)}", file=sys.stderr)
        return 2
    result = {
        "valid": verdict.valid,
        "offline": True,
        "digest_valid": verdict.digest_valid,
        "signature_valid": verdict.signature_valid,
        # One attestation alone cannot show its place in the hash chain: the
        # server's VerifyAttestation (`jobtrace attest verify KEY`) checks that.
        "chain_checked": verdict.chain_checked,
        "reason": verdict.reason,
    }
    if args.json:
        print(json.dumps(result))
    elif verdict.valid:
        print("valid (signature and digest; the hash chain is checked by the server)")
    else:
        print(f"INVALID: {verdict.reason}")
    return 0 if verdict.valid else 1


def _one_line(exc: Exception) -> str:
    """An error as one line of text (some carry newlines, or nothing at all)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def keys_rotate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from jobtrace.domain.attest import rotate_key_file

    old, new = rotate_key_file(Path(args.key_file))
    print(f"retired {old}; new signing key {new} (takes effect when the server restarts)")
    return 0


def token_new(args: argparse.Namespace) -> int:
    """Print a new random token and the tokens-file entry that admits it."""
    import secrets

    import yaml

    from jobtrace.auth import RESERVED_SUBJECTS, Role, hash_token

    if args.subject in RESERVED_SUBJECTS:
        print(
            f"jobtrace token new: subject {args.subject!r} is reserved "
            f"({', '.join(sorted(RESERVED_SUBJECTS))} are what jobtrace records itself)",
            file=sys.stderr,
        )
        return 2
    roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    try:
        [Role(r) for r in roles]
    except ValueError:
        print(f"jobtrace token new: roles must be among {[r.value for r in Role]}", file=sys.stderr)
        return 2
    token = "jt_" + secrets.token_urlsafe(32)
    entry: dict[str, object] = {
        "sha256": hash_token(token),
        "subject": args.subject,
        "tenant": args.tenant,
        "roles": roles,
    }
    if args.services:
        entry["services"] = args.services.split(",")
    print(f"# token (give it to the caller; it is not stored anywhere): {token}")
    print(yaml.safe_dump({"tokens": [entry]}, sort_keys=False), end="")
    return 0
