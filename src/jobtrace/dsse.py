"""DSSE envelopes of attestations: what is signed, and checking an exported one
with public keys alone. Shared by the server (which signs), the client
(`jobtrace.client.verify_offline`) and the CLI (`jobtrace attest verify FILE
--public-key`); no gRPC, no SQL.

Two signatures, both Ed25519 by the attestation's key (`key_id`):
- the attestation's own: over the 32 raw bytes of its SHA-256 digest (not the hex
  text), the digest being that of the RFC 8785 (JCS) canonical JSON of the
  statement's predicate without its `digest` and `signature` members;
- the envelope's: over the DSSE pre-authentication encoding (PAE) of the payload
  type and the payload (the in-toto Statement, canonical JSON).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from jobtrace.domain import jcs

JSON = Any
DSSE_PAYLOAD_TYPE = "application/vnd.in-toto+json"


def key_id_of(public_raw: bytes) -> str:
    return "ed25519:" + hashlib.sha256(public_raw).hexdigest()[:16]


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


def canonical(value: Any) -> bytes:
    """The bytes a digest covers: RFC 8785 (JCS) canonical JSON, so a verifier in any
    language reproduces them with a JCS library (see jobtrace.domain.jcs). Raises
    jcs.NotCanonicalizable (a ValueError) for NaN, infinities and other non-JSON."""
    return jcs.dumps(value)


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
class OfflineVerdict:
    """What public keys alone can tell about one exported attestation. `valid`:
    the envelope signature, the digest of the content and the attestation's
    signature all check out. Its place in the hash chain (that no attestation
    before it was altered or deleted) is not examined: VerifyAttestation on the
    server does that."""

    valid: bool
    # The content hashes to the attested digest.
    digest_valid: bool
    # Both signatures (the envelope's and the attestation's) verify.
    signature_valid: bool
    # Empty when valid; else every problem found, "; "-separated.
    reason: str
    # The signing key the attestation names.
    key_id: str
    # The in-toto Statement the envelope carries (its predicate: the attestation).
    statement: dict[str, Any]

    @property
    def chain_checked(self) -> bool:
        """Always False: one attestation alone cannot show its place in the chain."""
        return False


class MalformedEnvelope(ValueError):
    """An exported envelope, or the statement in it, that is not the shape
    `jobtrace attest export` writes: named by its first wrong part, in one line."""


_KINDS: dict[type, str] = {dict: "an object", list: "a list", str: "a string"}


def _member(obj: dict[str, Any], name: str, kind: type, where: str) -> Any:
    value = obj.get(name)
    if not isinstance(value, kind):
        got = "missing" if value is None else f"{_json_kind(value)}"
        raise MalformedEnvelope(f"{where}.{name} must be {_KINDS[kind]} (got {got})")
    return value


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return _KINDS.get(type(value), type(value).__name__)


def _base64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise MalformedEnvelope(f"{where} is not base64: {exc}") from None


def parse_envelope(envelope: Any) -> tuple[Envelope, JSON]:
    """The envelope (as loaded from its JSON file) and the statement it carries,
    checked for shape before anything is verified: MalformedEnvelope otherwise."""
    if not isinstance(envelope, dict):
        raise MalformedEnvelope(f"envelope must be a JSON object (got {_json_kind(envelope)})")
    payload_type = _member(envelope, "payloadType", str, "envelope")
    payload = _base64(_member(envelope, "payload", str, "envelope"), "envelope.payload")
    signatures: list[tuple[str, bytes]] = []
    for i, sig in enumerate(_member(envelope, "signatures", list, "envelope")):
        where = f"envelope.signatures[{i}]"
        if not isinstance(sig, dict):
            raise MalformedEnvelope(f"{where} must be an object (got {_json_kind(sig)})")
        keyid = _member(sig, "keyid", str, where)
        signatures.append((keyid, _base64(_member(sig, "sig", str, where), f"{where}.sig")))
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        # UnicodeDecodeError and JSONDecodeError are ValueErrors.
        message = str(exc) if isinstance(exc, ValueError) else "nested too deeply"
        raise MalformedEnvelope(f"envelope.payload is not JSON: {message}") from None
    if not isinstance(doc, dict):
        raise MalformedEnvelope(f"statement must be a JSON object (got {_json_kind(doc)})")
    predicate = _member(doc, "predicate", dict, "statement")
    for name in ("digest", "signature", "key_id"):
        _member(predicate, name, str, "statement.predicate")
    subjects = _member(doc, "subject", list, "statement")
    if not subjects or not isinstance(subjects[0], dict):
        raise MalformedEnvelope("statement.subject[0] must be an object")
    digests = _member(subjects[0], "digest", dict, "statement.subject[0]")
    _member(digests, "sha256", str, "statement.subject[0].digest")
    return Envelope(payload, payload_type, signatures), doc


def verify_offline(envelope: Any, public_keys: Mapping[str, Ed25519PublicKey]) -> OfflineVerdict:
    """Check an exported DSSE envelope with public keys alone: the envelope
    signature, the statement's digest and the attestation's own signature. The
    envelope is signed by the attestation's key (key_id), so that one public key
    suffices. What this cannot establish is the chain: that previous_digest is
    the digest of a real previous attestation, and that none was deleted after
    this one, needs the rest of the chain (VerifyAttestation on the server).
    A malformed envelope raises MalformedEnvelope (a ValueError)."""
    parsed, doc = parse_envelope(envelope)
    problems: list[str] = []
    envelope_ok = False
    signed_by: list[str] = []
    for keyid, sig in parsed.signatures:
        signed_by.append(keyid)
        key = public_keys.get(keyid)
        if key is None:
            continue
        try:
            key.verify(sig, pae(parsed.payload_type, parsed.payload))
            envelope_ok = True
        except InvalidSignature:
            pass
    if not envelope_ok:
        problems.append(
            f"no envelope signature verifies with the given public keys (signed by {signed_by})"
        )
    predicate = dict(doc["predicate"])
    stored_digest: str = predicate.pop("digest")
    signature_hex: str = predicate.pop("signature")
    try:
        digest_ok = digest_of(predicate) == stored_digest
    except (ValueError, RecursionError) as exc:
        digest_ok = False
        problems.append(f"content has no canonical (RFC 8785) encoding: {exc}")
    subject = doc["subject"][0]["digest"]["sha256"]
    digest_ok = digest_ok and stored_digest == "sha256:" + subject
    if not digest_ok:
        problems.append("content does not hash to the attested digest")
    signature_ok = False
    key = public_keys.get(predicate["key_id"])
    if key is None:
        problems.append(f"no public key {predicate['key_id']!r} given")
    else:
        try:
            key.verify(bytes.fromhex(signature_hex), digest_bytes(stored_digest))
            signature_ok = True
        except (InvalidSignature, ValueError):
            problems.append("attestation signature does not verify")
    return OfflineVerdict(
        valid=envelope_ok and digest_ok and signature_ok,
        digest_valid=digest_ok,
        signature_valid=signature_ok and envelope_ok,
        reason="; ".join(problems),
        key_id=predicate["key_id"],
        statement=doc,
    )
