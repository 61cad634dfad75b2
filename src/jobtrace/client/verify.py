"""Offline verification of exported attestations, for Python users (the CLI's
`jobtrace attest verify FILE --public-key` does the same through jobtrace.dsse)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from jobtrace import dsse
from jobtrace.client.api import envelope_json
from jobtrace.client.errors import FieldViolation, InvalidInput
from jobtrace.dsse import OfflineVerdict
from jobtrace.pb import attestation_service_pb2

# A public key as Ed25519PublicKey, a SigningKey from GetSigningKeys, its 32 raw
# bytes, or text: PEM, or hex or base64 of the raw bytes.
PublicKey = Ed25519PublicKey | attestation_service_pb2.SigningKey | bytes | str
Envelope = Mapping[str, Any] | str | bytes | attestation_service_pb2.DsseEnvelope


def verify_offline(
    envelope: Envelope, public_keys: Iterable[PublicKey] | Mapping[str, PublicKey]
) -> OfflineVerdict:
    """Check an exported attestation with public keys alone, no server: the DSSE
    envelope's signature, that the content hashes to the attested digest, and the
    attestation's signature (over the 32 raw bytes of that digest).

    `envelope`: the JSON form (`client.export_attestation(key)`, or the text of
    a `jobtrace attest export` file) or the DsseEnvelope of GetAttestation with
    `include_envelope`. `public_keys`: the keys to trust (`client.get_signing_keys()`
    fetched once and kept, or PEM files), as a list or a mapping by key id (the
    ids are recomputed from the keys).

    Returns an OfflineVerdict: `valid`, or not with every problem in `reason`
    (a tampered payload, an unknown key...). Raises InvalidInput (a JobtraceError
    and a ValueError) for an envelope that is not one, or a key that cannot be read.
    The attestation's place in the hash chain needs the server
    (`client.verify_attestation(key)`)."""
    keys: dict[str, Ed25519PublicKey] = {}
    items = public_keys.values() if isinstance(public_keys, Mapping) else public_keys
    for i, item in enumerate(items):
        key = _public_key(item, f"public_keys[{i}]")
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        keys[dsse.key_id_of(raw)] = key
    try:
        return dsse.verify_offline(_envelope_json(envelope), keys)
    except dsse.MalformedEnvelope as exc:
        raise InvalidInput(str(exc)) from None
    except RecursionError:
        raise InvalidInput("envelope: nested too deeply") from None


def _envelope_json(envelope: Envelope) -> Any:
    if isinstance(envelope, attestation_service_pb2.DsseEnvelope):
        return envelope_json(envelope)
    if isinstance(envelope, str | bytes):
        try:
            return json.loads(envelope)
        except ValueError as exc:
            raise InvalidInput(f"envelope is not JSON: {exc}") from None
    return envelope


def _public_key(item: PublicKey, where: str) -> Ed25519PublicKey:
    if isinstance(item, Ed25519PublicKey):
        return item
    try:
        if isinstance(item, attestation_service_pb2.SigningKey):
            return Ed25519PublicKey.from_public_bytes(item.public_key)
        if isinstance(item, bytes):
            return Ed25519PublicKey.from_public_bytes(item)
        if isinstance(item, str):
            return dsse.load_public_key(item)
    except (ValueError, UnsupportedAlgorithm) as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise InvalidInput([FieldViolation(where, f"not an Ed25519 public key ({text})")]) from None
    raise InvalidInput([FieldViolation(where, f"expected a public key, got {type(item).__name__}")])
