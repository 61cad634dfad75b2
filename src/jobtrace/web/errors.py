"""Connect errors on the wire (the JSON body of a failed unary call)."""

from __future__ import annotations

from connectrpc._protocol import ConnectWireError
from connectrpc.errors import ConnectError


def error_body(exc: ConnectError) -> bytes:
    """{"code": ..., "message": ..., "details": [{"type", "value", "debug"}]}."""
    return ConnectWireError.from_exception(exc).to_json_bytes()


def http_status(exc: ConnectError) -> int:
    return ConnectWireError.from_exception(exc).to_http_status().code
