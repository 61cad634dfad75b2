"""Refuses what no field of any request may hold: NUL characters, non-finite numbers,
and Timestamps or Durations out of their documented range.

PostgreSQL text cannot store a NUL, and JSON (so a stored Struct) has no NaN or
Infinity; SQLite would store both and hand them back unusable; an out-of-range
Timestamp cannot be converted. One walk over the message rejects them everywhere
(strings, map keys, nested messages, Struct, Value and ListValue), with the path
of each field, before any rule runs."""

from __future__ import annotations

import math
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from jobtrace.domain.errors import FieldViolation, Invalid

NUL = "must not contain NUL characters (\\x00)"
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
    _message(message, "", out)
    if out:
        raise Invalid(out[:MAX_VIOLATIONS])


# Per field: how to check it (computed once per descriptor, not per request).
_Plan = dict[str, tuple[int, bool, int]]
_plans: dict[Any, _Plan] = {}


def _plan(descriptor: Any) -> _Plan:
    plan = _plans.get(descriptor)
    if plan is None:
        plan = {}
        for field in descriptor.fields:
            repeated = field.is_repeated
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                key_field, value_field = field.message_type.fields
                value_kind = _kind(value_field)
                plan[field.name] = (_MAP, key_field.type == FieldDescriptor.TYPE_STRING, value_kind)
            else:
                plan[field.name] = (_kind(field), repeated, _OTHER)
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


def _key(key: Any) -> str:
    """A map key as it appears in a field path (long ones shortened)."""
    if isinstance(key, str) and len(key) > 64:
        return repr(key[:60]) + "..."
    return repr(key)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _message(message: Message, path: str, out: list[FieldViolation]) -> None:
    descriptor = message.DESCRIPTOR
    name = descriptor.full_name
    if name == _STRUCT:
        _struct(message, path, out)
        return
    if name == _VALUE:
        _value(message, path, out)
        return
    if name == _LIST:
        for i, item in enumerate(message.values):  # type: ignore[attr-defined]
            _value(item, f"{path}[{i}]", out)
        return
    if name == _TIMESTAMP:
        _timestamp(message, path, out)
        return
    if name == _DURATION:
        _duration(message, path, out)
        return
    plan = _plan(descriptor)
    for field, value in message.ListFields():
        kind, flag, value_kind = plan[field.name]
        if kind == _OTHER:
            continue
        where = _join(path, field.name)
        if kind == _MAP:
            for key, item in value.items():
                at = f"{where}[{_key(key)}]"
                if flag and "\x00" in key:
                    out.append(FieldViolation(at, "key " + NUL))
                _scalar_or_message(value_kind, item, at, out)
        elif flag:  # repeated
            for i, item in enumerate(value):
                _scalar_or_message(kind, item, f"{where}[{i}]", out)
        else:
            _scalar_or_message(kind, value, where, out)


def _scalar_or_message(kind: int, value: Any, path: str, out: list[FieldViolation]) -> None:
    if kind == _TEXT:
        if "\x00" in value:
            out.append(FieldViolation(path, NUL))
    elif kind == _FLOAT:
        if not math.isfinite(value):
            out.append(FieldViolation(path, f"{NON_FINITE} (got {value})"))
    elif kind == _MESSAGE:
        _message(value, path, out)


def _struct(struct: Any, path: str, out: list[FieldViolation]) -> None:
    for key, item in struct.fields.items():
        at = f"{path}[{_key(key)}]"
        if "\x00" in key:
            out.append(FieldViolation(at, "key " + NUL))
        _value(item, at, out)


def _value(value: Any, path: str, out: list[FieldViolation]) -> None:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        if "\x00" in value.string_value:
            out.append(FieldViolation(path, NUL))
    elif kind == "number_value":
        if not math.isfinite(value.number_value):
            out.append(FieldViolation(path, f"{NON_FINITE} (got {value.number_value})"))
    elif kind == "struct_value":
        _struct(value.struct_value, path, out)
    elif kind == "list_value":
        for i, item in enumerate(value.list_value.values):
            _value(item, f"{path}[{i}]", out)


def _timestamp(ts: Any, path: str, out: list[FieldViolation]) -> None:
    if not (_MIN_TS_SECONDS <= ts.seconds <= _MAX_TS_SECONDS and 0 <= ts.nanos <= _MAX_NANOS):
        out.append(
            FieldViolation(
                path,
                "must be a valid Timestamp: years 0001 to 9999, nanos 0 to 999,999,999",
            )
        )


def _duration(d: Any, path: str, out: list[FieldViolation]) -> None:
    same_sign = d.seconds == 0 or d.nanos == 0 or (d.seconds < 0) == (d.nanos < 0)
    if not (abs(d.seconds) <= _MAX_DURATION_SECONDS and abs(d.nanos) <= _MAX_NANOS and same_sign):
        out.append(
            FieldViolation(
                path,
                "must be a valid Duration: at most 10,000 years, seconds and nanos of one sign",
            )
        )
