"""Attestations: built from stored facts, sanitised, canonically encoded, hash-chained
per workflow (or standalone job), signed with Ed25519; verification and DSSE export."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy.ext.asyncio import AsyncSession

from jobtrace import dsse
from jobtrace.clock import now_us
from jobtrace.domain import annotated, jcs
from jobtrace.domain import redact as redact_rules
from jobtrace.domain.errors import DataLoss, NotFound, Violations
from jobtrace.domain.pagination import Encoder, PageTokens, fill, position
from jobtrace.domain.redact import Redaction
from jobtrace.domain.run_filters import (
    NO_ATTESTATION_FILTER,
    AttestationFilter,
    check_attestation_filter,
)
from jobtrace.domain.validation import check_page_size, check_view
from jobtrace.dsse import (  # the server signs what jobtrace.dsse verifies
    DSSE_PAYLOAD_TYPE,
    Envelope,
    digest_bytes,
    pae,
)
from jobtrace.dsse import MalformedEnvelope as MalformedEnvelope
from jobtrace.dsse import canonical as canonical
from jobtrace.dsse import digest_of as digest_of
from jobtrace.dsse import key_id_of as key_id_of
from jobtrace.dsse import load_public_key as load_public_key
from jobtrace.dsse import parse_envelope as parse_envelope
from jobtrace.model import JSON, Attestation, AttestationType, RunState, SigningKey
from jobtrace.store import attest as store
from jobtrace.store.db import Database, Tx

log = logging.getLogger(__name__)

ALGORITHM = "ed25519"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://jobtrace.dev/attestation/v1"


# --- keys ------------------------------------------------------------------------


def public_raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class Signer:
    """The server's Ed25519 keys: the active one, kept in a PEM file created on first
    start, and the ones `rotate_key_file` retired beside it. Retired keys sign
    nothing new; they sign the DSSE envelopes of the attestations they signed, so
    the attestation's own public key verifies its envelope too."""

    def __init__(
        self, key: Ed25519PrivateKey, created_us: int, retired: Iterable[Ed25519PrivateKey] = ()
    ) -> None:
        self._key = key
        self.public_key = public_raw(key)
        self.key_id = key_id_of(self.public_key)
        self.created_us = created_us
        self._keys = {key_id_of(public_raw(k)): k for k in retired}
        self._keys[self.key_id] = key

    @classmethod
    def load_or_create(cls, path: Path) -> Signer:
        retired = _retired_keys(path)
        if path.exists():
            return cls(_load_private_key(path), int(path.stat().st_mtime * 1e6), retired)
        return cls(_write_new_key(path), now_us(), retired)

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def sign_as(self, key_id: str, message: bytes) -> bytes | None:
        """Sign with the key `key_id`, active or retired; None if this server lacks it."""
        key = self._keys.get(key_id)
        return None if key is None else key.sign(message)

    def as_signing_key(self) -> SigningKey:
        return SigningKey(self.key_id, self.public_key, ALGORITHM, self.created_us, True)


def _load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} does not hold an Ed25519 private key")
    return key


def _retired_path(path: Path, key_id: str) -> Path:
    return path.with_name(f"{path.name}.{key_id.split(':')[1]}.retired")


def _retired_keys(path: Path) -> list[Ed25519PrivateKey]:
    """The keys rotate_key_file retired beside `path`. One that does not load is
    skipped with a warning: it only costs envelopes signed by another key."""
    if not path.parent.is_dir():
        return []
    keys = []
    for candidate in sorted(path.parent.iterdir()):
        name = candidate.name
        if not (name.startswith(path.name + ".") and name.endswith(".retired")):
            continue
        try:
            keys.append(_load_private_key(candidate))
        except (OSError, ValueError, TypeError) as exc:
            log.warning("retired signing key %s not loaded: %s", candidate, exc)
    return keys


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
    stay in the database, so older attestations keep verifying; the server keeps
    loading the retired private key to sign those attestations' DSSE envelopes."""
    old = Signer.load_or_create(path)
    os.replace(path, _retired_path(path, old.key_id))
    new = Signer(_write_new_key(path), now_us())
    return old.key_id, new.key_id


# --- content ------------------------------------------------------------------------


