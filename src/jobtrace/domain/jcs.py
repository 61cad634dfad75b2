"""RFC 8785 JSON Canonicalization Scheme (JCS): the byte encoding attestation digests cover.

A verifier in any language reproduces these bytes with an RFC 8785 library:
- numbers are IEEE 754 doubles written as ECMAScript's Number.prototype.toString
  does: integral values without a fraction (`1`, not `1.0`), the shortest digits
  that round-trip, exponents only below 1e-6 or from 1e21 on (`1e-7`, `1e+21`);
  `-0` is `0`; an integer is the double nearest to it, as when any JCS library
  parses JSON text; NaN, the infinities and integers beyond a double are refused;
- object members are sorted by their names' UTF-16 code units (not code points);
- strings are UTF-8, escaping only `"`, `\\` and U+0000-U+001F (`\\b \\t \\n \\f \\r`,
  the rest as lowercase `\\u00xx`); everything else, `/` and non-ASCII included,
  is written as is;
- no whitespace between tokens.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

# The C string encoder of the json module escapes exactly the set RFC 8785 escapes,
# in the same form, when it is not asked for ASCII output.
_encode_string: Any = getattr(json.encoder, "c_encode_basestring", None) or (
    json.encoder.py_encode_basestring
)
MAX_EXACT_INT = 2**53


@dataclass(frozen=True, slots=True)
class Encoded:
    """A value already in RFC 8785 form (the text of `dumps`), written as is: a
    document that embeds a large value encodes it once, not twice."""

    text: str


class NotCanonicalizable(ValueError):
    """The value has no RFC 8785 encoding (NaN, an infinity, a non-string member
    name, an integer beyond a double, a lone surrogate, a non-JSON type)."""


def dumps(value: Any) -> bytes:
    """The RFC 8785 encoding of a JSON value (dict, list, str, int, float, bool, None)."""
    out: list[str] = []
    _write(value, out)
    try:
        return "".join(out).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise NotCanonicalizable(f"string is not valid Unicode: {exc.reason}") from None


def number(x: float | int) -> str:
    """ECMAScript Number::toString of a double (RFC 8785 section 3.2.2.3)."""
    if isinstance(x, int):
        if -MAX_EXACT_INT <= x <= MAX_EXACT_INT:
            return str(x)  # every such integer is a double, written in full
        # A JSON number means a double, as for every JCS implementation that parses
        # JSON text: 1712345678901234567 is the double 1712345678901234432.
        try:
            x = float(x)
        except OverflowError:
            raise NotCanonicalizable(f"integer {x} is beyond the range of a double") from None
    if not math.isfinite(x):
        raise NotCanonicalizable(f"{x} is not a JSON number")
    if x == 0:
        return "0"  # and -0
    if x < 0:
        return "-" + number(-x)
    if x.is_integer():
        if x <= MAX_EXACT_INT:
            return str(int(x))  # no shorter digits round-trip to an integer this small
    elif 1e-4 <= x < 1e16:
        return repr(x)  # plain notation in both languages, the same shortest digits
    # repr gives the shortest digits that round-trip, closest to x: the digits
    # ECMAScript asks for. Only their layout differs.
    _, digit_tuple, exponent = Decimal(repr(x)).as_tuple()
    assert isinstance(exponent, int)
    digits = "".join(map(str, digit_tuple)).rstrip("0")
    exponent += len(digit_tuple) - len(digits)
    k = len(digits)
    n = exponent + k  # x = 0.digits * 10**n
    if k <= n <= 21:
        return digits + "0" * (n - k)
    if 0 < n <= 21:
        return digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return "0." + "0" * -n + digits
    e = n - 1
    mantissa = digits if k == 1 else digits[0] + "." + digits[1:]
    return f"{mantissa}e{'+' if e > 0 else '-'}{abs(e)}"


def _utf16_key(name: str) -> bytes:
    # Big-endian UTF-16 bytes compare like the sequence of code units.
    return name.encode("utf-16-be", "surrogatepass")


def _write(value: Any, out: list[str]) -> None:
    kind = type(value)  # exact types first: the common case, and cheap
    if kind is str:
        out.append(_encode_string(value))
    elif kind is dict:
        _write_object(value, out)
    elif kind is list or kind is tuple:
        out.append("[")
        first = True
        for item in value:
            if not first:
                out.append(",")
            first = False
            _write(item, out)
        out.append("]")
    elif value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int | float):
        out.append(number(value))
    elif kind is Encoded:
        out.append(value.text)
    elif isinstance(value, str):
        out.append(_encode_string(value))
    elif isinstance(value, dict):
        _write_object(value, out)
    elif isinstance(value, list | tuple):
        _write(list(value), out)
    else:
        raise NotCanonicalizable(f"{type(value).__name__} is not a JSON type")


def _write_object(value: dict[Any, Any], out: list[str]) -> None:
    ascii_names = True
    for name in value:
        if type(name) is not str and not isinstance(name, str):
            raise NotCanonicalizable(f"object member name {name!r} is not a string")
        ascii_names = ascii_names and name.isascii()
    # Code point order is UTF-16 order unless a name holds a non-BMP character.
    names = sorted(value) if ascii_names else sorted(value, key=_utf16_key)
    out.append("{")
    first = True
    for name in names:
        if not first:
            out.append(",")
        first = False
        out.append(_encode_string(name))
        out.append(":")
        _write(value[name], out)
    out.append("}")
