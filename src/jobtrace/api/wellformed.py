"""Refuses what no field of any request may hold: NUL characters, non-finite numbers,
Timestamps or Durations out of their documented range, and free-form values
(Struct, Value, ListValue) nested deeper than MAX_NESTING.

PostgreSQL text cannot store a NUL, and JSON (so a stored Struct) has no NaN or
Infinity; SQLite would store both and hand them back unusable; an out-of-range
Timestamp cannot be converted; a value nested too deep cannot be read back by
clients once a response embeds it (see MAX_NESTING). One walk over the message
rejects them everywhere (strings, map keys, nested messages, Struct, Value and
ListValue), with the path of each field, before any rule runs."""

from __future__ import annotations

import math
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from jobtrace.domain.errors import FieldViolation, Invalid

NUL = "must not contain NUL characters (\\x00)"
# Levels of objects and lists a free-form value (payload, request body, result,
# trace data, annotation values...) may nest. Protobuf parsers stop at 100 nested
# messages (python's upb, Java, C++), and each object level costs three of them
# (Struct, its map entry, Value). The deepest response embeds a request body two
# objects below an attestation's data (data.request_context.body, and a step's
# result at data.outputs.<step>), which is itself two messages down
# (ListAttestationsResponse.attestations.data): 31 levels still parse there, so 24
# leave 7 levels (21 messages) of margin for whatever embeds them next.
MAX_NESTING = 24
TOO_DEEP = f"must nest at most {MAX_NESTING} levels of objects and lists"
NON_FINITE = "must be a finite number"
# One message of a worker stream or one request: beyond this many problems the
# caller has enough to fix.
MAX_VIOLATIONS = 20

_STRUCT = "google.protobuf.Struct"
_VALUE = "google.protobuf.Value"
_LIST = "google.protobuf.ListValue"
_TIMESTAMP = "google.protobuf.Timestamp"
_DURATION = "google.protobuf.Duration"
# The ranges google/protobuf/timestamp.proto and duration.proto define.
_MIN_TS_SECONDS = -62_135_596_800  # 0001-01-01T00:00:00Z
_MAX_TS_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z
_MAX_DURATION_SECONDS = 315_576_000_000  # 10,000 years
_MAX_NANOS = 999_999_999

_TEXT, _FLOAT, _MESSAGE, _MAP, _OTHER = range(5)
_FLOATS = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)


def check_request(message: Any) -> None:
    """Raise Invalid naming every field that holds a NUL, a non-finite number or an
    out-of-range Timestamp or Duration (at most MAX_VIOLATIONS of them)."""
    if not isinstance(message, Message):
        return  # a request that did not parse is refused elsewhere
    out: list[FieldViolation] = []
    _message(message, (), out)
    if out:
        raise Invalid(out[:MAX_VIOLATIONS])


# A field path, built as a chain of (parent, how, segment) and spelled out only
# for a violation: most requests have none, and formatting every element's
# path would cost more than the walk itself.
Path = tuple[Any, ...]
_FIELD, _INDEX, _KEY = range(3)


def _spell(path: Path) -> str:
    parts: list[str] = []
    while path:
        path, how, segment = path
        if how == _FIELD:
            parts.append("." + segment)
        elif how == _INDEX:
            parts.append(f"[{segment}]")
        else:
            short = repr(segment[:60]) + "..." if len(segment) > 64 else repr(segment)
            parts.append(f"[{short}]")
    return "".join(reversed(parts)).lstrip(".")


def _bad(out: list[FieldViolation], path: Path, problem: str) -> None:
    out.append(FieldViolation(_spell(path), problem))


# Per message type: a well-known type's own check, or per field how to check it
# (computed once per descriptor, not per request).
_plans: dict[Any, Any] = {}


def _plan(descriptor: Any) -> Any:
    plan = _plans.get(descriptor)
    if plan is None:
        special = {
            _STRUCT: _struct,
            _VALUE: _value,
            _LIST: _list,
            _TIMESTAMP: _timestamp,
            _DURATION: _duration,
        }.get(descriptor.full_name)
        if special is not None:
            plan = special
        else:
            plan = {}
            for field in descriptor.fields:
                if field.message_type is not None and field.message_type.GetOptions().map_entry:
                    key_field, value_field = field.message_type.fields
                    is_text = key_field.type == FieldDescriptor.TYPE_STRING
                    plan[field.name] = (_MAP, is_text, _kind(value_field))
                else:
                    plan[field.name] = (_kind(field), field.is_repeated, _OTHER)
        _plans[descriptor] = plan
    return plan


