"""List pages: opaque page tokens (a signed keyset position bound to the
query's filters), and pages bounded in items and in bytes."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from jobtrace.domain.errors import FieldViolation, Invalid, ResourceExhausted, Violations
from jobtrace.store import jobs as store
from jobtrace.store.db import Database, Tx
from jobtrace.store.listing import Chunk

T = TypeVar("T")
E = TypeVar("E")


class PageTokens:
    """Encodes keyset positions; refuses tokens that were altered or reused on
    another query. The secret is kept in the database so tokens survive
    restarts and work on every replica."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._secret, body, hashlib.sha256).digest()[:16]

    @staticmethod
    def _scope(query: str, filters: dict[str, Any]) -> str:
        text = json.dumps([query, filters], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def encode(self, query: str, filters: dict[str, Any], position: int) -> str:
        body = json.dumps({"p": position, "s": self._scope(query, filters)}).encode()
        return base64.urlsafe_b64encode(body + self._mac(body)).decode().rstrip("=")

    def decode(self, field: str, token: str, query: str, filters: dict[str, Any]) -> int | None:
        if not token:
            return None
        position = self._open(field, token, query, filters, "p")
        if not isinstance(position, int) or position < 0:
            raise Invalid([FieldViolation(field, "malformed page token")])
        return position

    def encode_key(self, query: str, filters: dict[str, Any], key: Sequence[int | str]) -> str:
        """A token of a keyset position of several columns (ints and strings)."""
        body = json.dumps({"k": list(key), "s": self._scope(query, filters)}).encode()
        return base64.urlsafe_b64encode(body + self._mac(body)).decode().rstrip("=")

    def decode_key(
        self, field: str, token: str, query: str, filters: dict[str, Any]
    ) -> list[int | str] | None:
        """The position encode_key wrote; None when there is no token."""
        if not token:
            return None
        key = self._open(field, token, query, filters, "k")
        if not isinstance(key, list) or not all(
            isinstance(part, int | str) and not isinstance(part, bool) for part in key
        ):
            raise Invalid([FieldViolation(field, "malformed page token")])
        return key

    def _open(self, field: str, token: str, query: str, filters: dict[str, Any], name: str) -> Any:
        """The position a token holds under `name`, once its signature and the
        query it is bound to are checked."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            body, mac = raw[:-16], raw[-16:]
            if len(raw) <= 16 or not hmac.compare_digest(mac, self._mac(body)):
                raise ValueError("bad signature")
            data = json.loads(body)
            position = data[name]
        except (ValueError, KeyError, TypeError) as exc:
            raise Invalid([FieldViolation(field, "malformed page token")]) from exc
        if data.get("s") != self._scope(query, filters):
            raise Invalid(
                [FieldViolation(field, "page token belongs to a query with other filters")]
            )
        return position

    def next_token(self, query: str, filters: dict[str, Any], filled: Filled[Any]) -> str:
        """The token of the page after `filled`; "" when no matching item follows it."""
        if filled.more and filled.last is not None:
            return self.encode(query, filters, filled.last)
        return ""


def position(
    tokens: PageTokens,
    v: Violations,
    field: str,
    token: str,
    query: str,
    filters: dict[str, Any],
    description: str = "",
) -> int:
    """Decode a token, reporting a bad one as a field violation next to the
    request's others; 0 (the start) when there is no token."""
    try:
        return tokens.decode(field, token, query, filters) or 0
    except Invalid as exc:
        if description:
            v.add(field, description)
        else:
            v.items.extend(exc.violations)
        return 0


async def open_tokens(db: Database) -> PageTokens:
    """The page-token signer, with its secret created on first start and kept in
    the database (shared by every replica, stable across restarts)."""

    async def load(session: AsyncSession, tx: Tx) -> str:
        secret = await store.get_meta(session, "page_token_secret")
        if secret is None:
            secret = await store.put_meta(session, "page_token_secret", secrets.token_hex(32))
        return secret

    return PageTokens(bytes.fromhex(await db.write(load)))


@dataclass(frozen=True, slots=True)
class Encoder(Generic[T, E]):
    """How a page's items go out (the api layer's): `encode` gives an item as
    sent and the bytes it adds to the response. A page stops before the item
    that would take it past `budget` bytes; its first item comes whatever its
    size, up to `ceiling`, past which no response can carry it."""

    encode: Callable[[T], tuple[E, int]]
    budget: int
    ceiling: int


@dataclass(frozen=True, slots=True)
class Filled(Generic[E]):
    """A page's items as sent; `last` is the position of its last item (None
    when empty) and `more` says whether matching items follow it."""

    items: list[E]
    last: int | None
    more: bool


async def fill(
    read: Callable[[int | None, int, int], Awaitable[Chunk[T]]],
    *,
    start: int | None,
    count: int,
    out: Encoder[T, E],
    position: Callable[[T], int],
    name: Callable[[T], str],
) -> Filled[E]:
    """One page of at most `count` items after `start`, and at most
    `out.budget` bytes. `read(after, limit, max_bytes)` reads the next rows a
    chunk at a time (bounded by their stored size, the first row whatever its
    size, so a page of huge rows is never loaded whole); one item past the
    page is read to know whether another page exists."""
    items: list[E] = []
    used = 0
    last: int | None = None
    after = start
    while True:
        # Stored and encoded sizes are close: read no more than the page has room for.
        chunk = await read(after, count - len(items) + 1, out.budget - used)
        for item in chunk.items:
            if len(items) == count:
                return Filled(items, last, True)
            encoded, size = out.encode(item)
            if items and used + size > out.budget:
                return Filled(items, last, True)
            if size > out.ceiling:
                raise ResourceExhausted(
                    f"{name(item)} is {size} bytes encoded, more than a response may carry "
                    f"({out.ceiling}); the BASIC view leaves its heavy fields out",
                    reason="ITEM_TOO_LARGE",
                    metadata={"item": name(item), "bytes": str(size), "limit": str(out.ceiling)},
                )
            items.append(encoded)
            used += size
            last = position(item)
        if chunk.exhausted:
            return Filled(items, last, False)
        after = chunk.after
        # Encoding a chunk of large items takes a while: let other calls run.
        await asyncio.sleep(0)
