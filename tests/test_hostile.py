"""Hostile and broken input: random messages to every RPC and random worker-stream
sequences against a real server process. It never answers INTERNAL or UNKNOWN,
never dies, and a rejected call changes nothing stored."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobtrace.pb import (
    attestation_service_pb2,
    job_service_pb2,
    trace_service_pb2,
    worker_service_pb2,
)

FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
SERVICES = [
    m.DESCRIPTOR.services_by_name[name]
    for m, name in (
        (job_service_pb2, "JobService"),
        (trace_service_pb2, "TraceService"),
        (attestation_service_pb2, "AttestationService"),
    )
]
UNARY = [
    (f"/{s.full_name}/{m.name}", m)
    for s in SERVICES
    for m in s.methods
    if not m.server_streaming and not m.client_streaming
]
SERVER_STREAMS = [
    (f"/{s.full_name}/{m.name}", m) for s in SERVICES for m in s.methods if m.server_streaming
]
TABLES = {
    "jobs": "count(*), coalesce(max(updated_us), 0)",
    "workflows": "count(*), coalesce(max(updated_us), 0)",
    "submissions": "count(*)",
    "trace_events": "count(*)",
    "annotations": "count(*)",
    "attestations": "count(*)",
}


class Server:
    def __init__(self, tmp: Path) -> None:
        self.db = tmp / "hostile.db"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jobtrace",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--db",
                str(self.db),
                "--lease-seconds",
                "2",
                "--heartbeat-seconds",
                "0.5",
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 30
        self.port = 0
        while not self.port:
            line = self.proc.stderr.readline()
            assert line and time.monotonic() < deadline, "server did not start"
            if m := re.search(r"\(port (\d+)\)", line):
                self.port = int(m.group(1))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")

    def fingerprint(self) -> dict[str, tuple[Any, ...]]:
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True) as db:
            return {
                t: db.execute(f"SELECT {cols} FROM {t}").fetchone() for t, cols in TABLES.items()
            }

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        self.channel.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("hostile"))
    try:
        yield s
    finally:
        s.close()
    assert s.proc.returncode == 0, "the server survived and stopped cleanly"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
INTERESTING_STRINGS = st.sampled_from(
    [
        "",
        "job_",
        "wf_",
        "job_01m844ca4ptp8ws0mmfm3qzz6p",
        "x" * 300,
        "a.b",
        "decision.confidence",
        "\x00",
        "💥",
        "../../etc/passwd",
        "' OR 1=1 --",
        "%_",
        "default",
    ]
)


def scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    t = field.type
    if t == FieldDescriptor.TYPE_STRING:
        return st.text(max_size=40) | INTERESTING_STRINGS
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=40)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(
            allow_nan=True, allow_infinity=True, width=32 if t == FieldDescriptor.TYPE_FLOAT else 64
        )
    if t == FieldDescriptor.TYPE_ENUM:
        return st.integers(-3, 12)
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_UINT32):
        return st.integers(0, 2**32 - 1)
    return st.integers(-(2**31), 2**31 - 1) | st.sampled_from([0, 1, -1, 1000, 1001, 2**31 - 1])


def draw_message(data: st.DataObject, cls: type[Message], depth: int = 0) -> Message:
    msg = cls()
    name = cls.DESCRIPTOR.full_name
    if name == "google.protobuf.Struct":
        msg.update(data.draw(st.dictionaries(st.text(max_size=8), json_values, max_size=4)))
        return msg
    if name == "google.protobuf.Value":
        json_format.ParseDict(data.draw(json_values), msg)
        return msg
    for field in cls.DESCRIPTOR.fields:
        if not data.draw(st.booleans()):
            continue
        if field.message_type is not None:
            if depth > 3:
                continue
            sub = GetMessageClass(field.message_type)
            if field.message_type.GetOptions().map_entry:
                key_field, value_field = field.message_type.fields
                for _ in range(data.draw(st.integers(0, 2))):
                    key = data.draw(scalar(key_field))
                    if value_field.message_type is not None:
                        value = draw_message(
                            data, GetMessageClass(value_field.message_type), depth + 1
                        )
                        getattr(msg, field.name)[key].CopyFrom(value)
                    else:
                        getattr(msg, field.name)[key] = data.draw(scalar(value_field))
            elif field.is_repeated:
                for _ in range(data.draw(st.integers(0, 2))):
                    getattr(msg, field.name).add().CopyFrom(draw_message(data, sub, depth + 1))
            else:
                getattr(msg, field.name).CopyFrom(draw_message(data, sub, depth + 1))
        elif field.is_repeated:
            getattr(msg, field.name).extend(data.draw(st.lists(scalar(field), max_size=3)))
        else:
            try:
                setattr(msg, field.name, data.draw(scalar(field)))
            except ValueError:  # e.g. a value out of range for the field's type
                pass
    return msg


def call_raw(server: Server, path: str, payload: bytes, streaming: bool) -> grpc.StatusCode:
    if streaming:
        stream = server.channel.unary_stream(path)
        try:
            for _ in stream(payload, timeout=2):
                pass
        except grpc.RpcError as err:
            return err.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK
    unary = server.channel.unary_unary(path)
    try:
        unary(payload, timeout=10)
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)


@FUZZ
@given(data=st.data())
def test_random_requests_to_every_rpc(server: Server, data: st.DataObject) -> None:
    path, method = data.draw(st.sampled_from(UNARY + SERVER_STREAMS))
    request = draw_message(data, GetMessageClass(method.input_type))
    before = server.fingerprint()
    code = call_raw(server, path, request.SerializeToString(), method.server_streaming)
    assert code not in FORBIDDEN, (path, request)
    if code not in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED):
        assert server.fingerprint() == before, f"{path} was refused ({code}) but changed state"
    assert server.alive()


@FUZZ
@given(data=st.data())
def test_malformed_bytes_to_every_rpc(server: Server, data: st.DataObject) -> None:
    path, method = data.draw(st.sampled_from(UNARY + SERVER_STREAMS))
    payload = data.draw(st.binary(min_size=1, max_size=64))
    before = server.fingerprint()
    code = call_raw(server, path, payload, method.server_streaming)
    assert code not in FORBIDDEN, (path, payload)
    if code not in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED):
        assert server.fingerprint() == before
    assert server.alive()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_worker_stream_sequences(server: Server, data: st.DataObject) -> None:
    """Random message sequences on the bidi stream: every refusal is a StreamError
    (or a clean end), never INTERNAL, and the server stays up."""
    kinds = ["hello", "heartbeat", "progress", "trace", "annotate", "complete", "fail"]
    messages = []
    for i in range(data.draw(st.integers(1, 8))):
        kind = data.draw(st.sampled_from(kinds))
        field = worker_service_pb2.ConnectRequest.DESCRIPTOR.fields_by_name[kind]
        body = draw_message(data, GetMessageClass(field.message_type))
        if kind == "hello" and data.draw(st.booleans()):
            body = worker_service_pb2.WorkerHello(worker_id=f"fuzz-{i}", services=["fuzz"])
        request = worker_service_pb2.ConnectRequest(message_id=i + 1)
        getattr(request, kind).CopyFrom(body)
        messages.append(request.SerializeToString())
    if data.draw(st.booleans()):
        messages.insert(data.draw(st.integers(0, len(messages))), b"\xff\xff\xff")
    connect = server.channel.stream_stream("/jobtrace.v1.WorkerService/Connect")
    responses = connect(iter(messages), timeout=5)
    try:
        for response in responses:
            parsed = worker_service_pb2.ConnectResponse.FromString(response)
            if parsed.WhichOneof("kind") == "error":
                assert parsed.error.code not in (13, 2), parsed  # INTERNAL, UNKNOWN
                assert parsed.error.message
    except grpc.RpcError as err:
        assert err.code() not in FORBIDDEN, err
    assert server.alive()


def test_fuzzing_ran_against_a_live_server(server: Server) -> None:
    assert server.alive() and server.port
    assert os.path.exists(server.db)
