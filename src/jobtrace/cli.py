"""Command line: `jobtrace serve | ...`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from jobtrace.config import Settings


def _serve(args: argparse.Namespace) -> int:
    from jobtrace.server import JobtraceServer

    settings = Settings.load(
        {
            "listen": args.listen,
            "db": args.db,
            "max_message_bytes": args.max_message_bytes,
            "lease_seconds": args.lease_seconds,
            "heartbeat_seconds": args.heartbeat_seconds,
            "log_level": args.log_level,
            "trace_retention_days": args.trace_retention_days,
            "keepalive_seconds": args.keepalive_seconds,
            "signing_key_file": args.signing_key_file,
            "attestation_retention_days": args.attestation_retention_days,
            "tokens_file": args.tokens_file,
            "jwt_algorithm": args.jwt_algorithm,
            "jwt_public_key_file": args.jwt_public_key_file,
            "jwt_issuer": args.jwt_issuer,
            "jwt_audience": args.jwt_audience,
            "tls_cert": args.tls_cert,
            "tls_key": args.tls_key,
            "tls_client_ca": args.tls_client_ca,
            "max_streams_per_caller": args.max_streams_per_caller,
            "max_queued_per_tenant": args.max_queued_per_tenant,
        }
    )
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )

    # The database driver works in a thread: hand the GIL over sooner than the
    # default 5 ms so a busy event loop does not stall every query behind it.
    sys.setswitchinterval(0.0005)

    async def run() -> None:
        server = JobtraceServer(settings)
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop()

    try:
        asyncio.run(run())
    except OSError as exc:
        print(f"jobtrace serve: {exc}", file=sys.stderr)
        return 1
    return 0


def _worker(args: argparse.Namespace) -> int:
    from jobtrace.client.worker import JobContext, Worker

    if not args.demo:
        print(
            "jobtrace worker: only --demo is built in; write handlers with jobtrace.client.Worker",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    worker = Worker(
        args.target, worker_id=args.worker_id, max_concurrency=args.concurrency, token=args.token
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


def _attest_verify(args: argparse.Namespace) -> int:
    """Offline: check an exported DSSE envelope against public keys alone."""
    import json
    from pathlib import Path

    from jobtrace.domain.attest import key_id_of, load_public_key, verify_offline

    keys = {}
    for path in args.public_key:
        key = load_public_key(Path(path).read_text())
        from cryptography.hazmat.primitives import serialization

        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        keys[key_id_of(raw)] = key
    try:
        envelope = json.loads(Path(args.envelope).read_text())
        verdict = verify_offline(envelope, keys)
    except (OSError, ValueError, KeyError) as exc:
        print(f"jobtrace attest verify: cannot read envelope: {exc}", file=sys.stderr)
        return 2
    result = {
        "valid": verdict.valid,
        "digest_valid": verdict.digest_valid,
        "signature_valid": verdict.signature_valid,
        "reason": verdict.reason,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print("valid" if verdict.valid else f"INVALID: {verdict.reason}")
    return 0 if verdict.valid else 1


def _keys_rotate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from jobtrace.domain.attest import rotate_key_file

    old, new = rotate_key_file(Path(args.key_file))
    print(f"retired {old}; new signing key {new} (takes effect when the server restarts)")
    return 0


def _token_new(args: argparse.Namespace) -> int:
    """Print a new random token and the tokens-file entry that admits it."""
    import secrets

    import yaml

    from jobtrace.auth import Role, hash_token

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jobtrace", description="jobs, workflows, evidence")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--listen", help="HOST:PORT (default 127.0.0.1:50051)")
    serve.add_argument("--db", help="SQLAlchemy async URL or SQLite path (default ./jobtrace.db)")
    serve.add_argument("--max-message-bytes", type=int, help="largest message (default 8 MiB)")
    serve.add_argument("--lease-seconds", type=float, help="lease length (default 30)")
    serve.add_argument("--heartbeat-seconds", type=float, help="heartbeat interval (default 10)")
    serve.add_argument("--trace-retention-days", type=float, help="trace retention (default 30)")
    serve.add_argument("--keepalive-seconds", type=float, help="idle stream keepalive (default 15)")
    serve.add_argument("--signing-key-file", help="Ed25519 key (default beside the database)")
    serve.add_argument("--attestation-retention-days", type=float, help="default 7")
    serve.add_argument("--tokens-file", help="YAML/JSON of token hashes (jobtrace token new)")
    serve.add_argument("--jwt-algorithm", choices=["HS256", "RS256"], help="default HS256")
    serve.add_argument("--jwt-public-key-file", help="RS256 public key (PEM)")
    serve.add_argument("--jwt-issuer", help="required issuer (iss)")
    serve.add_argument("--jwt-audience", help="required audience (aud), default jobtrace")
    serve.add_argument("--tls-cert", help="server certificate (PEM)")
    serve.add_argument("--tls-key", help="server private key (PEM)")
    serve.add_argument("--tls-client-ca", help="CA for client certificates (makes them required)")
    serve.add_argument("--max-streams-per-caller", type=int, help="default 1000")
    serve.add_argument("--max-queued-per-tenant", type=int, help="default 100000")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING (default INFO)")
    serve.set_defaults(func=_serve)
    worker = sub.add_parser("worker", help="run a worker")
    worker.add_argument("--demo", action="store_true", help="run the built-in demo handler")
    worker.add_argument(
        "--target",
        default="127.0.0.1:50051",
        help="server HOST:PORT; several replicas comma-separated (fail-over)",
    )
    worker.add_argument("--worker-id", help="stable worker id (default host-pid)")
    worker.add_argument("--service", action="append", help="service to serve (default demo)")
    worker.add_argument("--concurrency", type=int, default=4, help="jobs at once (default 4)")
    worker.add_argument("--token", help="bearer token")
    worker.add_argument("--log-level", default="INFO")
    worker.set_defaults(func=_worker)
    attest = sub.add_parser("attest", help="attestations").add_subparsers(
        dest="attest_command", required=True
    )
    verify = attest.add_parser("verify", help="verify an exported DSSE envelope offline")
    verify.add_argument("envelope", help="envelope JSON file (GetAttestation include_envelope)")
    verify.add_argument(
        "--public-key",
        action="append",
        required=True,
        help="public key file: hex or base64 of the raw key, or PEM; repeatable",
    )
    verify.add_argument("--json", action="store_true", help="print the verdict as JSON")
    verify.set_defaults(func=_attest_verify)
    from jobtrace import bench

    bench_parser = sub.add_parser("bench", help="measure throughput and latency on loopback")
    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(func=bench.main)
    token = sub.add_parser("token", help="bearer tokens").add_subparsers(
        dest="token_command", required=True
    )
    new = token.add_parser("new", help="create a token and its tokens-file entry")
    new.add_argument("--subject", required=True, help="who the token is for")
    new.add_argument("--tenant", required=True, help="the tenant it acts in")
    new.add_argument(
        "--roles", required=True, help="comma-separated: reader,submitter,worker,admin"
    )
    new.add_argument("--services", help="workers: comma-separated services it may serve")
    new.set_defaults(func=_token_new)
    keys = sub.add_parser("keys", help="signing keys").add_subparsers(
        dest="keys_command", required=True
    )
    rotate = keys.add_parser("rotate", help="retire the signing key and create a new one")
    rotate.add_argument("--key-file", required=True, help="the server's signing key file")
    rotate.set_defaults(func=_keys_rotate)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))
