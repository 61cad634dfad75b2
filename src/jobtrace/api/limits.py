"""Limits of the API: open streams per caller, bytes per list page."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TypeVar

from google.protobuf.message import Message

from jobtrace.auth import Principal
from jobtrace.domain.errors import ResourceExhausted
from jobtrace.domain.pagination import Encoder

T = TypeVar("T")
M = TypeVar("M", bound=Message)

# The most bytes of items one list page carries: under the 4 MiB a gRPC
# client accepts by default, with room for the rest of the response.
PAGE_BYTES = 3 * 1024 * 1024
# Kept free in every response for what is not an item (page token, flags).
RESPONSE_RESERVE = 1024


class StreamLimiter:
    def __init__(self, per_caller: int) -> None:
        self.per_caller = per_caller
        self._open: Counter[str] = Counter()

    @contextlib.contextmanager
    def hold(self, principal: Principal) -> Iterator[None]:
        key = f"{principal.tenant}/{principal.subject}"
        if self._open[key] >= self.per_caller:
            raise ResourceExhausted(
                f"{principal.subject!r} already holds {self.per_caller} open streams",
                reason="TOO_MANY_STREAMS",
                metadata={"limit": str(self.per_caller)},
            )
        self._open[key] += 1
        try:
            yield
        finally:
            self._open[key] -= 1
            if not self._open[key]:
                del self._open[key]

    def open_streams(self) -> int:
        return sum(self._open.values())


class PageBytes:
    """The bytes one list page may carry: at most PAGE_BYTES of items (half the
    largest message when that is smaller); a page stops before the item that
    would take it past that, but its first item comes alone whatever its
    size, up to the largest message less RESPONSE_RESERVE (`ceiling`, also
    the most that the items of a reply that cannot stop early may take)."""

    def __init__(self, max_message_bytes: int) -> None:
        self.budget = min(PAGE_BYTES, max_message_bytes // 2)
        self.ceiling = max_message_bytes - RESPONSE_RESERVE

    def encoder(self, to_proto: Callable[[T], M]) -> Encoder[T, M]:
        """Items as `to_proto` sends them, measured as one entry of a
        repeated field: tag, length and the message."""

        def encode(item: T) -> tuple[M, int]:
            message = to_proto(item)
            size = message.ByteSize()
            return message, 1 + _varint_size(size) + size

        return Encoder(encode, self.budget, self.ceiling)


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)
