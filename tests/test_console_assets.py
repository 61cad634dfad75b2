"""The console's files as the package ships and serves them (no browser): every
asset is in the package, served with its type and the page's security
headers; nothing outside the console's folder is reachable; features.json
names the RPCs of the services the listener serves. (tests/test_console.py
drives the console itself in Chromium.)"""

from __future__ import annotations

import json
import re
from typing import Any

from jobtrace import console


async def get(
    path: str, method: str = "GET", headers: Any = ()
) -> tuple[int, dict[bytes, bytes], bytes]:
    app = console.make_app(["jobtrace.v1.JobService", "jobtrace.v1.AttestationService"])
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": list(headers)}
    await app(scope, receive, send)
    start, body = sent
    return start["status"], dict(start["headers"]), body["body"]


async def test_the_page_and_its_modules_are_served_from_the_package() -> None:
    status, headers, body = await get("/")
    assert status == 200 and headers[b"content-type"].startswith(b"text/html")
    csp = headers[b"content-security-policy"].decode()
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert headers[b"referrer-policy"] == b"no-referrer"
    page = body.decode()
    # Every script and stylesheet is local: no CDN, no inline script.
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    assert "<script>" not in page
    sources = [(await get(f"/console/{name}"))[2].decode() for name in ("app.js", "run.js")]
    modules = re.findall(r'from "\./([a-z]+\.js)"', "".join(sources))
    assert "runs.js" in modules and "trace.js" in modules
    for name in {"app.js", "style.css", *modules}:
        status, headers, body = await get(f"/console/{name}")
        assert status == 200 and body, name
        kind = b"text/css" if name.endswith(".css") else b"text/javascript"
        assert headers[b"content-type"].startswith(kind), name


async def test_unchanged_files_answer_304_and_head_has_no_body() -> None:
    _, headers, _ = await get("/console/app.js")
    status, _, body = await get("/console/app.js", headers=[(b"if-none-match", headers[b"etag"])])
    assert status == 304 and body == b""
    status, headers, body = await get("/console/style.css", method="HEAD")
    assert status == 200 and body == b"" and int(headers[b"content-length"]) > 0


async def test_nothing_outside_the_console_is_served() -> None:
    for path in ("/console/../__init__.py", "/console/__init__.py", "/console/%2e%2e/x",
                 "/console/", "/console/nope.js", "/console/.hidden.js", "/other"):  # fmt: skip
        status, _, _ = await get(path)
        assert status == 404, path
    status, headers, _ = await get("/", method="POST")
    assert status == 405 and headers[b"allow"] == b"GET, HEAD"


async def test_features_name_the_rpcs_of_the_served_services_only() -> None:
    status, _, body = await get("/console/features.json")
    assert status == 200
    services = json.loads(body)["services"]
    assert set(services) == {"jobtrace.v1.JobService", "jobtrace.v1.AttestationService"}
    assert {"CancelJob", "CancelWorkflow", "WatchRuns"} <= set(services["jobtrace.v1.JobService"])
    assert "VerifyAttestation" in services["jobtrace.v1.AttestationService"]


def test_features_list_only_the_served_rpcs_of_a_service() -> None:
    served = console.features(
        {
            "jobtrace.v1.JobService": None,
            "jobtrace.v1.WorkerService": frozenset({"WatchWorkers", "ListWorkers"}),
        }
    )
    assert set(served) == {"jobtrace.v1.JobService", "jobtrace.v1.WorkerService"}
    # In the contract's order; the worker protocol (Connect, GetStepResult) not listed.
    assert served["jobtrace.v1.WorkerService"] == ["ListWorkers", "WatchWorkers"]
    assert "CancelJob" in served["jobtrace.v1.JobService"]


async def test_every_shipped_file_is_served() -> None:
    for entry in console.STATIC.iterdir():
        status, _, body = await get(f"/console/{entry.name}")
        assert status == 200 and body == entry.read_bytes(), entry.name
