"""Where and how a client reaches jobtrace: target, bearer token, TLS and keepalive."""

from __future__ import annotations

import ipaddress
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from opentelemetry import propagate, trace

DEFAULT_TARGET = "127.0.0.1:50051"


class InsecureTokenWarning(UserWarning):
    """A bearer token is about to cross the network without TLS."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Connection settings shared by the API clients, the worker runtime and the CLI."""

    # HOST:PORT of a jobtrace server (or several, comma-separated, for workers).
    target: str = DEFAULT_TARGET
    # Bearer token sent in the `authorization` metadata of every call.
    token: str | None = None
    # Use TLS; with no CA file the system's root certificates are trusted.
    tls: bool = False
    # PEM file of the CA that signed the server's certificate.
    ca_file: str | None = None
    # PEM client certificate and key, for servers that require client certificates.
    client_cert_file: str | None = None
    client_key_file: str | None = None
    # Expected name in the server certificate, when it differs from the target host.
    server_name: str | None = None
    # Ping an idle connection this often so a dead peer is noticed.
    keepalive_seconds: float = 30.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Endpoint:
        """JOBTRACE_TARGET, JOBTRACE_TOKEN, JOBTRACE_TLS, JOBTRACE_TLS_CA,
        JOBTRACE_CLIENT_CERT, JOBTRACE_CLIENT_KEY, JOBTRACE_TLS_SERVER_NAME;
        explicit overrides that are not None win."""
        env = os.environ if env is None else env
        values: dict[str, object] = {
            "target": env.get("JOBTRACE_TARGET") or DEFAULT_TARGET,
            "token": env.get("JOBTRACE_TOKEN") or None,
            "tls": env.get("JOBTRACE_TLS", "").lower() in {"1", "true", "yes", "on"},
            "ca_file": env.get("JOBTRACE_TLS_CA") or None,
            "client_cert_file": env.get("JOBTRACE_CLIENT_CERT") or None,
            "client_key_file": env.get("JOBTRACE_CLIENT_KEY") or None,
            "server_name": env.get("JOBTRACE_TLS_SERVER_NAME") or None,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    @property
    def secure(self) -> bool:
        return self.tls or bool(self.ca_file or self.client_cert_file)

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.secure:
            return None
        ca = Path(self.ca_file).read_bytes() if self.ca_file else None
        cert = Path(self.client_cert_file).read_bytes() if self.client_cert_file else None
        key = Path(self.client_key_file).read_bytes() if self.client_key_file else None
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )

    def options(self) -> list[tuple[str, int | str]]:
        options: list[tuple[str, int | str]] = [
            ("grpc.keepalive_time_ms", int(self.keepalive_seconds * 1000)),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            # Retries are the client's own (only for calls that are safe to repeat).
            ("grpc.enable_retries", 0),
            # Reconnect soon after a restart or a cut, not after gRPC's default 1 s+.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 5_000),
        ]
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return options

    def channel(self, target: str | None = None) -> grpc.aio.Channel:
        """A new asyncio channel to `target` (default: the first of self.target)."""
        target = target or self.targets[0]
        credentials = self.credentials()
        if credentials is None and self.token and not _loopback_target(target):
            warnings.warn(
                f"sending a bearer token to {target} without TLS: anyone on the network "
                "path can read it; use tls=True (JOBTRACE_TLS=1) or a loopback address",
                InsecureTokenWarning,
                stacklevel=2,
            )
        if credentials is None:
            return grpc.aio.insecure_channel(target, options=self.options())
        return grpc.aio.secure_channel(target, credentials, options=self.options())

    @property
    def targets(self) -> list[str]:
        return [t.strip() for t in self.target.split(",") if t.strip()]

    def metadata(self, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
        auth = (("authorization", f"Bearer {self.token}"),) if self.token else ()
        # This client reads payloads, results and outputs as exact JSON: the
        # server sends the *_json fields instead of the Structs (smaller, and
        # integers stay integers).
        return (*auth, EXACT_JSON, *extra, *trace_context(extra))


def trace_context(extra: tuple[tuple[str, str], ...] = ()) -> tuple[tuple[str, str], ...]:
    """The current OpenTelemetry context as metadata (traceparent, and
    tracestate or baggage as the configured propagators write them), when a
    span is active and the call does not name its own traceparent."""
    if not trace.get_current_span().get_span_context().is_valid:
        return ()
    if any(key == "traceparent" for key, _ in extra):
        return ()
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())


EXACT_JSON = ("jobtrace-json", "exact")


def _loopback_target(target: str) -> bool:
    """Whether a gRPC target surely stays on this machine: a local socket,
    `localhost`, or a loopback address. Names are not resolved (no lookup on
    the caller's event loop), so any other name counts as remote."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    if target.startswith(("dns:", "ipv4:", "ipv6:")):
        target = target.partition(":")[2].lstrip("/")
        if "/" in target:  # dns://authority/host:port
            target = target.rpartition("/")[2]
    host = target
    if not host.endswith("]") and host.count(":") == 1:
        host = host.rpartition(":")[0]  # HOST:PORT
    elif host.startswith("["):
        host = host[1:].partition("]")[0]  # [V6]:PORT
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback
