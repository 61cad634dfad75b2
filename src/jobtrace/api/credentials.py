"""Long-lived streams end UNAUTHENTICATED when the credentials they were opened
with lapse: a JWT expires, or a reload of the tokens file removes or changes the token."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, TypeVar

from jobtrace.auth import Authenticator, Principal
from jobtrace.domain.errors import Unauthenticated

T = TypeVar("T")


class CredentialWatch:
    """Watches one stream's credentials; `lapsed` says why they stopped holding.

    `check()` is the synchronous test made before each message goes out (so
    nothing is sent after a JWT's expiry); the background task notices a lapse
    while the stream is idle and calls `on_lapse` once."""

    def __init__(self, auth: Authenticator, context: Any, principal: Principal) -> None:
        self._auth = auth
        self._metadata = tuple(context.invocation_metadata() or ())
        self._principal = principal
        self._on_lapse: Callable[[Unauthenticated], None] | None = None
        self._task: asyncio.Task[None] | None = None
        self.lapsed: Unauthenticated | None = None

    def start(self, on_lapse: Callable[[Unauthenticated], None]) -> None:
        self._on_lapse = on_lapse
        if self._auth.enabled and self._task is None:
            self._task = asyncio.create_task(self._watch(), name="jobtrace-credential-watch")

    async def _watch(self) -> None:
        self._lapse(await self._auth.wait_lapsed(self._metadata, self._principal))

    def check(self) -> Unauthenticated | None:
        expires_at = self._principal.expires_at
        if self.lapsed is None and expires_at is not None and time.time() >= expires_at:
            error = self._auth.recheck(self._metadata, self._principal)
            if error is not None:
                self._lapse(error)
        return self.lapsed

    def _lapse(self, error: Unauthenticated) -> None:
        if self.lapsed is None:
            self.lapsed = error
            if self._on_lapse is not None:
                self._on_lapse(error)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


async def guarded(
    auth: Authenticator, context: Any, principal: Principal, source: AsyncIterator[T]
) -> AsyncGenerator[T, None]:
    """The items of a server stream, until the caller's credentials lapse: then
    the stream raises Unauthenticated (answered as UNAUTHENTICATED), whether it
    was waiting for its next item or about to send one."""
    host = asyncio.current_task()
    assert host is not None
    waiting = False
    interrupted = False

    def on_lapse(_: Unauthenticated) -> None:
        # Interrupt the wait for the next item; at any other point the check
        # before the next item ends the stream.
        nonlocal interrupted
        if waiting and not interrupted:
            interrupted = True
            host.cancel()

    watch = CredentialWatch(auth, context, principal)
    watch.start(on_lapse)
    try:
        while True:
            if (error := watch.check()) is not None:
                raise error
            waiting = True
            try:
                item = await anext(source)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if interrupted and host.uncancel() == 0 and watch.lapsed is not None:
                    raise watch.lapsed from None
                raise
            finally:
                waiting = False
            if (error := watch.check()) is not None:
                raise error
            yield item
    finally:
        await watch.stop()
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            await aclose()
