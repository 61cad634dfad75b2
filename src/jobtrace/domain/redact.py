"""The rules that keep credentials out of evidence: which header names, which
object member names and which text are secrets. attest.sanitize and
attest.redact apply them in the same pass as the base64 sanitiser, so that
every attestation, trace event and annotation is redacted before it is stored,
signed or shown.

Every rule runs in time linear in its input, hostile input included: the text
scanner is one search whose alternatives each start with a literal and only
where a token run starts, with possessive quantifiers (no backtracking); member
names are split once; operator rules (`--redact-key`) only ever see the first
MAX_KEY_CHECKED characters of a name."""

from __future__ import annotations

import re
import re._parser as sre_parse  # type: ignore[import-not-found]  # checks a rule's shape
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

# A redacted value becomes {"redacted": "secret", "reason": <rule>}; a
# credential inside longer text becomes "[redacted secret <rule>]". No digest:
# a hash of a short secret can be brute-forced.
SECRET = "secret"

# Header names whose value is a credential (matched in any case), as a request
# context's headers or as object members anywhere.
DEFAULT_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "x-auth-token"}
)
# The last word of a member name that makes its value a secret.
_SECRET_WORDS = frozenset({"password", "passwd", "secret", "token", "credential", "credentials"})
# "key" is a secret after one of these words (api_key, privateKey, secret-key...).
_KEY_QUALIFIERS = frozenset({"api", "private", "secret", "access"})
# Operator key rules see at most this much of a member name: an arbitrary
# regular expression over a bounded input costs bounded time.
MAX_KEY_CHECKED = 128

# Words of a member name: split on "_", "-", ".", spaces and case changes
# ("apiKey", "APIKey", "X-Api-Key" -> api, key). It backtracks within a run of
# capitals, so it only ever reads a bounded tail of a name (see _secret_name).
_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")

# Credentials in text. Each alternative starts at the start of a token run (the
# lookbehind), so a failed attempt is never repeated inside the run it scanned.
_RUN = r"A-Za-z0-9_\-"
_CREDENTIAL = re.compile(
    "|".join(
        [
            # "Bearer <token>" (an Authorization value anywhere in text).
            rf"(?P<bearer>(?<![{_RUN}])[Bb][Ee][Aa][Rr][Ee][Rr][ \t]++[{_RUN}.~+/]{{8,}}+=*+)",
            # A JWT: three base64url parts, the first two JSON objects ("eyJ").
            rf"(?P<jwt>(?<![{_RUN}.])eyJ[{_RUN}]++\.eyJ[{_RUN}]++\.[{_RUN}]*+)",
            # A PEM private key block, to its END line (or to the end of its body).
            r"(?P<private_key>-----BEGIN [A-Z0-9 ]{0,40}PRIVATE KEY-----"
            r"(?:[^-]|-(?!----))*+(?:-----END [A-Z0-9 ]{0,40}PRIVATE KEY-----)?+)",
            # Well-known API key prefixes: OpenAI/Stripe, GitHub, Slack, AWS.
            rf"(?P<key_prefix>(?<![{_RUN}])(?:sk_live_|sk-|ghp_)[{_RUN}]{{16,}}+(?![{_RUN}])"
            rf"|(?<![{_RUN}])xox[bp]-[{_RUN}]{{10,}}+(?![{_RUN}])"
            rf"|(?<![A-Za-z0-9])AKIA[0-9A-Z]{{16}}(?![A-Za-z0-9]))",
        ]
    )
)
# Cheap pre-checks: text holding none of these has no credential.
_HINTS = ("bearer", "eyj", "private key", "sk-", "sk_live_", "ghp_", "xoxb-", "xoxp-", "akia")


class UnsafePattern(ValueError):
    """A --redact-key expression that does not compile or would redact every member."""


def key_pattern(expression: str) -> re.Pattern[str]:
    """An operator's --redact-key rule, compiled case-insensitively, or
    UnsafePattern: it must compile and must not match the empty name (which
    would redact every member of every object)."""
    try:
        pattern = re.compile(expression, re.IGNORECASE)
    except re.error as exc:
        message = f"--redact-key {expression!r} is not a regular expression: {exc}"
        raise UnsafePattern(message) from None
    if pattern.search(""):
        raise UnsafePattern(f"--redact-key {expression!r} matches every member name")
    problem = _unsafe(sre_parse.parse(expression, re.IGNORECASE), False)
    if problem:
        raise UnsafePattern(f"--redact-key {expression!r} is not safe to apply: {problem}")
    return pattern