def _kind(field: FieldDescriptor) -> int:
    if field.message_type is not None:
        return _MESSAGE
    if field.type == FieldDescriptor.TYPE_STRING:
        return _TEXT
    if field.type in _FLOATS:
        return _FLOAT
    return _OTHER


def _message(message: Message, path: Path, out: list[FieldViolation]) -> None:
    plan = _plan(message.DESCRIPTOR)
    if not isinstance(plan, dict):
        plan(message, path, out)
        return
    for field, value in message.ListFields():
        kind, flag, value_kind = plan[field.name]
        if kind == _OTHER:
            continue
        where = (path, _FIELD, field.name)
        if kind == _MAP:
            for key, item in value.items():
                at = (where, _KEY, key)
                if flag and "\x00" in key:
                    _bad(out, at, "key " + NUL)
                _scalar_or_message(value_kind, item, at, out)
        elif flag:  # repeated
            for i, item in enumerate(value):
                _scalar_or_message(kind, item, (where, _INDEX, i), out)
        else:
            _scalar_or_message(kind, value, where, out)


def _scalar_or_message(kind: int, value: Any, path: Path, out: list[FieldViolation]) -> None:
    if kind == _TEXT:
        if "\x00" in value:
            _bad(out, path, NUL)
    elif kind == _FLOAT:
        if not math.isfinite(value):
            _bad(out, path, f"{NON_FINITE} (got {value})")
    elif kind == _MESSAGE:
        _message(value, path, out)


# A free-form value is walked with its depth (the levels of objects and lists
# around the item at hand) and its root (the path of the field holding it, the
# one named when it nests too deep).


def _struct(
    struct: Any, path: Path, out: list[FieldViolation], depth: int = 1, root: Any = None
) -> None:
    root = path if root is None else root
    if depth > MAX_NESTING:
        _bad(out, root, TOO_DEEP)
        return
    for key, item in struct.fields.items():
        at = (path, _KEY, key)
        if "\x00" in key:
            _bad(out, at, "key " + NUL)
        _value(item, at, out, depth, root)


def _list(
    values: Any, path: Path, out: list[FieldViolation], depth: int = 1, root: Any = None
) -> None:
    root = path if root is None else root
    if depth > MAX_NESTING:
        _bad(out, root, TOO_DEEP)
        return
    for i, item in enumerate(values.values):
        _value(item, (path, _INDEX, i), out, depth, root)


def _value(
    value: Any, path: Path, out: list[FieldViolation], depth: int = 0, root: Any = None
) -> None:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        if "\x00" in value.string_value:
            _bad(out, path, NUL)
    elif kind == "number_value":
        if not math.isfinite(value.number_value):
            _bad(out, path, f"{NON_FINITE} (got {value.number_value})")
    elif kind == "struct_value":
        _struct(value.struct_value, path, out, depth + 1, path if root is None else root)
    elif kind == "list_value":
        _list(value.list_value, path, out, depth + 1, path if root is None else root)


def _timestamp(ts: Any, path: Path, out: list[FieldViolation]) -> None:
    if not (_MIN_TS_SECONDS <= ts.seconds <= _MAX_TS_SECONDS and 0 <= ts.nanos <= _MAX_NANOS):
        _bad(out, path, "must be a valid Timestamp: years 0001 to 9999, nanos 0 to 999,999,999")


def _duration(d: Any, path: Path, out: list[FieldViolation]) -> None:
    same_sign = d.seconds == 0 or d.nanos == 0 or (d.seconds < 0) == (d.nanos < 0)
    if not (abs(d.seconds) <= _MAX_DURATION_SECONDS and abs(d.nanos) <= _MAX_NANOS and same_sign):
        _bad(
            out,
            path,
            "must be a valid Duration: at most 10,000 years, seconds and nanos of one sign",
        )
