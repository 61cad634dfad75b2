"""Who a worker is: the tenant and subject of its credentials and the id it names itself."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WorkerIdentity:
    """A worker session's identity. Two hellos are the same worker (the newer
    replaces the older and may resume its leases) only if all three parts are
    equal: a worker id is scoped to the caller's tenant and subject, so no
    caller can take over, or learn of, another's session."""

    tenant: str
    subject: str
    worker_id: str
    # Whether the caller presented credentials (with auth off every caller is
    # the same anonymous admin, and the worker's own id is its name).
    authenticated: bool = True

    @property
    def holder(self) -> str:
        """How a lease records its holder: a digest of the three parts, each
        encoded on its own (a JSON array), so that no two identities share it
        however their parts are spelled (`team` + `x/w1` is not `team/x` +
        `w1`), of a fixed length, and telling nothing about the tenant."""
        return holder_of(self.tenant, self.subject, self.worker_id)

    @property
    def name(self) -> str:
        """The worker as jobs, trace events and logs name it (a label, never
        compared): its id, after its subject when the caller is authenticated."""
        return f"{self.subject}/{self.worker_id}" if self.authenticated else self.worker_id


def holder_of(tenant: str, subject: str, worker_id: str) -> str:
    # Migration 0006 computes the same value for leases taken before it: keep
    # the two in step.
    encoded = json.dumps([tenant, subject, worker_id], separators=(",", ":"))
    return hashlib.sha256(encoded.encode()).hexdigest()