# A data: URI (RFC 2397): "data:" [type/subtype] *(";" parameter) ["base64"] ",".
# Strict enough that prose such as "data: 3 rows, 2 columns" is not one.
#
# The header is parsed by _Headers, not by one regular expression searched
# through the text: each failed search attempt scans to the end of its parameter
# run, and "data:;a=" * n starts n attempts on one run (quadratic: 33 s of a frozen
# server for 128 KB). Every quantifier below is possessive, so no match
# backtracks, and _Headers reads a parameter run once however many "data:" share it.
_TOKEN = r"[a-z0-9!#$&^_.+-]++"
_MEDIA_TYPE = rf"((?:{_TOKEN}/{_TOKEN})?)"
# "data:" and the media type, where a ";" or "," follows: where a header may start.
_HEADER_START = re.compile(rf"\s*+data:{_MEDIA_TYPE}(?=[;,])", re.IGNORECASE)
_EMBEDDED_HEADER_START = re.compile(rf"(?<![\w.+-])data:{_MEDIA_TYPE}(?=[;,])", re.IGNORECASE)
_PARAMETERS = re.compile(rf"(?:;{_TOKEN}(?:=[^;,\s]*+)?)*+", re.IGNORECASE)
# Where an embedded data: URI ends: its base64 run, or the first character a URI
# in prose, markup or markdown cannot hold.
_EMBEDDED_BASE64_END = re.compile(r"[A-Za-z0-9+/_-]*+=*+")
_EMBEDDED_TEXT_END = re.compile(r"[^\s\"'()<>\[\]]*+")
_BASE64_STD = re.compile(r"[A-Za-z0-9+/]++={0,2}+")
_BASE64_URL = re.compile(r"[A-Za-z0-9_-]++={0,2}+")
# Shorter bare base64 is kept unless it decodes to a known binary format: it is
# mostly ids, tokens, cursors and digests (a SHA-512 is 88 characters), which are
# evidence worth keeping.
MIN_BARE_BASE64 = 100
MIN_MAGIC_BASE64 = 12
# Leading bytes of binary formats: (offset, bytes, media type).
MAGIC: list[tuple[int, bytes, str]] = [
    (0, b"\x89PNG\r\n\x1a\n", "image/png"),
    (0, b"\xff\xd8\xff", "image/jpeg"),
    (0, b"GIF87a", "image/gif"),
    (0, b"GIF89a", "image/gif"),
    (8, b"WEBP", "image/webp"),
    (8, b"WAVE", "audio/wav"),
    (8, b"AVI ", "video/x-msvideo"),
    (0, b"II*\x00", "image/tiff"),
    (0, b"MM\x00*", "image/tiff"),
    (0, b"\x00\x00\x01\x00", "image/vnd.microsoft.icon"),
    (0, b"<svg", "image/svg+xml"),
    (0, b"<?xml", "application/xml"),
    (0, b"%PDF-", "application/pdf"),
    (0, b"PK\x03\x04", "application/zip"),
    (0, b"\x1f\x8b\x08", "application/gzip"),
    (0, b"(\xb5/\xfd", "application/zstd"),
    (0, b"7z\xbc\xaf\x27\x1c", "application/x-7z-compressed"),
    (0, b"OggS", "audio/ogg"),
    (0, b"fLaC", "audio/flac"),
    (0, b"ID3", "audio/mpeg"),
    (0, b"\x1aE\xdf\xa3", "video/webm"),
    (4, b"ftyp", "video/mp4"),
    (0, b"wOFF", "font/woff"),
    (0, b"wOF2", "font/woff2"),
    (0, b"\x00asm", "application/wasm"),
    (0, b"\x7fELF", "application/x-executable"),
]


