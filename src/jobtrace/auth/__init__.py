"""Who is calling: bearer tokens (a hashed tokens file, or JWTs), principals and roles."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import hmac
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobtrace import logs
from jobtrace.domain.errors import PermissionDenied, Unauthenticated
from jobtrace.model import SYSTEM_SUBJECT

DEFAULT_TENANT = "default"


class Role(enum.Enum):
    READER = "reader"
    SUBMITTER = "submitter"
    WORKER = "worker"
    ADMIN = "admin"
    # May make a reviewer's statements: annotations with approval.* keys and
    # the actor kind REVIEWER (on its own, nothing else: combine it with
    # submitter or worker to write at all).
    REVIEWER = "reviewer"


# What each role may do besides its own name.
_IMPLIES = {
    Role.ADMIN: {Role.READER, Role.SUBMITTER, Role.WORKER, Role.REVIEWER, Role.ADMIN},
    Role.REVIEWER: {Role.REVIEWER},
    Role.SUBMITTER: {Role.READER, Role.SUBMITTER},
    Role.READER: {Role.READER},
    Role.WORKER: {Role.WORKER},
}


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str
    tenant: str
    roles: frozenset[Role]
    # For workers: the services they may serve; None means any.
    allowed_services: frozenset[str] | None = None
    # For workers: the tenants whose jobs they may run; None means any.
    allowed_tenants: frozenset[str] | None = None
    authenticated: bool = True
    # For JWTs: when the token expires (`exp`, seconds since the epoch); None for
    # tokens from the tokens file, which hold until a reload removes them.
    expires_at: float | None = None

    def may(self, role: Role) -> bool:
        return any(role in _IMPLIES[r] for r in self.roles)

    @property
    def is_admin(self) -> bool:
        return Role.ADMIN in self.roles

    @property
    def read_scope(self) -> str | None:
        """The tenant reads are limited to; None for admins (all tenants)."""
        return None if self.is_admin else self.tenant


ANONYMOUS = Principal("anonymous", DEFAULT_TENANT, frozenset({Role.ADMIN}), authenticated=False)
# Subjects no credential may carry: what is recorded (submitted_by, recorded_by)
# for the anonymous caller and for the server's own actions must never be
# claimed by a token.
RESERVED_SUBJECTS = frozenset({ANONYMOUS.subject, SYSTEM_SUBJECT})


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


ROLE_NAMES = tuple(r.value for r in Role)


def _brief(raw: Any, limit: int = 80) -> str:
    text = repr(raw)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _roles(raw: Any, where: str) -> frozenset[Role]:
    """A list of role names, or one role name given as a string; absent means no
    role. Anything else is refused: an object such as {"admin": false} must not
    be read as the names of its keys."""
    if raw is None:
        return frozenset()
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list | tuple) or not all(isinstance(item, str) for item in items):
        raise ValueError(f"{where}: must be a role name or a list of role names, got {_brief(raw)}")
    for item in items:
        if item not in ROLE_NAMES:
            hint = "; list several as [a, b]" if any(ch.isspace() for ch in item.strip()) else ""
            raise ValueError(
                f"{where}: unknown role {_brief(item)} (known: {', '.join(ROLE_NAMES)}){hint}"
            )
    return frozenset(Role(item) for item in items)


def _optional_set(raw: Any, where: str) -> frozenset[str] | None:
    """A list of names, or one name given as a string; absent or "*" means any."""
    if raw is None:
        return None
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list | tuple) or not all(
        isinstance(item, str) and item for item in items
    ):
        raise ValueError(f"{where}: must be a name or a list of names, got {raw!r}")
    if "*" in items:
        return None
    for item in items:
        if item != item.strip() or "," in item or any(ch.isspace() for ch in item):
            raise ValueError(
                f"{where}: {item!r} is not one name; list several as [a, b], one per item"
            )
    return frozenset(items)


@dataclass(frozen=True, slots=True)
class JwtSettings:
    algorithm: str  # HS256 or RS256
    key: str  # the HMAC secret, or the RSA public key (PEM)
    issuer: str
    audience: str


class Authenticator:
    """Resolves the `authorization: Bearer <token>` metadata to a principal.

    With no tokens file and no JWT settings every caller is the local admin of
    the default tenant, and the server refuses to listen beyond loopback. The
    tokens and the JWT key can be replaced while serving (a reload); long-lived
    streams wait in `wait_lapsed` to learn when their credentials stop holding."""

    def __init__(
        self,
        tokens: dict[str, Principal] | None = None,
        jwt: JwtSettings | None = None,
        *,
        tokens_file: bool = False,
    ) -> None:
        self._tokens = dict(tokens or {})
        self._jwt = jwt
        # A configured tokens file keeps authentication on even when a reload
        # empties it: nobody is admitted, rather than everybody as admin.
        self._tokens_file = tokens_file or bool(tokens)
        self._changed = asyncio.Event()
        # Streams currently waiting for their credentials to lapse.
        self.watchers = 0

    @property
    def enabled(self) -> bool:
        return self._tokens_file or self._jwt is not None

    @property
    def jwt(self) -> JwtSettings | None:
        return self._jwt

    @classmethod
    def from_files(cls, tokens_file: str = "", jwt: JwtSettings | None = None) -> Authenticator:
        tokens: dict[str, Principal] = {}
        if tokens_file:
            tokens = load_tokens_file(Path(tokens_file))
        return cls(tokens, jwt, tokens_file=bool(tokens_file))

    def replace_tokens(self, tokens: dict[str, Principal]) -> TokenChanges:
        """Serve these tokens from now on (a reload); streams re-check theirs."""
        if not self._tokens_file:
            raise ValueError("no tokens file is configured")
        old, self._tokens = self._tokens, dict(tokens)
        self._notify()
        return TokenChanges.between(old, self._tokens)

    def replace_jwt(self, jwt: JwtSettings) -> None:
        """Verify JWTs with these settings from now on (a reloaded public key)."""
        if self._jwt is None:
            raise ValueError("JWT authentication is not configured")
        self._jwt = jwt
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def authenticate(self, metadata: Iterable[tuple[str, Any]] | None) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        header = ""
        for key, value in metadata or ():
            if key == "authorization":
                header = value if isinstance(value, str) else value.decode()
                break
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("missing bearer token", reason="TOKEN_MISSING")
        token = token.strip()
        hashed = hash_token(token)
        for known, principal in self._tokens.items():
            if hmac.compare_digest(known, hashed):
                return principal
        if self._jwt is not None and token.count(".") == 2:
            return self._from_jwt(token)
        raise Unauthenticated("unknown or invalid token", reason="TOKEN_INVALID")

    def recheck(
        self, metadata: Iterable[tuple[str, Any]] | None, principal: Principal
    ) -> Unauthenticated | None:
        """Why the credentials a stream was opened with no longer hold (None
        while they do): the JWT expired, or a reload removed or changed the token."""
        try:
            current = self.authenticate(metadata)
        except Unauthenticated as exc:
            if principal.expires_at is None and exc.reason == "TOKEN_INVALID":
                return Unauthenticated(
                    "token revoked: it is no longer in the tokens file", reason="TOKEN_REVOKED"
                )
            return Unauthenticated(f"credentials lapsed: {exc.message}", reason=exc.reason)
        if current != principal:
            return Unauthenticated(
                "token changed: its entry in the tokens file was edited; reconnect",
                reason="TOKEN_CHANGED",
            )
        return None

    async def wait_lapsed(
        self, metadata: Iterable[tuple[str, Any]] | None, principal: Principal
    ) -> Unauthenticated:
        """Wait until the credentials stop holding (at the JWT's expiry, or at a
        reload that removes or changes the token) and say why."""
        self.watchers += 1
        try:
            while True:
                error = self.recheck(metadata, principal)
                if error is not None:
                    return error
                changed = self._changed
                until = principal.expires_at
                if until is None:
                    await changed.wait()
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, until - time.time())):
                        await changed.wait()
        finally:
            self.watchers -= 1

    def _from_jwt(self, token: str) -> Principal:
        import jwt

        s = self._jwt
        assert s is not None
        try:
            claims = jwt.decode(
                token,
                s.key,
                algorithms=[s.algorithm],
                audience=s.audience,
                issuer=s.issuer,
                options={"require": ["exp", "sub", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthenticated("token expired", reason="TOKEN_EXPIRED") from exc
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"invalid token: {exc}", reason="TOKEN_INVALID") from exc
        try:
            roles = _roles(claims.get("roles"), "token claim 'roles'")
        except ValueError as exc:
            raise Unauthenticated(str(exc), reason="TOKEN_INVALID") from exc
        tenant = claims.get("tenant")
        if not isinstance(tenant, str) or not tenant:
            raise Unauthenticated("token has no tenant claim", reason="TOKEN_INVALID")
        try:
            services = _optional_set(claims.get("services"), "token claim 'services'")
            tenants = _optional_set(claims.get("tenants", [tenant]), "token claim 'tenants'")
        except ValueError as exc:
            raise Unauthenticated(str(exc), reason="TOKEN_INVALID") from exc
        if str(claims["sub"]) in RESERVED_SUBJECTS:
            raise Unauthenticated(
                f"token subject {str(claims['sub'])!r} is reserved", reason="TOKEN_INVALID"
            )
        return Principal(
            subject=str(claims["sub"]),
            tenant=tenant,
            roles=roles,
            allowed_services=services,
            allowed_tenants=tenants,
            expires_at=float(claims["exp"]),
        )

    def require(self, context: Any, role: Role) -> Principal:
        principal = self.authenticate(context.invocation_metadata())
        logs.bind_tenant(principal.tenant)
        if not principal.may(role):
            raise PermissionDenied(
                f"{principal.subject!r} lacks the {role.value!r} role",
                reason="ROLE_REQUIRED",
                metadata={"role": role.value},
            )
        return principal


@dataclass(frozen=True, slots=True)
class TokenChanges:
    """What a reload of the tokens file changed, by `tenant/subject` (never the token)."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]

    @classmethod
    def between(cls, old: dict[str, Principal], new: dict[str, Principal]) -> TokenChanges:
        def names(digests: Iterable[str], side: dict[str, Principal]) -> tuple[str, ...]:
            return tuple(sorted(f"{side[d].tenant}/{side[d].subject}" for d in digests))

        return cls(
            added=names(new.keys() - old.keys(), new),
            removed=names(old.keys() - new.keys(), old),
            changed=names((d for d in new.keys() & old.keys() if new[d] != old[d]), new),
        )

    def __str__(self) -> str:
        parts = [
            f"{label} {', '.join(names)}"
            for label, names in (
                ("added", self.added),
                ("removed", self.removed),
                ("changed", self.changed),
            )
            if names
        ]
        return "; ".join(parts) or "no entry changed"


