"""Command line: `jobtrace serve | worker | submit | watch | get | cancel | terminate | rerun |
pause | resume | queues | approve | pending-approvals | jobs | workflows | trace | attest |
annotate | annotations | keys | token | bench`.

Exit codes: 0 success; 1 a watched run did not complete, or an attestation is
invalid; 2 a usage error or a failed call; 3 a watched run was cancelled."""

from __future__ import annotations

import argparse
import sys

import grpc

from jobtrace.cli import (
    client_commands,
    fleet_commands,
    flow_commands,
    pause_commands,
    server_commands,
)
from jobtrace.client.errors import JobtraceError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobtrace",
        description="jobs, workflows and their evidence over gRPC",
        epilog="Client commands read JOBTRACE_TARGET, JOBTRACE_TOKEN, JOBTRACE_TLS, "
        "JOBTRACE_TLS_CA; `jobtrace COMMAND -h` for details.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    conn = client_commands.client_options()

    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--listen", help="HOST:PORT (default 127.0.0.1:50051)")
    serve.add_argument("--db", help="SQLAlchemy async URL or SQLite path (default ./jobtrace.db)")
    serve.add_argument("--max-message-bytes", type=int, help="largest message (default 8 MiB)")
    serve.add_argument("--lease-seconds", type=float, help="lease length (default 30)")
    serve.add_argument("--heartbeat-seconds", type=float, help="heartbeat interval (default 10)")
    serve.add_argument(
        "--reconnect-grace-seconds",
        type=float,
        help="how long a lost worker stream's leases wait for it to reconnect"
        " (default one heartbeat interval; at most the lease)",
    )
    serve.add_argument("--trace-retention-days", type=float, help="trace retention (default 30)")
    serve.add_argument("--keepalive-seconds", type=float, help="idle stream keepalive (default 15)")
    serve.add_argument("--signing-key-file", help="Ed25519 key (default beside the database)")
    serve.add_argument("--attestation-retention-days", type=float, help="default 7")
    serve.add_argument(
        "--retention-sweep-seconds", type=float, help="retention sweep interval (default 60)"
    )
    serve.add_argument(
        "--allow-async-commit",
        action="store_true",
        default=None,
        help="start on a PostgreSQL with synchronous_commit off (may lose acknowledged writes)",
    )
    serve.add_argument(
        "--no-uvloop",
        dest="uvloop",
        action="store_false",
        default=None,
        help="run on asyncio's own event loop instead of uvloop (JOBTRACE_UVLOOP=0)",
    )
    serve.add_argument(
        "--storage-probe-seconds", type=float, help="storage health probe interval (default 1)"
    )
    serve.add_argument("--tokens-file", help="YAML/JSON of token hashes (jobtrace token new)")
    serve.add_argument("--jwt-algorithm", choices=["HS256", "RS256"], help="default HS256")
    serve.add_argument("--jwt-public-key-file", help="RS256 public key (PEM)")
    serve.add_argument("--jwt-issuer", help="required issuer (iss)")
    serve.add_argument("--jwt-audience", help="required audience (aud), default jobtrace")
    serve.add_argument(
        "--allow-insecure-auth",
        action="store_true",
        default=None,
        help="accept tokens over plaintext on a non-loopback address (without --tls-cert)",
    )
    serve.add_argument("--tls-cert", help="server certificate (PEM)")
    serve.add_argument("--tls-key", help="server private key (PEM)")
    serve.add_argument("--tls-client-ca", help="CA for client certificates (makes them required)")
    serve.add_argument(
        "--reload-interval-seconds",
        type=float,
        help="check the tokens, JWT key, TLS and failure rules files for changes this often "
        "(default 2; 0: only on SIGHUP)",
    )
    serve.add_argument(
        "--failure-rules",
        help="YAML file of failure rules (classify failures, retry or not, backoff, "
        "another worker); reloaded on SIGHUP and on change",
    )
    serve.add_argument("--max-streams-per-caller", type=int, help="default 1000")
    serve.add_argument("--max-queued-per-tenant", type=int, help="default 100000")
    serve.add_argument(
        "--max-calls-per-connection",
        type=int,
        help="calls (HTTP/2 streams) one connection may have open (default 1000)",
    )
    serve.add_argument(
        "--max-concurrent-calls",
        type=int,
        help="calls in progress in the whole server (default 10000)",
    )
    serve.add_argument(
        "--stream-stall-seconds",
        type=float,
        help="end a stream whose reader takes nothing this long (default 30)",
    )
    serve.add_argument(
        "--http-listen",
        metavar="HOST:PORT",
        help="also serve Connect (JSON/binary) and EventSource over HTTP here, e.g. "
        "127.0.0.1:8080 (default off; '' turns it off)",
    )
    serve.add_argument(
        "--cors-origin",
        action="append",
        metavar="ORIGIN",
        help="let pages from ORIGIN (scheme://host[:port]) call the HTTP listener (repeatable)",
    )
    serve.add_argument(
        "--http-max-stream-seconds",
        type=float,
        help="close an EventSource stream after this long; it resumes (default 0: never)",
    )
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING (default INFO)")
    serve.add_argument("--log-format", choices=["json", "text"], help="default json")
    serve.add_argument(
        "--redact-key",
        action="append",
        metavar="REGEX",
        help="also redact members whose name matches REGEX, any case (repeatable)",
    )
    serve.add_argument(
        "--redact-header",
        action="append",
        metavar="NAME",
        help="also drop and redact this request header (repeatable)",
    )
    serve.add_argument(
        "--no-default-redaction",
        action="store_true",
        default=None,
        help="turn the default redaction rules off: credentials may enter evidence",
    )
    serve.add_argument(
        "--metrics-port", type=int, help="serve Prometheus metrics on this port (0: any free one)"
    )
    serve.add_argument(
        "--metrics-host",
        help='metrics address (default 127.0.0.1; "" means the --listen host)',
    )
    serve.add_argument(
        "--metrics-max-services",
        type=int,
        help='services labelled by name in metrics; the rest count as "(other)" (default 200)',
    )
    serve.add_argument(
        "--metrics-idle-timeout-seconds",
        type=float,
        help="close a metrics connection idle this long (default 10)",
    )
    serve.add_argument(
        "--schedule-scan-seconds",
        type=float,
        help="how often this replica fires due schedule ticks (default 1; 0: never)",
    )
    serve.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help="export traces, the heartbeat and metrics over OTLP/gRPC to URL "
        "(default: OTEL_EXPORTER_OTLP_ENDPOINT; off when unset)",
    )
    serve.add_argument(
        "--otlp-heartbeat-seconds",
        type=float,
        help="export the heartbeat and metrics this often (default "
        "OTEL_METRIC_EXPORT_INTERVAL, else 15)",
    )
    serve.add_argument(
        "--deployment-environment",
        help="the deployment.environment resource attribute of exported telemetry",
    )
    serve.set_defaults(func=server_commands.serve)

    worker = sub.add_parser("worker", parents=[conn], help="run a worker")
    worker.add_argument("--demo", action="store_true", help="run the built-in demo handler")
    worker.add_argument("--worker-id", help="stable worker id (default host-pid)")
    worker.add_argument("--service", action="append", help="service to serve (default demo)")
    worker.add_argument("--concurrency", type=int, default=4, help="jobs at once (default 4)")
    worker.add_argument(
        "--report-window-ms",
        type=float,
        default=5.0,
        help="send the reports queued within this window as one batch (default 5; 0: off)",
    )
    worker.add_argument("--affinity", action="append", help="cached affinity key (repeatable)")
    worker.add_argument(
        "--label", action="append", help="KEY=VALUE label jobs may require (repeatable)"
    )
    worker.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING")
    worker.add_argument("--log-format", choices=["json", "text"], default="text")
    worker.set_defaults(func=server_commands.worker)

    attest = sub.add_parser("attest", help="attestations").add_subparsers(
        dest="attest_command", required=True
    )
    keys = sub.add_parser("keys", help="signing keys").add_subparsers(
        dest="keys_command", required=True
    )
    client_commands.add_commands(sub, attest, keys)
    fleet_commands.add_commands(sub)
    pause_commands.add_commands(sub)
    flow_commands.add_commands(sub)

    verify = attest.add_parser(
        "verify",
        parents=[conn],
        help="verify an attestation: by KEY on the server, or an exported envelope FILE "
        "offline with --public-key",
    )
    verify.add_argument("target_key", metavar="KEY|FILE", help="attestation key or envelope file")
    verify.add_argument(
        "--public-key",
        action="append",
        help="offline: public key file (PEM, or hex/base64 of the raw key); repeatable",
    )
    verify.add_argument("--json", action="store_true", help="print the verdict as JSON")
    verify.set_defaults(func=_attest_verify)

    rotate = keys.add_parser("rotate", help="retire the signing key and create a new one")
    rotate.add_argument("--key-file", required=True, help="the server's signing key file")
    rotate.set_defaults(func=server_commands.keys_rotate)

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
        "--roles", required=True, help="comma-separated: reader,submitter,worker,reviewer,admin"
    )
    new.add_argument("--services", help="workers: comma-separated services it may serve")
    new.set_defaults(func=server_commands.token_new)
    return parser


def _attest_verify(args: argparse.Namespace) -> int:
    if args.public_key:
        return server_commands.attest_verify_offline(args)
    return client_commands.run_command(client_commands.attest_verify_online)(args)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except JobtraceError as exc:
        print(f"jobtrace {args.command}: {describe(exc, args)}", file=sys.stderr)
        code = 2
    except (ValueError, OSError) as exc:
        print(f"jobtrace {args.command}: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def describe(exc: JobtraceError, args: argparse.Namespace) -> str:
    """A failed call in words, with a hint where one helps."""
    if exc.code == grpc.StatusCode.UNAVAILABLE:
        target = client_commands.endpoint_of(args).target
        return (
            f"cannot reach jobtrace at {target} ({exc.message}); is `jobtrace serve` running "
            "there? (--target or JOBTRACE_TARGET choose another address)"
        )
    if exc.code == grpc.StatusCode.UNAUTHENTICATED:
        return f"{exc} (pass a token with --token or JOBTRACE_TOKEN)"
    return str(exc)
