"""A gRPC-servicer context over a Connect request, and the mapping of gRPC
statuses (with their google.rpc details) to Connect errors."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import grpc
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from google.rpc import status_pb2

from jobtrace.api.errors import to_rpc_status
from jobtrace.domain.errors import DomainError

_STATUS_DETAILS_KEY = "grpc-status-details-bin"
# gRPC's names, where Connect spells one otherwise.
_RENAMED = {"CANCELLED": Code.CANCELED}


def connect_code(code: grpc.StatusCode | int) -> Code:
    """The Connect code of a gRPC status code (by enum or number)."""
    if isinstance(code, int):
        code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    if code == grpc.StatusCode.OK:
        return Code.UNKNOWN  # an abort with OK is not a success either
    return _RENAMED.get(code.name) or Code(code.name.lower())


def error_from_rpc_status(status: status_pb2.Status) -> ConnectError:
    """A google.rpc.Status as a Connect error: the same code, message and details."""
    return ConnectError(connect_code(status.code), status.message, list(status.details))


def error_from_domain(exc: DomainError) -> ConnectError:
    return error_from_rpc_status(to_rpc_status(exc))


class Aborted(ConnectError):
    """A servicer ended the call (context.abort / abort_with_status)."""


class HttpCallContext:
    """What the gRPC servicers use of a grpc.aio.ServicerContext, for a call
    that came over HTTP: the request's headers as invocation metadata (names in
    lower case, as gRPC gives them), the caller's deadline (Connect's
    `connect-timeout-ms`), the peer, and abort, which raises the Connect
    error of the status."""

    def __init__(
        self,
        headers: Iterable[tuple[str, str]],
        *,
        peer: str | None,
        timeout_ms: float | None = None,
        trailers: Any = None,
    ) -> None:
        self._metadata = tuple((k.lower(), v) for k, v in headers)
        self._peer = peer or ""
        self._deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
        self._trailers = trailers
        self._code: grpc.StatusCode | None = None
        self._details = ""

    # -- what the servicers read
    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        host, _, port = self._peer.rpartition(":")
        if not host:
            return ""
        return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def deadline(self) -> float | None:
        """The deadline on the monotonic clock (None: no deadline)."""
        return self._deadline

    # -- how they end a call
    async def abort_with_status(self, status: grpc.Status) -> None:
        raise self._error(status)

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> None:
        raise Aborted(connect_code(code), details)

    def _error(self, status: grpc.Status) -> Aborted:
        for key, value in status.trailing_metadata or ():
            if key == _STATUS_DETAILS_KEY:
                rich = status_pb2.Status.FromString(value)
                return Aborted(connect_code(rich.code), rich.message, list(rich.details))
        return Aborted(connect_code(status.code), status.details or "")

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def set_trailing_metadata(self, metadata: Iterable[tuple[str, Any]]) -> None:
        if self._trailers is None:
            return
        for key, value in metadata:
            if isinstance(value, str):
                self._trailers.add(key, value)

    async def send_initial_metadata(self, _metadata: Any = ()) -> None:
        return None
