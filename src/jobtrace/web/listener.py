"""The HTTP listener: uvicorn serving HttpApp as a task of the server's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import math
import socket
import zlib
from collections.abc import Generator, Iterable, Mapping
from typing import Any

import uvicorn
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from jobtrace import console
from jobtrace.metrics import Metrics
from jobtrace.pb import service_descriptor
from jobtrace.web.app import ASGIApp, HttpApp, malformed
from jobtrace.web.services import Delegate
from jobtrace.web.sse import EventsEndpoint

log = logging.getLogger(__name__)

# The services served over HTTP (WorkerService stays gRPC-only).
HTTP_SERVICES = ("JobService", "TraceService", "AttestationService", "ScheduleService")


def connect_apps(
    servicers: Mapping[str, Any], *, max_message_bytes: int, metrics: Metrics | None
) -> dict[str, ASGIApp]:
    """Each service's generated Connect ASGI application, over a Delegate to
    its gRPC servicer; by full service name."""
    from jobtrace.v1 import (
        attestation_service_connect,
        job_service_connect,
        schedule_service_connect,
        trace_service_connect,
    )

    generated = {
        "JobService": job_service_connect.JobServiceASGIApplication,
        "TraceService": trace_service_connect.TraceServiceASGIApplication,
        "AttestationService": attestation_service_connect.AttestationServiceASGIApplication,
        "ScheduleService": schedule_service_connect.ScheduleServiceASGIApplication,
    }
    apps: dict[str, ASGIApp] = {}
    for name in HTTP_SERVICES:
        descriptor = service_descriptor(name)
        delegate = Delegate(descriptor, servicers[name], metrics)
        apps[descriptor.full_name] = generated[name](delegate, read_max_bytes=max_message_bytes)
    return apps


class BoundedGzip:
    """gzip for Connect messages, whose decompression stops at the largest
    message: a small compressed request cannot expand past the limit in
    memory (connect-python checks the size only after decompressing)."""

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes

    def name(self) -> str:
        return "gzip"

    def compress(self, data: bytes | bytearray | memoryview) -> bytes:
        return gzip.compress(bytes(data), compresslevel=6)

    def decompress(self, data: bytes | bytearray | memoryview) -> bytes:
        inflater = zlib.decompressobj(wbits=31)
        try:
            out = inflater.decompress(bytes(data), self._max + 1)
        except zlib.error as exc:
            raise malformed(f"bad gzip data: {exc}") from None
        if len(out) > self._max or inflater.unconsumed_tail:
            raise ConnectError(
                Code.RESOURCE_EXHAUSTED,
                f"request message larger than the limit of {self._max} bytes",
            )
        return out


class _Server(uvicorn.Server):
    """uvicorn without signal handlers of its own: the process's owner
    (jobtrace serve) handles SIGTERM/SIGINT and stops it with the gRPC server."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def bind(address: str) -> socket.socket:
    """A listening-ready TCP socket bound to HOST:PORT (port 0: a free one)."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit():
        raise OSError(f"invalid --http-listen {address!r} (HOST:PORT)")
    host = host.removeprefix("[").removesuffix("]")
    try:
        infos = socket.getaddrinfo(host or None, int(port_text), type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise OSError(f"cannot resolve --http-listen {address!r}: {exc}") from exc
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise OSError(f"could not listen on {address} for HTTP: {exc}") from exc
    sock.setblocking(False)
    return sock


class HttpListener:
    def __init__(
        self,
        address: str,
        servicers: Mapping[str, Any],
        *,
        max_message_bytes: int,
        max_concurrent_calls: int,
        cors_origins: Iterable[str],
        stall_s: float,
        max_stream_s: float | None,
        metrics: Metrics | None,
    ) -> None:
        apps = connect_apps(servicers, max_message_bytes=max_message_bytes, metrics=metrics)
        self.app = HttpApp(
            apps,
            EventsEndpoint(servicers["TraceService"], stall_s=stall_s, max_stream_s=max_stream_s),
            cors_origins=cors_origins,
            max_message_bytes=max_message_bytes,
            stall_s=stall_s,
        )
        # The web console's files at / and /console/* (jobtrace.console).
        self.app.fallback = console.make_app(apps)
        self._address = address
        self._max_concurrent = max_concurrent_calls
        self._sock: socket.socket | None = None
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    def bind(self) -> int:
        self._sock = bind(self._address)
        self.port = int(self._sock.getsockname()[1])
        return self.port

    async def start(self, grace_s: float) -> None:
        assert self._sock is not None
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            # No access log: a query may carry ?access_token= (EventSource).
            access_log=False,
            log_config=None,
            log_level="warning",
            http="h11",
            ws="none",
            proxy_headers=False,
            server_header=False,
            date_header=False,
            limit_concurrency=self._max_concurrent,
            timeout_graceful_shutdown=max(1, math.ceil(grace_s)),
        )
        server = _Server(config)
        self._server = server
        self._task = asyncio.create_task(server.serve(sockets=[self._sock]), name="jobtrace-http")
        while not server.started:
            if self._task.done():
                self._task.result()
                raise OSError("the HTTP listener stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting, let requests in progress finish within `grace_s`
        (the start's grace when None), then cancel what is left."""
        if self._server is None or self._task is None:
            if self._sock is not None:
                self._sock.close()
            return
        if grace_s is not None:
            self._server.config.timeout_graceful_shutdown = max(1, math.ceil(grace_s))
        self._server.should_exit = True
        try:
            await self._task
        finally:
            self._server = None
            self._task = None
            if self._sock is not None:
                self._sock.close()
                self._sock = None
