"""Attestations: built from stored facts, sanitised, canonically encoded, hash-chained
per workflow (or standalone job), signed with Ed25519; verification and DSSE export."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy.ext.asyncio import AsyncSession

from jobtrace.clock import now_us
from jobtrace.domain.errors import NotFound, Violations
from jobtrace.domain.pagination import PageTokens, position
from jobtrace.domain.validation import check_page_size
from jobtrace.model import JSON, Attestation, AttestationType, RunState, SigningKey
from jobtrace.store import attest as store
from jobtrace.store.db import Database, Tx

log = logging.getLogger(__name__)

ALGORITHM = "ed25519"
DSSE_PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://jobtrace.dev/attestation/v1"
DATA_URI_RE = re.compile(r"^data:([^,;]*)(;[^,]*)?;base64,", re.IGNORECASE)
BASE64_RE = re.compile(r"^[A-Za-z0-9+/_-]+={0,2}$")
MIN_BASE64_LENGTH = 256


# --- keys ------------------------------------------------------------------------


def key_id_of(public_raw: bytes) -> str:
    return "ed25519:" + hashlib.sha256(public_raw).hexdigest()[:16]


def public_raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class Signer:
    """The server's Ed25519 key, kept in a PEM file created on first start."""

    def __init__(self, key: Ed25519PrivateKey, created_us: int) -> None:
        self._key = key
        self.public_key = public_raw(key)
        self.key_id = key_id_of(self.public_key)
        self.created_us = created_us

    @classmethod
    def load_or_create(cls, path: Path) -> Signer:
        if path.exists():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{path} does not hold an Ed25519 private key")
            return cls(key, int(path.stat().st_mtime * 1e6))
        return cls(_write_new_key(path), now_us())

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def as_signing_key(self) -> SigningKey:
        return SigningKey(self.key_id, self.public_key, ALGORITHM, self.created_us, True)


def _write_new_key(path: Path) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return key


def rotate_key_file(path: Path) -> tuple[str, str]:
    """Retire the key in `path` (kept beside it) and write a new one. Public keys
    stay in the database, so older attestations keep verifying."""
    old = Signer.load_or_create(path)
    retired = path.with_name(f"{path.name}.{old.key_id.split(':')[1]}.retired")
    os.replace(path, retired)
    new = Signer(_write_new_key(path), now_us())
    return old.key_id, new.key_id


