"""Which storage failures are transient: the same write may succeed when sent again."""

from __future__ import annotations

from sqlalchemy import exc as sa_exc


def is_transient(error: BaseException) -> bool:
    """A lost or refused database connection, a pool or lock timeout: nothing
    was stored, and resending the same report later is the remedy."""
    if isinstance(error, sa_exc.DBAPIError):
        return error.connection_invalidated or isinstance(
            error, sa_exc.OperationalError | sa_exc.InterfaceError
        )
    return isinstance(
        error, sa_exc.TimeoutError | sa_exc.DisconnectionError | ConnectionError | TimeoutError
    )
