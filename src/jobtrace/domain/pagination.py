"""Opaque page tokens: a signed keyset position bound to the query's filters."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from jobtrace.domain.errors import FieldViolation, Invalid, Violations
from jobtrace.store import jobs as store
from jobtrace.store.db import Database, Tx


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
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            body, mac = raw[:-16], raw[-16:]
            if len(raw) <= 16 or not hmac.compare_digest(mac, self._mac(body)):
                raise ValueError("bad signature")
            data = json.loads(body)
            position = data["p"]
            if not isinstance(position, int) or position < 0:
                raise ValueError("bad position")
        except (ValueError, KeyError, TypeError) as exc:
            raise Invalid([FieldViolation(field, "malformed page token")]) from exc
        if data.get("s") != self._scope(query, filters):
            raise Invalid(
                [FieldViolation(field, "page token belongs to a query with other filters")]
            )
        return position


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