def sanitize(value: Any, redaction: Redaction = redact_rules.DEFAULT) -> Any:
    """Replace encoded content by a marker with its SHA-256 and length, so
    attestations stay small and carry no images. Encoded content is:
    - any data: URI, base64 or not (`data:image/svg+xml,<svg ...`);
    - bare base64, standard or URL-safe, also when wrapped in lines (MIME, PEM),
      that decodes to a known binary format (PNG, JPEG, GIF, WebP, PDF, ZIP...) or
      is at least MIN_BARE_BASE64 characters mixing upper case, lower case and
      digits. Words, hex digests and prose never qualify.
    A whole value becomes a marker object; a data: URI inside longer text, or in an
    object member's name, becomes a marker string in place.

    Content is replaced only by a marker shorter than itself (108 to about 140
    characters, more for a long media type; see _marker_object and _marker_text),
    so that no request makes evidence larger than it sent; shorter content is kept
    verbatim, as text: it is smaller than any evidence of it, and too small to be
    a meaningful image. A whole value too short for a marker object is then read
    as text, whose data: URIs may still be long enough for a marker string.

    Markers cannot be forged: caller data shaped like one is escaped, so that an
    object with a member named "redacted" and text holding "[redacted" are the
    server's alone (see _escape_text and _escape_name).

    Credentials are redacted in the same pass (see jobtrace.domain.redact and
    `redaction`): the value of a member whose name is a secret's, and a whole
    value that is a credential, become {"redacted": "secret", "reason": rule}; a
    credential inside longer text becomes "[redacted secret <rule>]". Those
    markers are as unforgeable as the others, and carry no digest.

    So the evidence never grows but by its escapes and its secret markers (at
    most about 50 bytes each): each "[" + "\\"*n + "redacted"
    in caller text gains a backslash (2 bytes of canonical JSON for at least 9
    characters) and each member named "$"*n + "redacted" a "$" (1 byte for a member
    of at least 12), hence
        len(canonical(sanitize(v))) <= len(canonical(v)) * 11 / 9,
    and <= len(canonical(v)) for evidence that holds neither. Time and memory are
    linear in the size of `value`."""
    return _clean(value, redaction, encoded=True)


def redact(value: Any, redaction: Redaction = redact_rules.DEFAULT) -> Any:
    """`value` with its credentials redacted and caller text shaped like a marker
    escaped, as `sanitize` does, but encoded content kept: for trace events and
    annotations, which readers see as written. Linear time, like `sanitize`."""
    return _clean(value, redaction, encoded=False)


def redact_text(text: str, redaction: Redaction = redact_rules.DEFAULT) -> str:
    """Text that must stay text (a message, a stack trace): each credential in it
    replaced by a marker string, the rest escaped, as `redact` does."""
    spans = list(redaction.credentials(text))
    return _splice(text, spans, encoded=False) if spans else _escape_text(text)


def _clean(value: Any, r: Redaction, *, encoded: bool) -> Any:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for name, member in value.items():
            rule = r.secret_member(name) if member is not None else None
            clean_name = _clean_name(name, r, encoded=encoded)
            out[clean_name] = (
                redact_rules.marker(rule)
                if rule is not None
                else _clean(member, r, encoded=encoded)
            )
        return out
    if isinstance(value, list):
        return [_clean(v, r, encoded=encoded) for v in value]
    if isinstance(value, str):
        spans = list(r.credentials(value))
        if spans:
            start, end, rule = spans[0]
            if start == 0 and end == len(value):
                return redact_rules.marker(rule)
            return _splice(value, spans, encoded=encoded)
        if not encoded:
            return _escape_text(value)
        found = _encoded(value)
        if found is not None:
            marker = _marker_object(found[0], found[1], value)
            if marker is not None:
                return marker
        return _redact_embedded(value)
    return value


def _clean_name(name: str, r: Redaction, *, encoded: bool) -> str:
    spans = list(r.credentials(name))
    if spans:
        return _escape_name(_splice(name, spans, encoded=encoded))
    return sanitize_name(name) if encoded else _escape_name(_escape_text(name))


def _splice(text: str, spans: list[tuple[int, int, str]], *, encoded: bool) -> str:
    """`text` with each credential span replaced by a marker string, the text
    between them sanitised (or only escaped)."""
    rest = _redact_embedded if encoded else _escape_text
    parts: list[str] = []
    copied = 0
    for start, end, rule in spans:
        parts += [rest(text[copied:start]), redact_rules.marker_text(rule)]
        copied = end
    parts.append(rest(text[copied:]))
    return "".join(parts)


@dataclass(frozen=True, slots=True)
class Sanitized:
    """Evidence the server sanitised already, and may have given markers of its
    own (see jobtrace.domain.evidence): an attestation takes it as is, since
    sanitising it again would escape those markers as if a caller wrote them."""

    value: Any


def sanitize_name(name: str, redaction: Redaction | None = None) -> str:
    """An object member's name as `sanitize` writes it (without redaction unless
    `redaction` is given)."""
    if redaction is not None:
        return _clean_name(name, redaction, encoded=True)
    return _escape_name(_sanitize_text(name))


