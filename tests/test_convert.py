"""Hand-built conversions agree with protobuf's own JSON mapping."""

from __future__ import annotations

from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st

from jobtrace.api.convert import request_context_to_proto
from jobtrace.clock import iso
from jobtrace.domain.jobs import complete_request_context
from jobtrace.pb import common_pb2

text = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
json_leaf = st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False) | text
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)


@st.composite
def request_contexts(draw: st.DrawFn) -> common_pb2.RequestContext:
    out = common_pb2.RequestContext()
    if draw(st.booleans()):
        out.body.SetInParent()
        out.body.update(draw(st.dictionaries(text, json_value, max_size=4)))
    if draw(st.booleans()):
        u = out.user_context
        u.SetInParent()
        u.user_id, u.display_name, u.email = draw(text), draw(text), draw(text)
        u.roles.extend(draw(st.lists(text, max_size=3)))
        u.attributes.update(draw(st.dictionaries(text, text, max_size=3)))
    if draw(st.booleans()):
        m = out.metadata
        m.SetInParent()
        m.request_id, m.source = draw(text), draw(text)
        m.headers.update(draw(st.dictionaries(text, text, max_size=3)))
        if draw(st.booleans()):
            # Whole seconds, milli, micro and nanoseconds: each prints differently.
            m.timestamp.seconds = draw(st.integers(-62135596800, 253402300799))
            m.timestamp.nanos = draw(st.sampled_from([0, 5_000_000, 123_456_000, 999_999_999, 1]))
    return out


@settings(max_examples=300, deadline=None)
@given(request_contexts())
def test_a_stored_request_context_becomes_the_message_it_came_from(
    message: common_pb2.RequestContext,
) -> None:
    stored = json_format.MessageToDict(message, preserving_proto_field_name=True)
    assert request_context_to_proto(stored) == message


def test_the_receive_time_the_server_fills_in_round_trips_exactly() -> None:
    received_us = 1_764_000_000_123_456
    stored = complete_request_context({}, "req-1", received_us)
    message = request_context_to_proto(stored)
    assert message.metadata.request_id == "req-1"
    assert message.metadata.timestamp.ToMicroseconds() == received_us
    assert stored["metadata"]["timestamp"] == iso(received_us)
