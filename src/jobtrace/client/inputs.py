"""Messages from user-given mappings (Python dicts, YAML, JSON), checked against
the contract with field paths: a misspelt key or a wrong type is an InvalidInput
naming the field (`steps[1].job.max_attempts: must be an integer, got text`),
never protobuf's ParseError.

Field names are the proto names or their JSON (camelCase) forms; enums take their
name, with or without the prefix, any case ("user", "ACTOR_KIND_USER") or number;
durations take seconds (a number) or text such as "1.5s"; timestamps take
RFC 3339 text or a datetime (YAML reads unquoted times as those)."""

from __future__ import annotations

import base64
import difflib
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from jobtrace.client.errors import FieldViolation, InvalidInput
from jobtrace.pb import timestamp_pb2

M = TypeVar("M", bound=Message)

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_FLOATS = {FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT}


def message_from(kind: type[M], value: object, path: str = "") -> M:
    """`value` itself if it is a `kind`, else the `kind` its mapping describes;
    InvalidInput listing every bad field (by its path under `path`) otherwise."""
    if isinstance(value, kind):
        return value
    if kind.DESCRIPTOR.full_name == "google.protobuf.Value":
        try:  # any JSON value
            return json_format.ParseDict(value, kind())  # type: ignore[arg-type]
        except (json_format.ParseError, ValueError, TypeError) as exc:
            raise InvalidInput([FieldViolation(path, _one_line(exc))]) from None
    violations: list[FieldViolation] = []
    descriptor: Descriptor = kind.DESCRIPTOR  # type: ignore[assignment]
    plain = check(descriptor, value, path, violations)
    if violations:
        raise InvalidInput(violations)
    try:
        return json_format.ParseDict(plain, kind())
    except (json_format.ParseError, ValueError, TypeError) as exc:
        # What check() does not know (a JSON value Struct cannot hold, say).
        raise InvalidInput([FieldViolation(path, _one_line(exc))]) from None


class Inputs:
    """The mappings of one call's arguments, checked together: done() raises one
    InvalidInput listing the bad fields of all of them."""

    def __init__(self) -> None:
        self.violations: list[FieldViolation] = []

    def message(self, kind: type[M], value: object, path: str) -> M:
        try:
            return message_from(kind, value, path)
        except InvalidInput as exc:
            self.violations.extend(exc.violations)
            return kind()

    def optional(self, kind: type[M], value: object, path: str) -> M | None:
        return None if value is None else self.message(kind, value, path)

    def done(self) -> None:
        if self.violations:
            raise InvalidInput(self.violations)


def check(
    descriptor: Descriptor, value: object, path: str, violations: list[FieldViolation]
) -> dict[str, Any]:
    """The mapping `value` as json_format.ParseDict takes it for `descriptor`,
    with every problem added to `violations`."""
    if isinstance(value, Message):
        violations.append(
            FieldViolation(
                path, f"expected a {descriptor.name} or a mapping, got a {type(value).__name__}"
            )
        )
        return {}
    if not isinstance(value, Mapping):
        violations.append(
            FieldViolation(path, f"must be a mapping (a {descriptor.name}), got {_kind(value)}")
        )
        return {}
    fields = {f.name: f for f in descriptor.fields}
    fields |= {f.json_name: f for f in descriptor.fields}
    plain: dict[str, Any] = {}
    for key, item in value.items():
        where = f"{path}.{key}" if path else str(key)
        field = fields.get(key) if isinstance(key, str) else None
        if field is None:
            violations.append(_unknown(descriptor, key, item, path, where))
        elif item is not None:  # `key:` with nothing after it in YAML: the default
            plain[field.name] = _field(field, item, where, violations)
    return plain


def _unknown(
    descriptor: Descriptor, key: object, item: object, path: str, where: str
) -> FieldViolation:
    """An unknown key, with the field the user most likely meant."""
    names = [f.name for f in descriptor.fields]
    prefix = f"{path}." if path else ""
    # A field of a nested message written one level too high (a step's
    # `max_attempts` belongs in its `job`), or grouped under a made-up key
    # (`retry: {max_attempts: 3}`).
    if isinstance(key, str):
        found = _nested(descriptor, key)
        if found:
            return FieldViolation(where, f"unknown field; did you mean {prefix}{found}?")
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
        if close:
            return FieldViolation(where, f"unknown field; did you mean {prefix}{close[0]}?")
    if isinstance(item, Mapping):
        for inner in item:
            if isinstance(inner, str):
                found = _nested(descriptor, inner) or (inner if inner in names else "")
                if found:
                    return FieldViolation(
                        f"{where}.{inner}", f"unknown field; did you mean {prefix}{found}?"
                    )
    return FieldViolation(where, f"unknown field (fields here: {', '.join(names)})")