# A marker object is an object with this member; a marker string starts with
# MARKER_TEXT. Caller data of either shape gets one more escape character, so a
# reader tells the two apart and no two caller values (or names) become one:
#   member name  "redacted", "$redacted", "$$redacted", ...  -> one more leading "$"
#   text         "[redacted", "[\redacted", "[\\redacted", ...  -> one more "\" after "["
MARKER_MEMBER = "redacted"
MARKER_TEXT = "[redacted "
_FORGED_MARKER_TEXT = re.compile(r"\[(?=\\*+redacted)")


def _escape_text(text: str) -> str:
    """Caller text with every "[", "\\"*n, "redacted" given one more backslash: it can
    then hold no marker string, and distinct texts stay distinct."""
    if "redacted" not in text:
        return text
    return _FORGED_MARKER_TEXT.sub(r"[\\", text)


def _escape_name(name: str) -> str:
    """A member name of the form "$"*n + "redacted" gets one more "$" (marker
    strings, the only other names sanitize writes, never have this form)."""
    if name.endswith(MARKER_MEMBER) and name.lstrip("$") == MARKER_MEMBER:
        return "$" + name
    return name


class _Headers:
    """Parses the data: URI headers of one text in time linear in its length.

    Where a header may start, and its media type, are found by one search (a
    media type holds no ":", so two candidates never scan the same characters).
    The parameter run that follows ("*(;token[=value])") can be shared by many
    candidates: every ";" in it starts a parameter, so a run entered at any of
    its ";" ends where it ended before. The last run read is remembered with
    its outcome, and a failed run is skipped up to its last ";", the first
    place a header that does not share it can start."""

    def __init__(self, text: str) -> None:
        self._text = text
        # The last parameter run read: where it started, where it ended, where
        # its last ";" is.
        self._run = (-1, -1, -1)
        # After a failed candidate: where the next one may start.
        self.resume = 0

    def parse(self, start: re.Match[str]) -> tuple[int, str, str] | None:
        """For a match of a *_HEADER_START pattern: (index past the header's ",",
        media type, marker kind), or None if no header follows (then `resume`
        says where the next candidate may start)."""
        text = self._text
        params = end = start.end()
        if text.startswith(";", params):
            run_start, run_end, last = self._run
            if not run_start <= params <= run_end:
                run = _PARAMETERS.match(text, params)
                assert run is not None  # it matches the empty string
                run_start, run_end = params, run.end()
                last = text.rfind(";", params, run_end + 1)
                self._run = (run_start, run_end, last)
            end = run_end
            self.resume = last - 4  # "data:" ending past the last ";"
        if not text.startswith(",", end):
            self.resume = max(self.resume, start.start() + 1)
            return None
        # Lower-casing never shortens text, so the last 7 characters decide.
        base64 = text[max(params, end - 7) : end].lower().endswith(";base64")
        return end + 1, start.group(1) or "text/plain", "base64" if base64 else "data_uri"


def _encoded(text: str) -> tuple[str, str] | None:
    """(marker kind, media type or '') when the whole of `text` is encoded content."""
    start = _HEADER_START.match(text)
    if start:
        header = _Headers(text).parse(start)
        if header is not None:
            _, media_type, kind = header
            return kind, media_type
    compact = _unwrapped(text)
    if compact is None or len(compact) < MIN_MAGIC_BASE64:
        return None
    head = _decoded_head(compact)
    if head is None:
        return None
    media_type = _magic(head)
    if media_type:
        return "base64", media_type
    if len(compact) >= MIN_BARE_BASE64 and _mixes_character_classes(compact):
        return "base64", ""
    return None


def _sanitize_text(text: str) -> str:
    """`text`, or a marker string if the whole of it is encoded content longer
    than that marker."""
    found = _encoded(text)
    if found is not None:
        marker = _marker_text(found[0], found[1], text)
        if marker is not None:
            return marker
    return _redact_embedded(text)