def load_tokens_file(path: Path) -> dict[str, Principal]:
    """A YAML or JSON file:

    tokens:
      - sha256: <hex sha256 of the token>   # `jobtrace token new` prints one
        subject: billing-api
        tenant: acme
        roles: [submitter]      # role names (reader, submitter, worker, reviewer,
                                #   admin); one may be given as a string
        services: [resize]      # workers: services they may serve (default any;
                                #   one name may be given as a string; "*" is any)
        tenants: [acme]         # workers: tenants whose jobs they run (default own)

    The `tokens` list must be there (`tokens: []` admits nobody), so an empty or
    truncated file is an error, never "no tokens". Any malformed entry fails the
    whole load with a ValueError naming it."""
    text = path.read_text()
    if path.suffix == ".json":
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from exc
    else:
        import yaml

        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("tokens"), list):
        raise ValueError(f"{path}: must hold a `tokens:` list (`tokens: []` admits nobody)")
    out: dict[str, Principal] = {}
    for i, entry in enumerate(doc["tokens"]):
        where = f"{path}: tokens[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: must be a mapping (sha256, subject, tenant, roles)")
        digest = str(entry.get("sha256", "")).lower()
        if len(digest) != 64 or any(ch not in "0123456789abcdef" for ch in digest):
            raise ValueError(f"{where}: sha256 must be the 64-character hex digest of the token")
        if digest in out:
            raise ValueError(f"{where}: the same token (sha256) is listed twice")
        subject, tenant = entry.get("subject"), entry.get("tenant")
        if not isinstance(subject, str | int) or not isinstance(tenant, str | int):
            raise ValueError(f"{where}: subject and tenant are required (names)")
        if not str(subject) or not str(tenant):
            raise ValueError(f"{where}: subject and tenant are required")
        if str(subject) in RESERVED_SUBJECTS:
            raise ValueError(
                f"{where}: subject {str(subject)!r} is reserved (jobtrace records "
                "'anonymous' for callers without credentials and 'system' for its own actions)"
            )
        out[digest] = Principal(
            subject=str(subject),
            tenant=str(tenant),
            roles=_roles(entry.get("roles"), f"{where}.roles"),
            allowed_services=_optional_set(entry.get("services"), f"{where}.services"),
            allowed_tenants=_optional_set(entry.get("tenants", [str(tenant)]), f"{where}.tenants"),
        )
    return out
