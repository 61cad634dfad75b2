"""Delivery of a server stream's messages under a write deadline: a reader that
takes nothing for the stall limit ends its stream, and what the stream held
(subscriptions, a worker session and its leases, a stream slot) is released."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from typing import Any

from jobtrace.api.errors import to_status
from jobtrace.domain.errors import ResourceExhausted

log = logging.getLogger(__name__)


def reader_stalled(stall_s: float) -> ResourceExhausted:
    return ResourceExhausted(
        f"reader stalled for {stall_s:g} s: the stream could deliver nothing in that "
        "time and was ended; read faster, or open it again (trace streams resume "
        "from the last cursor)",
        reason="READER_STALLED",
        metadata={"stall_seconds": f"{stall_s:g}"},
    )


async def deliver(
    responses: AsyncGenerator[Any, None], context: Any, stall_s: float, method: str
) -> None:
    """Write each response of a handler within `stall_s` seconds; when a write
    cannot complete in time (the reader's flow-control window stays shut),
    close the handler (its `finally` blocks release what it holds) and end the
    call RESOURCE_EXHAUSTED, reason READER_STALLED."""
    headers_sent = False
    async with contextlib.aclosing(responses):
        async for response in responses:
            if not headers_sent:
                # Headers on their own (they are not flow-controlled): a first
                # message that stalls must not hold them, or the status could
                # not be sent after it.
                await context.send_initial_metadata(())
                headers_sent = True
            try:
                async with asyncio.timeout(stall_s):
                    await context.write(response)
            except TimeoutError:
                break
        else:
            return
    # The handler is closed. The status goes out behind the message the
    # reader has not taken, so it reaches the reader only if it reads again:
    # wait at most one more stall period for that, then leave it queued (the
    # call ends as aborted either way).
    log.warning("%s: reader stalled for %g s; stream ended", method, stall_s)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(stall_s):
            await context.abort_with_status(to_status(reader_stalled(stall_s)))