def _nested(descriptor: Descriptor, key: str) -> str:
    """`job.max_attempts` when `key` names a field of a message field of `descriptor`."""
    for field in descriptor.fields:
        inner = field.message_type
        if inner is None or field.is_repeated or inner.full_name.startswith("google.protobuf."):
            continue
        for f in inner.fields:
            if key in (f.name, f.json_name):
                return f"{field.name}.{f.name}"
    return ""


def _field(field: FieldDescriptor, item: object, where: str, out: list[FieldViolation]) -> Any:
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        if not isinstance(item, Mapping):
            out.append(FieldViolation(where, f"must be a mapping, got {_kind(item)}"))
            return {}
        value_field = entry.fields_by_name["value"]
        return {
            str(k): _single(value_field, v, f"{where}.{k}", out)
            for k, v in item.items()
            if v is not None
        }
    if field.is_repeated:
        if not isinstance(item, list | tuple):
            out.append(FieldViolation(where, f"must be a list, got {_kind(item)}"))
            return []
        return [_single(field, v, f"{where}[{i}]", out) for i, v in enumerate(item)]
    return _single(field, item, where, out)


def _single(field: FieldDescriptor, item: object, where: str, out: list[FieldViolation]) -> Any:
    """One value of `field` (one item of a repeated field or map) in ParseDict's form."""

    def bad(expected: str) -> None:
        out.append(FieldViolation(where, f"must be {expected}, got {_kind(item)}"))

    if field.message_type is not None:
        name = field.message_type.full_name
        if name == "google.protobuf.Value":
            return item
        if name == "google.protobuf.Struct":
            if not isinstance(item, Mapping):
                bad("a mapping")
            return item
        if name == "google.protobuf.ListValue":
            if not isinstance(item, list | tuple):
                bad("a list")
            return item
        if name == "google.protobuf.Duration":
            return _duration(item, bad)
        if name == "google.protobuf.Timestamp":
            return _timestamp(item, bad)
        return check(field.message_type, item, where, out)
    if field.enum_type is not None:
        return _enum(field.enum_type, item, where, out)
    if field.type == FieldDescriptor.TYPE_BOOL:
        if not isinstance(item, bool):
            bad("true or false")
        return item
    if field.type in _INT_RANGES:
        if isinstance(item, bool) or not isinstance(item, int):
            bad("an integer")
            return 0
        low, high = _INT_RANGES[field.type]
        if not low <= item <= high:
            out.append(FieldViolation(where, f"must be between {low} and {high}, got {item}"))
        return item
    if field.type in _FLOATS:
        if isinstance(item, bool) or not isinstance(item, int | float):
            bad("a number")
        return item
    if field.type == FieldDescriptor.TYPE_BYTES:
        if isinstance(item, bytes):
            return base64.b64encode(item).decode()
        if not isinstance(item, str):
            bad("bytes (or base64 text)")
        return item
    if not isinstance(item, str):
        bad("text" + (" (quote it)" if isinstance(item, int | float | bool) else ""))
    return item


def _duration(item: object, bad: Any) -> Any:
    if isinstance(item, timedelta):
        return f"{item.total_seconds()}s"
    if isinstance(item, int | float) and not isinstance(item, bool):
        if item < 0:
            bad("a duration of 0 or more seconds")
        return f"{item}s"
    if isinstance(item, str) and item.endswith("s"):
        try:
            float(item[:-1])
            return item
        except ValueError:
            pass
    bad('a duration: seconds (a number) or text such as "1.5s"')
    return None


def _timestamp(item: object, bad: Any) -> Any:
    stamp = timestamp_pb2.Timestamp()
    if isinstance(item, datetime):
        stamp.FromDatetime(item)
        return stamp.ToJsonString()
    if isinstance(item, str):
        try:
            stamp.FromJsonString(item)
            return item
        except ValueError:
            pass
    bad('an RFC 3339 time such as "2026-11-30T12:00:00Z"')
    return None


def _enum(enum: EnumDescriptor, item: object, where: str, out: list[FieldViolation]) -> Any:
    names = [v.name for v in enum.values]
    # The shared prefix of the value names (RUN_STATE_), which may be left out.
    prefix = names[0][: names[0].index("UNSPECIFIED")] if names[0].endswith("UNSPECIFIED") else ""
    if isinstance(item, int) and not isinstance(item, bool):
        if item in enum.values_by_number:
            return item
    elif isinstance(item, str):
        name = item.strip().upper()
        for candidate in (name, prefix + name):
            if candidate in enum.values_by_name:
                return candidate
    known = ", ".join(n.removeprefix(prefix).lower() for n in names[1:])
    out.append(FieldViolation(where, f"unknown value {item!r} (one of {known})"))
    return None


def _kind(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"text ({value!r})" if len(value) <= 40 else "text"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
