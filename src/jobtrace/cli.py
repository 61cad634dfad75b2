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
        }
    )
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jobtrace", description="jobs, workflows, evidence")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--listen", help="HOST:PORT (default 127.0.0.1:50051)")
    serve.add_argument("--db", help="SQLAlchemy async URL or SQLite path (default ./jobtrace.db)")
    serve.add_argument("--max-message-bytes", type=int, help="largest message (default 8 MiB)")
    serve.add_argument("--lease-seconds", type=float, help="lease length (default 30)")
    serve.add_argument("--heartbeat-seconds", type=float, help="heartbeat interval (default 10)")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING (default INFO)")
    serve.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))
