"""Which storage failures are transient: the same write may succeed when sent again."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator

from sqlalchemy import exc as sa_exc

# SQLSTATEs of a PostgreSQL that refuses to connect or to serve, besides class
# 08 (connection exceptions): terminated by an administrator or a shutdown
# (57P01), by another backend's crash (57P02), "cannot connect now" (57P03:
# starting up, shutting down, in recovery), too many connections (53300).
REFUSING_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300"})


def is_transient(error: BaseException) -> bool:
    """A lost or refused database connection, a database starting up or shutting
    down, a pool or lock timeout: nothing was stored, and resending the same
    report later is the remedy.

    The driver's error is looked for along the explicit cause chain (SQLAlchemy
    wraps asyncpg's, whose class it does not always map: "the database system is
    starting up" arrives as a bare `DBAPIError`), and judged by its SQLSTATE."""
    for exc in _causes(error):
        if isinstance(exc, sa_exc.DBAPIError) and (
            exc.connection_invalidated
            or isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError)
        ):
            return True
        if isinstance(exc, sa_exc.TimeoutError | sa_exc.DisconnectionError):
            return True
        if isinstance(exc, OSError) and _network_failure(exc):
            return True
        if refusing_sqlstate(getattr(exc, "sqlstate", None)):
            return True
    return False


# What connecting to, or talking with, a database server over a network fails with.
NETWORK_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNREFUSED", "ECONNRESET", "ECONNABORTED", "EPIPE", "ETIMEDOUT", "ENETUNREACH",
        "EHOSTUNREACH", "ENETDOWN", "EHOSTDOWN", "ENETRESET", "ENOTCONN", "ESHUTDOWN",
    )
    if hasattr(errno, name)
)  # fmt: skip


def _network_failure(exc: OSError) -> bool:
    """A refused, reset or unreachable connection; not a local file error (a
    missing key file or a full disk is a fault to report, not to retry)."""
    if isinstance(exc, ConnectionError | TimeoutError | socket.gaierror):
        return True
    if exc.errno in NETWORK_ERRNOS:
        return True
    # asyncio, failing to connect to every address of a host name, raises one
    # OSError without an errno that lists them all.
    return exc.errno is None and str(exc).startswith("Multiple exceptions:")


def refusing_sqlstate(state: object) -> bool:
    return isinstance(state, str) and (state.startswith("08") or state in REFUSING_SQLSTATES)


def _causes(error: BaseException) -> Iterator[BaseException]:
    """`error`, the driver error it wraps (`orig`) and what each was raised from
    (never the implicit `__context__`: a bug raised while handling an outage is
    a bug)."""
    seen: set[int] = set()
    waiting: list[BaseException] = [error]
    while waiting and len(seen) < 16:
        exc = waiting.pop()
        if id(exc) in seen:
            continue
        seen.add(id(exc))
        yield exc
        for linked in (exc.__cause__, getattr(exc, "orig", None)):
            if isinstance(linked, BaseException):
                waiting.append(linked)
