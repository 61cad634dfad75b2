"""Who is calling: principals, roles and the checks servicers make."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from jobtrace.domain.errors import PermissionDenied

DEFAULT_TENANT = "default"


class Role(enum.Enum):
    READER = "reader"
    SUBMITTER = "submitter"
    WORKER = "worker"
    ADMIN = "admin"


# What each role may do besides its own name.
_IMPLIES = {
    Role.ADMIN: {Role.READER, Role.SUBMITTER, Role.WORKER, Role.ADMIN},
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

    def may(self, role: Role) -> bool:
        return any(role in _IMPLIES[r] for r in self.roles)

    @property
    def is_admin(self) -> bool:
        return Role.ADMIN in self.roles

    @property
    def read_scope(self) -> str | None:
        """The tenant reads are limited to; None for admins (all tenants)."""
        return None if self.is_admin else self.tenant


ANONYMOUS = Principal("anonymous", DEFAULT_TENANT, frozenset({Role.ADMIN}))


class Authenticator:
    """With no credentials configured every caller is the local admin of the
    default tenant; the server then binds loopback only."""

    def require(self, context: Any, role: Role) -> Principal:
        principal = ANONYMOUS
        if not principal.may(role):
            raise PermissionDenied(f"role {role.value!r} required", reason="ROLE_REQUIRED")
        return principal