def load_public_key(text: str) -> Ed25519PublicKey:
    """A public key as hex or base64 of the raw 32 bytes, or PEM."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        key = serialization.load_pem_public_key(text.encode())
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("not an Ed25519 public key")
        return key
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = base64.b64decode(text)
    return Ed25519PublicKey.from_public_bytes(raw)


# --- content ------------------------------------------------------------------------


def canonical(value: Any) -> bytes:
    """Canonical JSON: sorted keys, no whitespace, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sanitize(value: Any) -> Any:
    """Replace base64 content (data: URIs, long base64 strings) by a marker with
    its SHA-256 and length, so attestations stay small and carry no images."""
    if isinstance(value, dict):
        return {k: sanitize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [sanitize(v) for v in value]
    if isinstance(value, str):
        match = DATA_URI_RE.match(value)
        if match or (len(value) >= MIN_BASE64_LENGTH and BASE64_RE.match(value)):
            marker: dict[str, Any] = {
                "redacted": "base64",
                "sha256": hashlib.sha256(value.encode()).hexdigest(),
                "length": len(value),
            }
            if match:
                marker["media_type"] = match.group(1) or "text/plain"
            return marker
    return value


TYPE_NAMES = {
    AttestationType.WORKER_COMPLETION: "worker_completion",
    AttestationType.WORKER_FAILURE: "worker_failure",
    AttestationType.WORKFLOW_COMPLETION: "workflow_completion",
    AttestationType.WORKFLOW_FAILURE: "workflow_failure",
    AttestationType.WORKFLOW_CANCELLATION: "workflow_cancellation",
}


def statement(a: Attestation) -> JSON:
    """Everything the digest covers: the whole attestation but its digest and signature."""
    return {
        "key": a.key,
        "type": TYPE_NAMES[a.type],
        "tenant": a.tenant,
        "entity_type": a.entity_type,
        "entity_id": a.entity_id,
        "workflow_id": a.workflow_id,
        "job_id": a.job_id,
        "worker_id": a.worker_id,
        "attempt": a.attempt,
        "state": a.state.name,
        "data": a.data,
        "chain_id": a.chain_id,
        "chain_seq": a.chain_seq,
        "previous_digest": a.previous_digest,
        "key_id": a.key_id,
        "create_time_us": a.created_us,
        "expire_time_us": a.expire_us,
    }


def digest_of(stmt: JSON) -> str:
    return "sha256:" + hashlib.sha256(canonical(stmt)).hexdigest()


def digest_bytes(digest: str) -> bytes:
    return bytes.fromhex(digest.removeprefix("sha256:"))


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


@dataclass(frozen=True, slots=True)
class Envelope:
    payload: bytes
    payload_type: str
    signatures: list[tuple[str, bytes]]

    def to_json(self) -> JSON:
        return {
            "payloadType": self.payload_type,
            "payload": base64.b64encode(self.payload).decode(),
            "signatures": [
                {"keyid": k, "sig": base64.b64encode(s).decode()} for k, s in self.signatures
            ],
        }


@dataclass(frozen=True, slots=True)
class Verdict:
    valid: bool
    digest_valid: bool
    signature_valid: bool
    chain_valid: bool
    previous_pruned: bool
    reason: str


def verify_offline(envelope: JSON, public_keys: dict[str, Ed25519PublicKey]) -> Verdict:
    """Check an exported DSSE envelope with public keys alone: the envelope
    signature, the statement's digest and the attestation's own signature."""
    problems: list[str] = []
    payload = base64.b64decode(envelope["payload"])
    envelope_ok = False
    for sig in envelope.get("signatures", []):
        key = public_keys.get(sig.get("keyid", ""))
        if key is None:
            continue
        try:
            key.verify(base64.b64decode(sig["sig"]), pae(envelope["payloadType"], payload))
            envelope_ok = True
        except InvalidSignature:
            pass
    if not envelope_ok:
        problems.append("no envelope signature verifies with the given public keys")
    doc = json.loads(payload)
    predicate = dict(doc.get("predicate", {}))
    stored_digest = predicate.pop("digest", "")
    signature = bytes.fromhex(predicate.pop("signature", ""))
    digest_ok = digest_of(predicate) == stored_digest
    subject = (doc.get("subject") or [{}])[0].get("digest", {}).get("sha256", "")
    digest_ok = digest_ok and stored_digest == "sha256:" + subject
    if not digest_ok:
        problems.append("content does not hash to the attested digest")
    signature_ok = False
    key = public_keys.get(predicate.get("key_id", ""))
    if key is None:
        problems.append(f"no public key {predicate.get('key_id')!r} given")
    else:
        try:
            key.verify(signature, digest_bytes(stored_digest))
            signature_ok = True
        except (InvalidSignature, ValueError):
            problems.append("attestation signature does not verify")
    valid = envelope_ok and digest_ok and signature_ok
    return Verdict(valid, digest_ok, signature_ok and envelope_ok, True, False, "; ".join(problems))


# --- the service ----------------------------------------------------------------------


class Attestor:
    def __init__(
        self, db: Database, signer: Signer, tokens: PageTokens, *, retention_s: float
    ) -> None:
        self._db = db
        self.signer = signer
        self._tokens = tokens
        self.retention_s = retention_s

    async def register_key(self) -> None:
        async def op(session: AsyncSession, tx: Tx) -> None:
            await store.register_key(session, self.signer.as_signing_key())

        await self._db.write(op)

    async def attest(
        self,
        session: AsyncSession,
        *,
        key: str,
        type: AttestationType,
        tenant: str,
        entity_type: str,
        entity_id: str,
        chain_id: str,
        state: RunState,
        data: JSON,
        workflow_id: str = "",
        job_id: str = "",
        worker_id: str = "",
        attempt: int = 0,
    ) -> Attestation:
        """Build, chain, sign and store one attestation inside the caller's transaction."""
        last_seq, last_digest = await store.chain_head(session, chain_id)
        now = now_us()
        draft = Attestation(
            key=key,
            tenant=tenant,
            type=type,
            entity_type=entity_type,
            entity_id=entity_id,
            workflow_id=workflow_id,
            job_id=job_id,
            worker_id=worker_id,
            attempt=attempt,
            state=state,
            data=sanitize(data),
            chain_id=chain_id,
            chain_seq=last_seq + 1,
            digest="",
            previous_digest=last_digest,
            signature=b"",
            key_id=self.signer.key_id,
            created_us=now,
            expire_us=now + int(self.retention_s * 1e6),
        )
        # Round-trip through JSON so the digest covers exactly what is stored.
        draft = _replace_data(draft, json.loads(canonical(draft.data)))
        digest = digest_of(statement(draft))
        signed = _sign(draft, digest, self.signer.sign(digest_bytes(digest)))
        await store.insert_attestation(session, signed)
        return signed

    async def get(self, tenant: str | None, key: str) -> Attestation:
        v = Violations()
        if not key:
            v.add("key", "required")
        v.raise_if_any()
        async with self._db.read() as session:
            found = await store.get(session, key, tenant)
        if found is None:
            raise NotFound(
                f"attestation {key!r} not found",
                reason="ATTESTATION_NOT_FOUND",
                metadata={"key": key},
            )
        return found

    async def list_attestations(
        self,
        tenant: str | None,
        *,
        workflow_id: str,
        job_id: str,
        type: int,
        page_size: int,
        page_token: str,
    ) -> tuple[list[Attestation], str]:
        v = Violations()
        limit = check_page_size(v, "page_size", page_size)
        if type not in AttestationType.__members__.values():
            v.add("type", f"unknown AttestationType value {type}")
        filters = {"workflow_id": workflow_id, "job_id": job_id, "type": type, "tenant": tenant}
        after = position(self._tokens, v, "page_token", page_token, "attestations", filters)
        v.raise_if_any()
        async with self._db.read() as session:
            items = await store.list_page(
                session,
                tenant=tenant,
                workflow_id=workflow_id,
                job_id=job_id,
                type=type,
                after_seq=after,
                limit=limit + 1,
            )
        if len(items) > limit:
            items = items[:limit]
            return items, self._tokens.encode("attestations", filters, items[-1].seq)
        return items, ""

    async def verify(self, tenant: str | None, key: str) -> Verdict:
        a = await self.get(tenant, key)
        async with self._db.read() as session:
            public = {k.key_id: k for k in await store.keys(session)}
            previous = (
                await store.link(session, a.chain_id, a.chain_seq - 1) if a.chain_seq > 1 else None
            )
            pruned_digest = (
                await store.pruned_link(session, a.chain_id, a.chain_seq - 1)
                if a.chain_seq > 1 and previous is None
                else None
            )
        problems: list[str] = []
        digest_ok = digest_of(statement(a)) == a.digest
        if not digest_ok:
            problems.append("stored content does not hash to the stored digest (content altered)")
        signature_ok = False
        signing_key = public.get(a.key_id)
        if signing_key is None:
            problems.append(f"signing key {a.key_id!r} is unknown")
        else:
            try:
                Ed25519PublicKey.from_public_bytes(signing_key.public_key).verify(
                    a.signature, digest_bytes(a.digest)
                )
                signature_ok = True
            except (InvalidSignature, ValueError):
                problems.append(f"signature does not verify under key {a.key_id!r}")
        pruned = False
        if a.chain_seq == 1:
            chain_ok = a.previous_digest == ""
            if not chain_ok:
                problems.append("first link of its chain names a previous digest")
        elif previous is not None:
            chain_ok = previous.digest == a.previous_digest
            if not chain_ok:
                problems.append(
                    f"previous_digest does not match attestation {previous.key!r} "
                    f"(chain {a.chain_id} link {a.chain_seq - 1})"
                )
        elif pruned_digest is not None:
            pruned = True
            chain_ok = pruned_digest == a.previous_digest
            if not chain_ok:
                problems.append("previous_digest does not match the pruned link's digest")
        else:
            chain_ok = False
            problems.append(
                f"previous link {a.chain_seq - 1} of chain {a.chain_id} is missing and was not "
                "pruned by retention (deleted or tampered)"
            )
        valid = digest_ok and signature_ok and chain_ok
        return Verdict(valid, digest_ok, signature_ok, chain_ok, pruned, "; ".join(problems))

    async def keys(self) -> list[SigningKey]:
        async with self._db.read() as session:
            return await store.keys(session)

    def envelope(self, a: Attestation) -> Envelope:
        predicate = {**statement(a), "digest": a.digest, "signature": a.signature.hex()}
        doc = {
            "_type": STATEMENT_TYPE,
            "subject": [{"name": a.key, "digest": {"sha256": a.digest.removeprefix("sha256:")}}],
            "predicateType": PREDICATE_TYPE,
            "predicate": predicate,
        }
        payload = canonical(doc)
        signature = self.signer.sign(pae(DSSE_PAYLOAD_TYPE, payload))
        return Envelope(payload, DSSE_PAYLOAD_TYPE, [(self.signer.key_id, signature)])

    async def sweep_once(self, batch: int = 500) -> int:
        total = 0
        while True:

            async def op(session: AsyncSession, tx: Tx) -> int:
                return await store.prune_expired(session, now_us(), batch)

            n = await self._db.write(op)
            total += n
            if n < batch:
                return total


def _replace_data(a: Attestation, data: JSON) -> Attestation:
    from dataclasses import replace

    return replace(a, data=data)


def _sign(a: Attestation, digest: str, signature: bytes) -> Attestation:
    from dataclasses import replace

    return replace(a, digest=digest, signature=signature)
