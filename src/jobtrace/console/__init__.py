"""The web console: static files shipped in the package, served by the HTTP
listener at `/` and `/console/*`.

The console is plain HTML, CSS and ES modules (no build step, nothing from a
CDN). It reads and acts only through the public Connect API and the
EventSource endpoint, as any browser app would; this module only hands out its
files, plus `/console/features.json`: the RPCs the listener serves, so
that the console shows an action's button only where its RPC exists.

`make_app` builds its ASGI application, which the HTTP listener calls for
every request no other route takes (its `fallback`): it answers `/`,
`/index.html` and `/console/<file>`, and 404 to anything else.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping
from functools import cache
from importlib import resources
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

PREFIX = "/console/"
STATIC = resources.files(__package__) / "static"
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".json": "application/json",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
# Everything the page loads comes from this origin; no inline script or style,
# no framing, and no Referer (an EventSource URL may carry ?access_token=).
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        b"connect-src 'self' blob:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
# The services the console may call over Connect; WorkerService (its fleet
# views) only where the listener says it serves it.
CONSOLE_SERVICES = (
    "JobService",
    "TraceService",
    "AttestationService",
    "WorkerService",
    "ScheduleService",
)
DEFAULT_SERVED = (
    "jobtrace.v1.JobService",
    "jobtrace.v1.TraceService",
    "jobtrace.v1.AttestationService",
    "jobtrace.v1.ScheduleService",
)


def handles(path: str) -> bool:
    """Whether a request path is the console's: `/`, `/index.html` or `/console/...`."""
    return path in ("/", "/index.html") or path.startswith(PREFIX)


@cache
def _file(name: str) -> tuple[bytes, bytes, bytes] | None:
    """(body, content type, etag) of a static file, or None when there is none."""
    if not name or name.startswith(".") or "/" in name or "\\" in name:
        return None
    suffix = name[name.rfind(".") :] if "." in name else ""
    kind = TYPES.get(suffix)
    entry = STATIC / name
    if kind is None or not entry.is_file():
        return None
    body = entry.read_bytes()
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    return body, kind.encode(), etag.encode()


Served = Iterable[str] | Mapping[str, Iterable[str] | None]


def _served(served: Served | None) -> dict[str, frozenset[str] | None]:
    """Full service name -> the RPC names served (None: all of them)."""
    if served is None:
        return {name: None for name in DEFAULT_SERVED}
    if isinstance(served, Mapping):
        return {
            name: None if methods is None else frozenset(methods)
            for name, methods in served.items()
        }
    return {name: None for name in served}


def features(served: Served | None = None) -> dict[str, list[str]]:
    """Service name -> its RPC names served, in the contract's order, from the
    contract compiled into this server. `served`: full service names (all of
    their RPCs), or full service name -> the RPC names the listener serves
    (None: all); None: JobService, TraceService and AttestationService."""
    from jobtrace.pb import service_descriptor

    wanted = _served(served)
    out: dict[str, list[str]] = {}
    for name in CONSOLE_SERVICES:
        try:
            service = service_descriptor(name)
        except KeyError:
            continue
        if service.full_name not in wanted:
            continue
        methods = wanted[service.full_name]
        out[service.full_name] = [
            m.name for m in service.methods if methods is None or m.name in methods
        ]
    return out


def make_app(
    served: Served | None = None,
) -> App:
    """The console's ASGI app; `served`: what the Connect listener serves
    (see features)."""
    feature_body = json.dumps({"services": features(served)}, sort_keys=True).encode()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method = scope.get("method", "GET")
        path: str = scope.get("path", "/")
        if method not in ("GET", "HEAD"):
            await _respond(send, 405, b"text/plain; charset=utf-8", b"method not allowed\n",
                           extra=[(b"allow", b"GET, HEAD")])  # fmt: skip
            return
        if path == PREFIX + "features.json":
            await _respond(send, 200, b"application/json", feature_body, head=method == "HEAD",
                           extra=[(b"cache-control", b"no-cache")])  # fmt: skip
            return
        name = "index.html" if path in ("/", "/index.html") else path[len(PREFIX) :]
        found = _file(name) if handles(path) else None
        if found is None:
            await _respond(send, 404, b"text/plain; charset=utf-8", b"not found\n")
            return
        body, kind, etag = found
        headers = dict(scope.get("headers") or [])
        if headers.get(b"if-none-match") == etag:
            await _respond(send, 304, kind, b"", head=True, extra=[(b"etag", etag)])
            return
        await _respond(send, 200, kind, body, head=method == "HEAD",
                       extra=[(b"etag", etag), (b"cache-control", b"no-cache")])  # fmt: skip

    return app


async def _respond(
    send: Send,
    status: int,
    kind: bytes,
    body: bytes,
    *,
    head: bool = False,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [
        (b"content-type", kind),
        (b"content-length", str(len(body)).encode()),
        *SECURITY_HEADERS,
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})