def _redact_embedded(text: str) -> str:
    """`text` with each data: URI in it replaced by a marker string, the rest escaped."""
    if "data:" not in text.lower():
        return _escape_text(text)
    headers = _Headers(text)
    parts: list[str] = []
    copied = search = 0
    while start := _EMBEDDED_HEADER_START.search(text, search):
        header = headers.parse(start)
        if header is None:
            search = headers.resume
            continue
        body_start, media_type, kind = header
        body = _EMBEDDED_BASE64_END if kind == "base64" else _EMBEDDED_TEXT_END
        end = body.match(text, body_start)
        stop = end.end() if end else body_start
        marker = _marker_text(kind, media_type, text[start.start() : stop])
        if marker is not None:
            parts += [_escape_text(text[copied : start.start()]), marker]
            copied = stop
        # else the URI is kept, and escaped with the text around it.
        search = stop
    return "".join(parts) + _escape_text(text[copied:])


# The size of a marker but for its media type and the digits of its length:
#   "[redacted " kind " " media type " sha256:" 64 hex digits " length:" digits "]"
#   {"length":digits,"media_type":"media type","redacted":"kind","sha256":"64 hex digits"}
# (canonical JSON of the object; without media type, no "media_type" member).
_MARKER_TEXT_SIZE = len(MARKER_TEXT + "  sha256: length:]") + 64
_MARKER_OBJECT_SIZE = len('{"length":,"' + MARKER_MEMBER + '":"","sha256":""}') + 64
_MEDIA_TYPE_MEMBER_SIZE = len(',"media_type":""')


def _marker_text(kind: str, media_type: str, content: str) -> str | None:
    """The marker string for `content`, or None if it would not be shorter than
    `content` (which is then kept)."""
    media_type = media_type or "content"
    length = len(content)
    if _MARKER_TEXT_SIZE + len(kind) + len(media_type) + len(str(length)) >= length:
        return None
    digest = hashlib.sha256(content.encode()).hexdigest()
    return f"{MARKER_TEXT}{kind} {media_type} sha256:{digest} length:{length}]"


def _marker_object(kind: str, media_type: str, content: str) -> dict[str, Any] | None:
    """The marker object for `content`, or None if its canonical encoding would not
    be shorter than `content` (which is then kept)."""
    length = len(content)
    size = _MARKER_OBJECT_SIZE + len(kind) + len(str(length))
    if media_type:
        size += _MEDIA_TYPE_MEMBER_SIZE + len(media_type)
    if size >= length:
        return None
    marker: dict[str, Any] = {
        MARKER_MEMBER: kind,
        "sha256": hashlib.sha256(content.encode()).hexdigest(),
        "length": length,
    }
    if media_type:
        marker["media_type"] = media_type
    return marker


def _unwrapped(text: str) -> str | None:
    """`text` without the line breaks of wrapped base64 (equal lines, a shorter last
    one), or None if it has line breaks laid out otherwise."""
    if "\n" not in text:
        return text
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if lines[-1] == "":
        lines.pop()
    width = len(lines[0]) if lines else 0
    if width == 0 or width % 4:
        return None
    if any(len(line) != width for line in lines[:-1]) or not 0 < len(lines[-1]) <= width:
        return None
    return "".join(lines)


