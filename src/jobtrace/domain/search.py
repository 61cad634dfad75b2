"""Full-text search of trace events: the query syntax users write, its checks,
pages of hits across runs and their highlighted snippets."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from jobtrace.domain.errors import FieldViolation, Invalid, ResourceExhausted, Violations
from jobtrace.domain.pagination import Encoder, PageTokens
from jobtrace.domain.trace import Trace
from jobtrace.domain.validation import check_page_size, check_text, check_view, check_window
from jobtrace.model import Category, Level, TraceEvent, TraceType
from jobtrace.store import search as store
from jobtrace.store.db import Database
from jobtrace.store.search import Clause, SearchFilter, SearchKey, Term, TextQuery

E = TypeVar("E")

MAX_QUERY_CHARS = 256
MAX_TERMS = 16
MIN_PREFIX = 2
# A word, as both engines index it (see migration 0014): a run of letters and
# digits. Anything else separates words.
WORD_RE = re.compile(r"[^\W_]+")
# Snippets: about this many characters, starting this far before the first match.
SNIPPET_CHARS = 200
SNIPPET_LEAD = 60
MARK_OPEN = "\N{LEFT-POINTING DOUBLE ANGLE QUOTATION MARK}"  # «
MARK_CLOSE = "\N{RIGHT-POINTING DOUBLE ANGLE QUOTATION MARK}"  # »
# A marker character in the text itself shows as its single counterpart.
_UNMARK = str.maketrans(
    {
        MARK_OPEN: "\N{SINGLE LEFT-POINTING ANGLE QUOTATION MARK}",
        MARK_CLOSE: "\N{SINGLE RIGHT-POINTING ANGLE QUOTATION MARK}",
    }
)
_SPACES = re.compile(r"\s+")

SYNTAX = (
    'words (all must match), "a phrase", a OR b, -excluded, prefix*; punctuation separates words'
)


def parse_query(v: Violations, text: str, field: str = "query") -> TextQuery | None:
    """The query a user wrote, or None with a violation naming what is wrong
    with it (never an engine's syntax error later: every word reaches the
    engines as letters and digits only)."""

    def bad(problem: str) -> None:
        v.add(field, f"{problem} (search syntax: {SYNTAX})")

    if not text.strip():
        bad("required: what to search for")
        return None
    if len(text) > MAX_QUERY_CHARS:
        bad(f"must be at most {MAX_QUERY_CHARS} characters (got {len(text)})")
        return None
    # Terms as written, in order: (term, negated, where) or the OR operator (None).
    items: list[tuple[Term | None, bool, int]] = []
    i, n = 0, len(text)
    while i < n:
        if text[i].isspace():
            i += 1
            continue
        at = i
        negated = text[i] == "-" and i + 1 < n and not text[i + 1].isspace()
        if negated:
            i += 1
        if text[i] == '"':
            close = text.find('"', i + 1)
            if close < 0:
                bad(f"unbalanced quote: the phrase opened at character {i + 1} is never closed")
                return None
            raw, i, prefix = text[i + 1 : close], close + 1, False
        else:
            end = i
            while end < n and not text[end].isspace() and text[end] != '"':
                end += 1
            raw, i = text[i:end], end
            if raw == "OR" and not negated:
                items.append((None, False, at))
                continue
            prefix = raw.endswith("*")
        words = tuple(WORD_RE.findall(raw.lower()))
        if not words:
            continue  # punctuation alone: no word to find, as the engines read it
        if prefix and len(words[-1]) < MIN_PREFIX:
            bad(
                f"prefix {raw!r} at character {at + 1} is too short: at least "
                f"{MIN_PREFIX} letters or digits before the *"
            )
            return None
        items.append((Term(words, prefix), negated, at))
    clauses: list[Clause] = []
    joining = -1  # where the OR waiting for its right-hand term is
    for term, negated, at in items:
        if term is None:
            if not clauses or joining >= 0:
                bad(f"OR at character {at + 1} needs a term on each side")
                return None
            if clauses[-1].negated:
                bad(f"a negated term cannot be part of OR (character {at + 1})")
                return None
            joining = at
        elif joining >= 0:
            if negated:
                bad(f"a negated term cannot be part of OR (character {at + 1})")
                return None
            clauses[-1] = Clause((*clauses[-1].terms, term))
            joining = -1
        else:
            clauses.append(Clause((term,), negated))
    if joining >= 0:
        bad(f"OR at character {joining + 1} needs a term on each side")
        return None
    if not clauses:
        bad("has no words to search for: words are letters and digits")
        return None
    terms = sum(len(c.terms) for c in clauses)
    if terms > MAX_TERMS:
        bad(f"at most {MAX_TERMS} terms (got {terms})")
        return None
    if all(c.negated for c in clauses):
        bad("needs a term that is not negated: '-' only excludes from what the others find")
        return None
    return TextQuery(tuple(clauses))


def snippet(event: TraceEvent, q: TextQuery) -> str:
    """About SNIPPET_CHARS of the message (or of the user message when only it
    has a match) around the first match, each match between « and »."""
    for text in (event.message, event.user_message):
        spans = _matches(text, q)
        if spans:
            return _excerpt(text, spans)
    return _excerpt(event.message or event.user_message, [])


def _matches(text: str, q: TextQuery) -> list[tuple[int, int]]:
    """Where the terms that find an event (not the negated ones) are in
    `text`, as sorted, merged (start, end) character spans."""
    words = [(m.start(), m.end(), m.group().lower()) for m in WORD_RE.finditer(text)]
    spans: list[tuple[int, int]] = []
    for term in (t for c in q.clauses if not c.negated for t in c.terms):
        size = len(term.words)
        for i in range(len(words) - size + 1):
            if all(words[i + j][2] == w for j, w in enumerate(term.words[:-1])) and (
                words[i + size - 1][2].startswith(term.words[-1])
                if term.prefix
                else words[i + size - 1][2] == term.words[-1]
            ):
                spans.append((words[i][0], words[i + size - 1][1]))
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def _excerpt(text: str, spans: list[tuple[int, int]]) -> str:
    start = max(0, spans[0][0] - SNIPPET_LEAD) if spans else 0
    end = min(len(text), start + SNIPPET_CHARS)
    # Never cut a word or a match in two.
    while start > 0 and WORD_RE.match(text[start - 1]):
        start -= 1
    for s, e in spans:
        if s < end < e:
            end = e
    while end < len(text) and WORD_RE.match(text[end]):
        end += 1
    out: list[str] = []
    at = start
    for s, e in spans:
        if s >= end:
            break
        if s < at:
            continue
        out.append(_plain(text[at:s]))
        out.append(MARK_OPEN + _plain(text[s:e]) + MARK_CLOSE)
        at = e
    out.append(_plain(text[at:end]))
    body = "".join(out).strip()
    return ("…" if start > 0 else "") + body + ("…" if end < len(text) else "")


def _plain(text: str) -> str:
    return _SPACES.sub(" ", text).translate(_UNMARK)


@dataclass(frozen=True, slots=True)
class SearchRequest:
    query: str
    page_size: int = 0
    page_token: str = ""
    run_id: str = ""
    min_level: int = 0
    category: int = 0
    type: int = 0
    service: str = ""
    since_us: int = 0
    until_us: int = 0
    view: int = 0


@dataclass(frozen=True, slots=True)
class Found:
    """One hit: the event and its snippet."""

    event: TraceEvent
    snippet: str


@dataclass(frozen=True, slots=True)
class Results(Generic[E]):
    hits: list[E]
    next_page_token: str


class TraceSearch:
    """SearchTraceEvents: pages of hits across the runs a caller may read."""

    def __init__(self, db: Database, tokens: PageTokens, trace: Trace) -> None:
        self._db = db
        self._tokens = tokens
        self._trace = trace

    async def search(
        self, tenant: str | None, request: SearchRequest, *, out: Encoder[Found, E]
    ) -> Results[E]:
        """One page of hits, newest stored first, as `out` encodes them, at
        most `out.budget` bytes (the first whatever its size, up to
        `out.ceiling`), and the token of the next page."""
        r = request
        v = Violations()
        q = parse_query(v, r.query)
        limit = check_page_size(v, "page_size", r.page_size)
        full = check_view(v, "view", r.view)
        check_text(v, "run_id", r.run_id, 64)
        check_text(v, "service", r.service, 128)
        for name, enum_type, value in (
            ("min_level", Level, r.min_level),
            ("category", Category, r.category),
            ("type", TraceType, r.type),
        ):
            if value not in enum_type.__members__.values():
                v.add(name, f"unknown value {value}")
        check_window(v, "since", r.since_us or None, "until", r.until_us or None, strict=True)
        flt = SearchFilter(
            tenant=tenant,
            run_id=r.run_id,
            min_level=r.min_level,
            category=r.category,
            type=r.type,
            service=r.service,
            since_us=r.since_us,
            until_us=r.until_us,
        )
        bound = {"q": r.query, "f": _bound(flt)}
        try:
            written = self._tokens.decode_key("page_token", r.page_token, "search", bound)
        except Invalid as exc:
            v.items.extend(exc.violations)
            written = None
        v.raise_if_any()
        assert q is not None
        async with self._db.read() as session:
            after: SearchKey | None = None
            if written is not None:
                after = store.check_key(session, written)
                if after is None:
                    raise Invalid([FieldViolation("page_token", "malformed page token")])
            if r.run_id:
                await self._trace.require_run(session, tenant, r.run_id)
            hits: list[E] = []
            used = 0
            last: SearchKey | None = None
            while True:
                chunk = await store.search_events(
                    session,
                    q,
                    flt,
                    after=after,
                    limit=limit - len(hits) + 1,
                    max_bytes=out.budget - used,
                    full=full,
                )
                for hit in chunk.items:
                    if len(hits) == limit:
                        return Results(hits, self._next(bound, last))
                    message, size = out.encode(Found(hit.event, snippet(hit.event, q)))
                    if hits and used + size > out.budget:
                        return Results(hits, self._next(bound, last))
                    if size > out.ceiling:
                        name = f"event {hit.event.run_id}:{hit.event.seq}"
                        raise ResourceExhausted(
                            f"{name} is {size} bytes encoded, more than a response may carry "
                            f"({out.ceiling}); the BASIC view leaves its heavy fields out",
                            reason="ITEM_TOO_LARGE",
                            metadata={"item": name, "bytes": str(size), "limit": str(out.ceiling)},
                        )
                    hits.append(message)
                    used += size
                    last = hit.key
                if chunk.exhausted:
                    return Results(hits, "")
                after = chunk.after
                await asyncio.sleep(0)  # encoding a chunk takes a while: let others run

    def _next(self, bound: dict[str, Any], last: SearchKey | None) -> str:
        return "" if last is None else self._tokens.encode_key("search", bound, last)


def _bound(f: SearchFilter) -> dict[str, Any]:
    """What a page token is bound to: the filters (and the caller's tenant)."""
    return {
        "tenant": f.tenant,
        "run_id": f.run_id,
        "min_level": f.min_level,
        "category": f.category,
        "type": f.type,
        "service": f.service,
        "since": f.since_us,
        "until": f.until_us,
    }