def _unsafe(parsed: Any, repeated: bool) -> str:
    """Why a parsed expression could backtrack without bound (a repetition
    inside a repetition, a backreference), or "". Its input is bounded too
    (MAX_KEY_CHECKED), so what is left costs a bounded time per name."""
    for op, arg in parsed:
        name = str(op)
        if name in {"GROUPREF", "GROUPREF_EXISTS"}:
            return "backreferences are not allowed"
        if name in {"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"}:
            low, high, sub = arg
            if repeated and high != low:
                return "nested repetition is not allowed"
            if _unsafe(sub, repeated or high > 1):
                return _unsafe(sub, repeated or high > 1)
        elif name == "SUBPATTERN":
            if found := _unsafe(arg[-1], repeated):
                return found
        elif name == "BRANCH":
            for branch in arg[1]:
                if found := _unsafe(branch, repeated):
                    return found
        elif name in {"ASSERT", "ASSERT_NOT"}:
            if found := _unsafe(arg[1], repeated):
                return found
    return ""


def backtracking_problem(expression: str, flags: int = 0) -> str:
    """Why a (compiling) regular expression could backtrack without bound, or ""."""
    return _unsafe(sre_parse.parse(expression, flags), False)


@dataclass(frozen=True, slots=True)
class Redaction:
    """What counts as a secret: the default rules (unless turned off) and the
    operator's extra header names and member name expressions."""

    defaults: bool = True
    headers: frozenset[str] = field(default_factory=frozenset)
    keys: tuple[re.Pattern[str], ...] = ()

    @classmethod
    def configure(
        cls, *, defaults: bool = True, headers: Iterable[str] = (), keys: Iterable[str] = ()
    ) -> Redaction:
        """From settings; UnsafePattern for an expression that is not safe to apply."""
        return cls(
            defaults,
            frozenset(h.strip().lower() for h in headers if h.strip()),
            tuple(key_pattern(k) for k in keys),
        )

    @property
    def active(self) -> bool:
        return self.defaults or bool(self.headers) or bool(self.keys)

    def secret_header(self, name: str) -> bool:
        """Whether a header named `name` (any case) carries a credential."""
        lowered = name.strip().lower()
        return lowered in self.headers or (self.defaults and lowered in DEFAULT_HEADERS)

    def secret_member(self, name: str) -> str | None:
        """The rule that makes the value of a member named `name` a secret, or None."""
        if self.secret_header(name):
            return "header"
        if self.defaults and _secret_name(name):
            return "key"
        if self.keys:
            head = name[:MAX_KEY_CHECKED]
            if any(p.search(head) for p in self.keys):
                return "custom_key"
        return None

    def credentials(self, text: str) -> Iterator[tuple[int, int, str]]:
        """(start, end, rule) of each credential in `text`, in order."""
        if not self.defaults:
            return
        lowered = text.lower()
        if not any(h in lowered for h in _HINTS):
            return
        for m in _CREDENTIAL.finditer(text):
            rule = m.lastgroup
            assert rule is not None
            if rule == "bearer" and not _token_like(m.group()):
                continue  # prose: "the bearer instrument"
            yield m.start(), m.end(), rule


DEFAULT = Redaction()
NONE = Redaction(defaults=False)


def _secret_name(name: str) -> bool:
    # Only the last two words matter: read them from a bounded tail, so a long
    # name costs no more than a short one (a word is never cut: a cut one would
    # just not be a secret word, and the tail holds at least 2 whole short words).
    words = _WORDS.findall(name[-64:])
    if not words:
        return False
    last = words[-1].lower()
    if last in _SECRET_WORDS:
        return True
    return last == "key" and len(words) > 1 and words[-2].lower() in _KEY_QUALIFIERS


def _token_like(bearer: str) -> bool:
    """Whether the word after "Bearer" looks like a token rather than prose: it
    holds a digit or punctuation, or is long."""
    token = bearer[6:].lstrip(" \t")
    return len(token) >= 20 or not token.isalpha()


def marker(rule: str) -> dict[str, str]:
    """What a redacted value becomes."""
    return {"redacted": SECRET, "reason": rule}


def marker_text(rule: str) -> str:
    """What a credential inside longer text becomes."""
    return f"[redacted {SECRET} {rule}]"