def _decoded_head(compact: str) -> bytes | None:
    """The first bytes `compact` decodes to, if it is well-formed base64 in one
    alphabet (padding optional), else None."""
    if len(compact) % 4 == 1 or ("=" in compact and len(compact) % 4):
        return None
    if _BASE64_STD.fullmatch(compact):
        altchars = None
    elif _BASE64_URL.fullmatch(compact):
        altchars = b"-_"
    else:
        return None
    head = compact.rstrip("=")[:64]
    try:
        return base64.b64decode(head + "=" * (-len(head) % 4), altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        return None


def _magic(head: bytes) -> str:
    for offset, signature, media_type in MAGIC:
        if head[offset : offset + len(signature)] == signature:
            if offset == 8 and not head.startswith(b"RIFF"):
                continue
            return media_type
    if head.startswith(b"BM") and head[6:10] == b"\x00\x00\x00\x00" and len(head) >= 14:
        return "image/bmp"
    return ""


def _mixes_character_classes(compact: str) -> bool:
    # `compact` is base64, so ASCII: one search per class, at C speed.
    return all(pattern.search(compact) for pattern in _CHARACTER_CLASSES)


_CHARACTER_CLASSES = [re.compile("[A-Z]"), re.compile("[a-z]"), re.compile("[0-9]")]


TYPE_NAMES = {
    AttestationType.WORKER_COMPLETION: "worker_completion",
    AttestationType.WORKER_FAILURE: "worker_failure",
    AttestationType.WORKFLOW_COMPLETION: "workflow_completion",
    AttestationType.WORKFLOW_FAILURE: "workflow_failure",
    AttestationType.WORKFLOW_CANCELLATION: "workflow_cancellation",
    AttestationType.WORKER_CANCELLATION: "worker_cancellation",
    AttestationType.APPROVAL: "approval",
    AttestationType.WORKER_TERMINATION: "worker_termination",
    AttestationType.WORKFLOW_TERMINATION: "workflow_termination",
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


@dataclass(frozen=True, slots=True)
class Verdict:
    valid: bool
    digest_valid: bool
    signature_valid: bool
    chain_valid: bool
    previous_pruned: bool
    reason: str
    # False when the chain link was not examined (offline, one attestation alone):
    # chain_valid is then False for "not established", not for "broken".
    chain_checked: bool = True
    # Whether the attestation carries data.annotations (see domain/annotated.py);
    # whether the stored annotations it covers still hash to it (True when it
    # carries none, or when they were not examined: offline); the ids of those
    # that changed or were deleted since.
    annotations_attested: bool = False
    annotations_valid: bool = True
    changed_annotation_ids: tuple[str, ...] = ()


def verify_offline(envelope: Any, public_keys: dict[str, Ed25519PublicKey]) -> Verdict:
    """jobtrace.dsse.verify_offline as a Verdict (its chain not examined); a
    malformed envelope raises MalformedEnvelope (a ValueError)."""
    offline = dsse.verify_offline(envelope, public_keys)
    return Verdict(
        offline.valid,
        offline.digest_valid,
        offline.signature_valid,
        chain_valid=False,
        previous_pruned=False,
        reason=offline.reason,
        chain_checked=False,
    )


# --- the service ----------------------------------------------------------------------

# Evidence weighing more than this (characters of text and member names,
# SCALAR_WEIGHT per value and MARKER_WEIGHT per "data:", which may become a marker
# with its own SHA-256) is sanitised, encoded and signed in a worker thread;
# below it the work takes a millisecond or two on the event loop, cheaper there
# than a thread hop for the small attestations of the hot path.
INLINE_EVIDENCE = 32 * 1024
SCALAR_WEIGHT = 16
MARKER_WEIGHT = 256
_T = TypeVar("_T")


def larger_than(value: Any, limit: int) -> bool:
    """Whether JSON `value` weighs more than `limit` (see INLINE_EVIDENCE). Each
    value is weighed when its container is, so the walk stops once it knows, after
    at most about limit / SCALAR_WEIGHT values."""
    weight = SCALAR_WEIGHT
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, Sanitized):
            pending.append(item.value)
        elif isinstance(item, str):
            weight += len(item)
            if weight <= limit:
                weight += MARKER_WEIGHT * item.lower().count("data:")
        elif isinstance(item, dict):
            weight += SCALAR_WEIGHT * len(item)
            if weight > limit:
                return True
            for name, member in item.items():
                weight += len(name) if isinstance(name, str) else 0
                pending.append(member)
        elif isinstance(item, list | tuple):
            weight += SCALAR_WEIGHT * len(item)
            if weight > limit:
                return True
            pending.extend(item)
        if weight > limit:
            return True
    return False


async def off_loop_if_large(
    evidence: Any, work: Callable[..., _T], *args: Any, limit: int = INLINE_EVIDENCE
) -> _T:
    """`work(*args)`, in a worker thread if `evidence` (what it reads) is larger
    than `limit`, else inline: CPU-bound work on caller data never holds the event
    loop for longer than `limit` allows."""
    if larger_than(evidence, limit):
        return await asyncio.to_thread(work, *args)
    return work(*args)


def _malformed(exc: store.MalformedRow) -> DataLoss:
    return DataLoss(
        str(exc),
        reason="ATTESTATION_MALFORMED",
        metadata={"table": exc.table, "key": exc.key, "problems": "; ".join(exc.problems)},
    )


class Attestor:
    def __init__(
        self,
        db: Database,
        signer: Signer,
        tokens: PageTokens,
        *,
        retention_s: float,
        redaction: Redaction = redact_rules.DEFAULT,
    ) -> None:
        self._db = db
        self.redaction = redaction
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
        data: JSON | Sanitized,
        workflow_id: str = "",
        job_id: str = "",
        worker_id: str = "",
        attempt: int = 0,
        annotations: JSON | None = None,
        recorded_by: str = "",
        head: tuple[int, str] | None = None,
        insert: bool = True,
    ) -> Attestation:
        """Build, chain, sign and store one attestation inside the caller's transaction.
        `annotations` (see domain/annotated.py), built by the server, becomes
        data["annotations"] as is, after `data` is sanitised.
        `head` is the chain's last (chain_seq, digest) when the caller knows it
        (read under the lock that orders the chain's writers); else it is read.
        Without `insert` the caller stores it (store.attest.attestation_insert),
        in this transaction.

        Sanitising, encoding and signing large evidence runs in a worker thread
        (see INLINE_EVIDENCE): the event loop keeps serving every other caller."""
        last_seq, last_digest = (
            head if head is not None else await store.chain_head(session, chain_id)
        )
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
            data={},  # set by _seal, sanitised
            chain_id=chain_id,
            chain_seq=last_seq + 1,
            digest="",
            previous_digest=last_digest,
            signature=b"",
            key_id=self.signer.key_id,
            created_us=now,
            expire_us=now + int(self.retention_s * 1e6),
            recorded_by=recorded_by,
        )
        signed = await off_loop_if_large(data, self._seal, draft, data, annotations)
        if insert:
            await store.insert_attestation(session, signed)
        return signed

    def _seal(
        self, draft: Attestation, data: JSON | Sanitized, annotations: JSON | None = None
    ) -> Attestation:
        """`draft` with `data` sanitised, then digested and signed: CPU only."""
        clean = data.value if isinstance(data, Sanitized) else sanitize(data, self.redaction)
        if annotations is not None:
            clean = {**clean, annotated.MEMBER: annotations}
        encoded = canonical(clean)
        # The stored data is the canonical text read back, so the digest covers
        # exactly what is stored; it is spliced in as is, not encoded again.
        draft = _replace_data(draft, json.loads(encoded))
        stmt = {**statement(draft), "data": jcs.Encoded(encoded.decode())}
        digest = "sha256:" + hashlib.sha256(canonical(stmt)).hexdigest()
        return _sign(draft, digest, self.signer.sign(digest_bytes(digest)))

    async def get(self, tenant: str | None, key: str) -> Attestation:
        _require_key(key)
        async with self._db.read() as session:
            try:
                found = await store.get(session, key, tenant)
            except store.MalformedRow as exc:
                raise _malformed(exc) from None
        if found is None:
            raise _not_found(key)
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
        view: int,
        out: Encoder[Attestation, Any],
        more: AttestationFilter = NO_ATTESTATION_FILTER,
    ) -> tuple[list[Any], str]:
        """One page, as `out` encodes it, and the token of the next."""
        v = Violations()
        limit = check_page_size(v, "page_size", page_size)
        if type not in AttestationType.__members__.values():
            v.add("type", f"unknown AttestationType value {type}")
        full = check_view(v, "view", view)
        query, bound = check_attestation_filter(v, more)
        query = replace(query, workflow_id=workflow_id, job_id=job_id, type=type)
        # The filters of earlier releases under their names, the others when set.
        filters = {
            "workflow_id": workflow_id,
            "job_id": job_id,
            "type": type,
            "tenant": tenant,
            **bound,
        }
        after = position(self._tokens, v, "page_token", page_token, "attestations", filters)
        v.raise_if_any()
        async with self._db.read() as session:
            try:
                filled = await fill(
                    lambda start, n, max_bytes: store.read_attestations(
                        session,
                        tenant=tenant,
                        query=query,
                        after=start,
                        limit=n,
                        max_bytes=max_bytes,
                        full=full,
                    ),
                    start=after,
                    count=limit,
                    out=out,
                    position=lambda a: a.seq,
                    name=lambda a: f"attestation {a.key}",
                )
            except store.MalformedRow as exc:
                raise _malformed(exc) from None
        return filled.items, self._tokens.next_token("attestations", filters, filled)

    async def verify(self, tenant: str | None, key: str) -> Verdict:
        """Digest, signature and chain link of a stored attestation. Whatever was
        done to the row, the answer is a verdict, never an error (but NOT_FOUND)."""
        _require_key(key)
        async with self._db.read() as session:
            try:
                a = await store.get(session, key, tenant)
            except store.MalformedRow as exc:
                reason = "row is malformed: " + "; ".join(exc.problems)
                return Verdict(False, False, False, False, False, reason, chain_checked=False)
            if a is None:
                raise _not_found(key)
            try:
                signing_key = await store.key(session, a.key_id)
            except store.MalformedRow as exc:
                signing_key, key_problem = None, f"{exc}"
            else:
                key_problem = f"signing key {a.key_id!r} is unknown"
            previous = (
                await store.link_digest(session, a.chain_id, a.chain_seq - 1)
                if a.chain_seq > 1
                else None
            )
            pruned_digest = (
                await store.pruned_link(session, a.chain_id, a.chain_seq - 1)
                if a.chain_seq > 1 and previous is None
                else None
            )
            annotations = await annotated.verify(session, a.data)
        problems: list[str] = []
        try:
            digest_ok = await off_loop_if_large(a.data, digest_of, statement(a)) == a.digest
        except ValueError as exc:
            digest_ok = False
            problems.append(f"stored content has no canonical (RFC 8785) encoding: {exc}")
        if not digest_ok:
            problems.append("stored content does not hash to the stored digest (content altered)")
        signature_ok = False
        if signing_key is None:
            problems.append(key_problem)
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
            previous_key, previous_digest = previous
            chain_ok = previous_digest == a.previous_digest
            if not chain_ok:
                problems.append(
                    f"previous_digest does not match attestation {previous_key!r} "
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
        problems += annotations.problems
        valid = digest_ok and signature_ok and chain_ok and annotations.valid
        return Verdict(
            valid,
            digest_ok,
            signature_ok,
            chain_ok,
            pruned,
            "; ".join(problems),
            annotations_attested=annotations.attested,
            annotations_valid=annotations.valid,
            changed_annotation_ids=tuple(annotations.changed_ids),
        )

    async def keys(self) -> list[SigningKey]:
        async with self._db.read() as session:
            try:
                return await store.keys(session)
            except store.MalformedRow as exc:
                raise _malformed(exc) from None

    async def export(self, a: Attestation) -> Envelope:
        """`envelope(a)`, encoded and signed in a worker thread when `a` is large."""
        return await off_loop_if_large(a.data, self.envelope, a)

    def envelope(self, a: Attestation) -> Envelope:
        """`a` as a DSSE envelope holding an in-toto Statement, signed by the key that
        signed `a` (key_id), so that one public key verifies both signatures. Ed25519
        is deterministic: the same attestation always gives the same envelope. Only
        when this server lacks that private key (another replica's key, or a retired
        key file removed) is the envelope signed by the active key instead."""
        predicate = {**statement(a), "digest": a.digest, "signature": a.signature.hex()}
        doc = {
            "_type": STATEMENT_TYPE,
            "subject": [{"name": a.key, "digest": {"sha256": a.digest.removeprefix("sha256:")}}],
            "predicateType": PREDICATE_TYPE,
            "predicate": predicate,
        }
        try:
            payload = canonical(doc)
        except ValueError as exc:
            raise _malformed(store.MalformedRow("attestations", a.key, [str(exc)])) from None
        message = pae(DSSE_PAYLOAD_TYPE, payload)
        signature = self.signer.sign_as(a.key_id, message)
        if signature is not None:
            return Envelope(payload, DSSE_PAYLOAD_TYPE, [(a.key_id, signature)])
        return Envelope(
            payload, DSSE_PAYLOAD_TYPE, [(self.signer.key_id, self.signer.sign(message))]
        )

    async def sweep_once(self, batch: int = 500) -> int:
        total = 0
        while True:

            async def op(session: AsyncSession, tx: Tx) -> int:
                return await store.prune_expired(session, now_us(), batch)

            n = await self._db.write(op)
            total += n
            if n < batch:
                return total


def _require_key(key: str) -> None:
    v = Violations()
    if not key:
        v.add("key", "required")
    v.raise_if_any()


def _not_found(key: str) -> NotFound:
    return NotFound(
        f"attestation {key!r} not found", reason="ATTESTATION_NOT_FOUND", metadata={"key": key}
    )


def _replace_data(a: Attestation, data: JSON) -> Attestation:
    return replace(a, data=data)


def _sign(a: Attestation, digest: str, signature: bytes) -> Attestation:
    return replace(a, digest=digest, signature=signature)
