"""Hostile input (issue #6, scenario 7): whatever a client sends, the API answers with the
contract's JSON error (or a normal answer), never a 5xx, and writes nothing for a refused request.

Two halves:

- schemathesis fuzzes every operation of the app's own OpenAPI document (``/schema/openapi.json``)
  against the app served by uvicorn on a real port, in the test's event loop (the psycopg pool
  lives there; schemathesis's ASGI transport would run the app in another loop). It runs as a
  user and as an admin, with schema-valid and schema-violating data, seeded (derandomized) and
  bounded; checks: no 5xx, status codes, content types, headers and bodies as documented,
  schema-violating requests refused, auth not ignored. The SSE routes are fuzzed like the others:
  schemathesis reads an event stream for at most one event or ``SSE_TIMEOUT`` seconds.
- hand-made cases, each with its exact answer, and the row counts of the written tables
  unchanged: bodies over the limits (refused before they are read), deeply nested JSON, invalid
  UTF-8, 10,000 files, path-traversal and look-alike file names, garbage ``Last-Event-ID`` on
  both SSE routes, SQL-looking and NUL filter values, odd query parameters, wrong content types,
  and another user's token on every route that names a deploy or a workspace.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
import msgspec
import pytest
import uvicorn
from test_roles import ROUTES, concrete

from service.api.app import create_app
from service.api.streams import StreamOptions
from service.deploys import NewDeploy
from service.lifecycle import AttemptFailed, Cancel, StartAttempt
from service.services import Services
from service.settings import from_env
from service.validation import body_limit

MAIN_TF = 'resource "null_resource" "x" {}\n'
UNKNOWN = "00000000-0000-4000-8000-000000000000"
COUNTED_TABLES = (
    "events",
    "deploys",
    "deploy_inputs",
    "deploy_secrets",
    "deploy_logs",
    "idempotency_keys",
    "procrastinate_jobs",
    "state_versions",
)

# schemathesis: examples per operation, per token (user, admin), per mode (valid, invalid data).
SCHEMATHESIS_EXAMPLES = 5
SSE_TIMEOUT = 2.0  # seconds schemathesis reads an open event stream (and waits for its headers)


# ---------------------------------------------------------------- fixtures and helpers


class World(msgspec.Struct):
    """What the tests find in the database: ann's deploys in each state, bob's, a workspace with a
    persisted state."""

    queued: str
    failed: str
    cancelled: str
    bobs: str
    workspace: str


async def new_deploy(services: Services, owner: str, workspace: str, max_attempts: int = 1) -> str:
    new = NewDeploy(
        workspace=workspace,
        action="apply",
        files={"main.tf": MAIN_TF},
        secrets={"token": "s3cret"},
        max_attempts=max_attempts,
    )
    view, _ = await services.deploys.request(new, owner=owner, actor=f"user:{owner}")
    return view.id


@pytest.fixture
async def world(services: Services, tokens: dict[str, str]) -> World:
    from service.logs import append_log
    from service.statestores import index, make_state_store

    queued = await new_deploy(services, "ann", "anns-ws")
    failed = await new_deploy(services, "ann", "anns-ws")
    await services.deploys.execute(failed, StartAttempt(worker="w"), "worker:w")
    async with services.pool.connection() as conn:
        await append_log(conn, failed, 1, "stdout", "Apply complete? no: boom")
    await services.deploys.execute(
        failed, AttemptFailed(reason="apply_failed", message="boom"), "worker:w"
    )
    cancelled = await new_deploy(services, "ann", "anns-ws")
    await services.deploys.execute(cancelled, Cancel(by="user:ann"), "user:ann")
    bobs = await new_deploy(services, "bob", "bobs-ws")
    content = b'{"version": 4, "serial": 1, "lineage": "l", "resources": []}'
    serial, lineage, sha, size = index.state_meta(content)
    state_store = make_state_store(services.settings, services.pool)
    key = (await services.deploys.get(failed)).workspace_id  # type: ignore[union-attr]
    async with services.pool.connection() as conn, conn.transaction():
        version = await index.next_version(conn, key)
        stored = await state_store.put(key, version, content, sha)
        await index.record_version(
            conn, key, version, failed, 1, stored, serial, lineage, sha, size
        )
    return World(queued, failed, cancelled, bobs, "anns-ws")


@pytest.fixture
async def served(services: Services) -> AsyncIterator[str]:
    """The app behind uvicorn on a free loopback port, served from this event loop."""
    app = create_app(services, stream_options=StreamOptions(ping=0.5))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()  # startup failed: raise its error
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@pytest.fixture
async def api(services: Services) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process client (no HTTP parsing in between) on the app."""
    transport = httpx.ASGITransport(app=create_app(services))
    async with httpx.AsyncClient(transport=transport, base_url="http://tfdeploy.test") as c:
        yield c


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def counts(services: Services) -> dict[str, int]:
    out = {}
    async with services.pool.connection() as conn:
        for table in COUNTED_TABLES:
            cur = await conn.execute(f"SELECT count(*) FROM {table}")
            row = await cur.fetchone()
            out[table] = row[0] if row else 0
    return out


def assert_error(
    response: httpx.Response, status: int, detail: str | None = None, *, what: str = ""
) -> None:
    """The contract's error: this status, JSON ``{"status_code", "detail"}``, and ``detail`` when
    given."""
    assert response.status_code == status, (what, status, response.status_code, response.text[:500])
    assert response.headers["content-type"] == "application/json", (what, response.headers)
    body = response.json()
    assert body["status_code"] == status and isinstance(body["detail"], str), (what, body)
    if detail is not None:
        assert body["detail"] == detail, (what, body)


async def raw_exchange(base: str, request: bytes, *, timeout: float = 30.0) -> bytes:
    """Send raw bytes over a fresh connection; the whole answer (the server closes, or answered
    with Content-Length)."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(read_response(reader), timeout)
    finally:
        writer.close()


async def read_response(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + await reader.readexactly(length)


def parse_raw(answer: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    return status, headers, msgspec.json.decode(body) if body else None


# ---------------------------------------------------------------- 1. schemathesis


def _fuzz_operation(
    operation: Any,
    mode: Any,
    user: str,
    session: Any,
    tokens: dict[str, str],
    deploy_ids: Any,
    workspaces: Any,
    members: Any,
    cases: dict[tuple[str, str, str], int],
) -> str | None:
    """SCHEMATHESIS_EXAMPLES seeded cases of one operation, one user, one generation mode;
    the failure report, if any."""
    from hypothesis import HealthCheck, Phase, given, settings

    @settings(
        max_examples=SCHEMATHESIS_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
        report_multiple_bugs=False,
    )
    @given(
        case=operation.as_strategy(generation_mode=mode),
        deploy_id=deploy_ids,
        workspace=workspaces,
        member=members,
    )
    def check(case: Any, deploy_id: str | None, workspace: str | None, member: str | None) -> None:
        params = case.path_parameters
        if params is not None:
            if deploy_id and "deploy_id" in params:
                params["deploy_id"] = deploy_id
            if workspace and "name" in params:
                params["name"] = workspace
            if member and "user" in params:
                params["user"] = member
        key = (case.operation.label, user, mode.value)
        cases[key] = cases.get(key, 0) + 1
        # A real token in place of the one schemathesis made up; none where it left the
        # Authorization header out on purpose (a negative case: then 401 is the right answer).
        generated = {k.lower() for k in (case.headers or {})}
        dropped = mode.value == "negative" and "authorization" not in generated
        case.call_and_validate(
            session=session,
            headers={} if dropped else bearer(tokens[user]),
            timeout=SSE_TIMEOUT if case.operation.path.endswith("/stream") else 60.0,
        )

    try:
        check()
    except BaseExceptionGroup as exc:  # schemathesis's FailureGroup
        return f"{operation.label} as {user}, {mode.value}:\n{exc}"
    return None


def run_schemathesis(
    raw_schema: dict[str, Any], base: str, tokens: dict[str, str], world: World
) -> tuple[list[str], dict[tuple[str, str, str], int]]:
    """Every operation of the document, as ann and as root, with valid and invalid data; returns
    the failures (one report per operation, user and mode) and the cases run per (operation,
    user, mode)."""
    import requests
    import schemathesis
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_dict(raw_schema)
    schema.config.update(base_url=base)
    # The API checks more than JSON Schema can say (file names, HCL, ids that exist): a
    # schema-valid request may well be refused (4xx). Every other check runs.
    schema.config.checks.update(excluded_check_names=["positive_data_acceptance"])
    schema.config.generation.update(deterministic=True, database="none")
    schema.config.max_stream_events = 1  # an SSE answer is read up to its first event

    # Real ids and names now and then, so the routes get past their 404s.
    deploy_ids = st.sampled_from(
        [None, None, world.queued, world.failed, world.cancelled, world.bobs]
    )
    workspaces = st.sampled_from(
        [None, world.workspace, f"ann:{world.workspace}", "bobs-ws", "bob:bobs-ws"]
    )
    members = st.sampled_from([None, "bob", "cat", "ann"])
    failures: list[str] = []
    cases: dict[tuple[str, str, str], int] = {}
    session = requests.Session()
    for result in schema.get_all_operations():
        operation = result.ok()
        raw = raw_schema["paths"][operation.path][operation.method.lower()]
        modes = [GenerationMode.POSITIVE]
        if raw.get("parameters") or raw.get("requestBody"):
            modes.append(GenerationMode.NEGATIVE)  # something to make invalid
        # One seeded run per (user, mode), not one run drawing them: every combination is
        # covered whatever hypothesis's choices (a mixed draw once left one out).
        for user in ("ann", "root"):
            for mode in modes:
                failure = _fuzz_operation(
                    operation, mode, user, session, tokens, deploy_ids, workspaces, members, cases
                )
                if failure:
                    failures.append(failure)
    return failures, cases


async def test_schemathesis_finds_no_5xx_and_no_answer_outside_the_schema(
    services: Services, tokens: dict[str, str], world: World, served: str
) -> None:
    async with httpx.AsyncClient(base_url=served) as client:
        raw_schema = (await client.get("/schema/openapi.json")).json()
    operations = {
        (method.upper(), path)
        for path, item in raw_schema["paths"].items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    }
    # Every documented route, the SSE ones included (the status page is not in the document).
    documented = {
        (method, template.replace(":str}", "}").replace(":int}", "}"))
        for (method, template), _ in ROUTES.items()
        if not template.startswith(("/schema", "/static")) and template != "/"
        and method not in ("LOCK", "UNLOCK")  # terraform's; documented as their POST/DELETE
    }
    assert operations == documented
    failures, cases = await asyncio.to_thread(run_schemathesis, raw_schema, served, tokens, world)
    assert not failures, "\n\n".join(failures)
    # Every operation ran, as a user and as an admin, with valid data and (where it takes any
    # parameter or body) invalid data.
    ran = {(label.split(" ", 1)[1], user, mode) for label, user, mode in cases}
    for method, path in operations:
        for user in ("ann", "root"):
            assert (path, user, "positive") in ran, (method, path, user)
            if path not in ("/health", "/metrics"):
                assert (path, user, "negative") in ran, (method, path, user)
    print(f"schemathesis: {sum(cases.values())} cases over {len(operations)} operations")


# ---------------------------------------------------------------- 2. bodies too large


@pytest.fixture
async def default_limits(
    services: Services, database_url: str, tmp_path: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """The app with the default content limit (1 MiB; the ``services`` fixture has 64 KiB), on
    the same database."""
    from service.services import open_services

    opened = await open_services(
        from_env({}, data_dir=str(tmp_path / "default")), database_url, pool_size=2
    )
    try:
        assert opened.settings.max_request_bytes == 1024 * 1024
        transport = httpx.ASGITransport(app=create_app(opened))
        async with httpx.AsyncClient(transport=transport, base_url="http://tfdeploy.test") as c:
            yield c
    finally:
        await opened.close()


async def test_content_over_the_1_mib_limit_is_413_and_writes_nothing(
    services: Services, tokens: dict[str, str], default_limits: httpx.AsyncClient
) -> None:
    before = await counts(services)
    headers = {**bearer(tokens["ann"]), "Content-Type": "application/json"}
    # Content just over 1 MiB, in a body the server reads (under its raw-body limit): refused by
    # the content check.
    over = {"files": {"main.tf": "#" + "x" * (1024 * 1024)}}
    response = await default_limits.post("/deploys", json=over, headers=headers)
    assert_error(
        response,
        413,
        "request too large: files, variables and secrets hold more than 1048576 bytes",
    )
    # A 6 MB body announced by Content-Length: refused before it is read.
    huge = b'{"files": {"main.tf": "#' + b"x" * (6 * 1000 * 1000) + b'"}}'
    response = await default_limits.post("/deploys", content=huge, headers=headers)
    assert_error(response, 413, f"request body larger than {body_limit(1024 * 1024)} bytes")
    assert await counts(services) == before


async def test_a_multi_megabyte_body_is_refused_before_it_is_read(
    services: Services, tokens: dict[str, str], served: str
) -> None:
    """Over a real connection: the 413 comes while most of the body was never sent."""
    before = await counts(services)
    limit = body_limit(services.settings.max_request_bytes)  # 320 KiB here
    detail = f"request body larger than {limit} bytes"
    head = (
        f"POST /deploys HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {tokens['ann']}\r\n"
        "Content-Type: application/json\r\n"
    ).encode()
    # Content-Length announces 64 MiB; only 64 KiB follow. A server that waited for the body
    # would never answer.
    announced = 64 * 1024 * 1024
    answer = await raw_exchange(
        served,
        head + f"Content-Length: {announced}\r\n\r\n".encode() + b'{"files": ' + b" " * 65536,
    )
    status, headers, body = parse_raw(answer)
    assert (status, headers["content-type"], body) == (
        413,
        "application/json",
        {"status_code": 413, "detail": detail},
    )
    # Chunked, no Content-Length: the server counts while it reads and answers as soon as the
    # limit is passed, while the client is still sending (it would send 64 MiB).
    host, port = served.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    sent = 0

    async def pump() -> None:
        nonlocal sent
        chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
        try:
            writer.write(head + b"Transfer-Encoding: chunked\r\n\r\n")
            opening = b'{"files": {"a.tf": "'
            writer.write(b"%x\r\n%s\r\n" % (len(opening), opening))
            while sent < announced:
                writer.write(chunk)
                await writer.drain()
                sent += 65536
        except OSError:
            pass  # the server answered and closed

    pumping = asyncio.create_task(pump())
    try:
        answer = await asyncio.wait_for(read_response(reader), 60)
    finally:
        pumping.cancel()
        writer.close()
    status, headers, body = parse_raw(answer)
    assert (status, body) == (413, {"status_code": 413, "detail": detail})
    assert sent < announced // 2, sent
    assert await counts(services) == before


# ---------------------------------------------------------------- 3. bodies that are hostile


def deep(n: int) -> str:
    return "[" * n + "]" * n


HOSTILE_BODIES: list[tuple[str, bytes, int, str]] = [
    (
        "100,000 levels of [",
        b"[" * 100_000,
        422,
        "invalid request: Expected `object`, got `array`",
    ),
    (
        "100,000 levels of [ as a file's content",
        b'{"files": {"main.tf": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}",
        422,
        "invalid request: Expected `str`, got `array` - at `$.files[...]`",
    ),
    (
        "100,000 levels of { as the body",
        b"{" * 100_000,
        400,
        "malformed JSON: JSON is malformed: object keys must be strings (byte 1)",
    ),
    (
        "100,000 levels of [ in a .json file",
        msgspec.json.encode({"files": {"main.tf": MAIN_TF, "deep.json": deep(100_000)}}),
        422,
        "invalid JSON in deep.json: nested too deeply",
    ),
    (
        "100,000 levels of { in a .tf.json file",
        msgspec.json.encode({"files": {"main.tf.json": '{"a":' * 100_000 + "1" + "}" * 100_000}}),
        422,
        "invalid JSON in main.tf.json: nested too deeply",
    ),
    (
        "100,000 levels of [ in HCL",
        msgspec.json.encode({"files": {"main.tf": "x = " + deep(100_000)}}),
        422,
        "invalid HCL in main.tf: nested more than 100 levels deep at line 1, column 105",
    ),
    (
        "invalid UTF-8 in a file's content",
        b'{"files": {"main.tf": "# \xff"}}',
        400,
        "request body is not valid UTF-8 (byte 25)",
    ),
    (
        "an encoded surrogate (invalid UTF-8) in a file's content",
        b'{"files": {"main.tf": "\xed\xa0\x80"}}',
        400,
        "request body is not valid UTF-8 (byte 23)",
    ),
    (
        "an overlong '/' (invalid UTF-8) in a file name",
        b'{"files": {"a\xc0\xafb.tf": "# x"}}',
        400,
        "request body is not valid UTF-8 (byte 13)",
    ),
    (
        "a lone surrogate escape in a file's content",
        b'{"files": {"main.tf": "# \\ud800"}}',
        400,
        "malformed JSON: Input data was truncated",
    ),
    (
        "a NUL in a file's content",
        b'{"files": {"main.tf": "# \\u0000"}}',
        422,
        "file 'main.tf' contains a NUL character",
    ),
    (
        "a NUL in a .tfvars file",
        b'{"files": {"main.tf": "# x", "a.tfvars": "a = \\"\\u0000\\""}}',
        422,
        "file 'a.tfvars' contains a NUL character",
    ),
    (
        "10,000 files",
        msgspec.json.encode({"files": {f"f{i}.tf": "" for i in range(10_000)}}),
        422,
        "too many files: 10000 (at most 200)",
    ),
    ("an empty body", b"", 400, "malformed JSON: Input data was truncated"),
    ("JSON null", b"null", 422, "invalid request: Expected `object`, got `null`"),
    (
        "an unknown field",
        b'{"files": {"main.tf": "# x"}, "admin": true}',
        422,
        "invalid request: Object contains unknown field `admin`",
    ),
]


async def test_hostile_bodies_get_their_exact_answer_and_write_nothing(
    services: Services, tokens: dict[str, str], default_limits: httpx.AsyncClient
) -> None:
    # The default 1 MiB content limit, so that 100,000 levels of nesting fit in a file.
    before = await counts(services)
    for name, body, status, detail in HOSTILE_BODIES:
        response = await default_limits.post(
            "/deploys",
            content=body,
            headers={
                **bearer(tokens["ann"]),
                "Content-Type": "application/json",
                "Idempotency-Key": "hostile",
            },
        )
        assert_error(response, status, detail, what=name)
    assert await counts(services) == before


_ALLOWED = "only A-Z, a-z, 0-9, '.', '_', '-' and '/' are allowed"
HOSTILE_NAMES: list[tuple[str, str]] = [
    ("../x.tf", "file name '../x.tf' contains '..'; path traversal is not allowed"),
    ("a/../../b.tf", "file name 'a/../../b.tf' contains '..'; path traversal is not allowed"),
    ("./x.tf", "file name './x.tf' contains '.'; path traversal is not allowed"),
    ("/etc/x.tf", "file name '/etc/x.tf' is an absolute path; only relative names are allowed"),
    ("a\\b.tf", "file name 'a\\\\b.tf' contains a backslash; separate directories with '/'"),
    ("..\\x.tf", "file name '..\\\\x.tf' contains a backslash; separate directories with '/'"),
    ("x.tf\x00", "file name 'x.tf\\x00' contains a control character ('\\x00')"),
    ("x\n.tf", "file name 'x\\n.tf' contains a control character ('\\n')"),
    ("a//b.tf", "file name 'a//b.tf' contains an empty path segment ('//')"),
    ("dir/", "file name 'dir/' ends with '/'; it must name a file"),
    (
        ".terraform/x.tf",
        "file name '.terraform/x.tf': hidden files and directories are not allowed",
    ),
    (
        ".terraform/providers/p.tf",
        "file name '.terraform/providers/p.tf': hidden files and directories are not allowed",
    ),
    ("-rf.tf", "file name '-rf.tf': a path segment may not start with '-'"),
    # Look-alikes: Cyrillic a, fullwidth solidus, one-dot leader, zero-width space, RTL override.
    ("m\u0430in.tf", f"file name 'm\\u0430in.tf' contains '\u0430' (U+0430); {_ALLOWED}"),
    ("a\uff0fb.tf", f"file name 'a\\uff0fb.tf' contains '\uff0f' (U+FF0F); {_ALLOWED}"),
    ("x\u2024tf", f"file name 'x\\u2024tf' contains '\u2024' (U+2024); {_ALLOWED}"),
    ("main.tf\u200b", f"file name 'main.tf\\u200b' contains '\\u200b' (U+200B); {_ALLOWED}"),
    ("\u202efn.tf", f"file name '\\u202efn.tf' contains '\\u202e' (U+202E); {_ALLOWED}"),
    ("x .tf", f"file name 'x .tf' contains ' ' (U+0020); {_ALLOWED}"),
    (
        "a" * 300 + ".tf",
        "file name '" + "a" * 75 + "...' is too long (303 characters; at most 255)",
    ),
    (
        "a/" * 200 + "x.tf",
        "file name '" + "a/" * 37 + "a...' is too long (404 characters; at most 255)",
    ),
    (
        "terraform.tfstate.json",
        "file name 'terraform.tfstate.json': state files are not accepted; the service manages "
        "Terraform state",
    ),
    (
        "x.sh",
        "file name 'x.sh': only .tf, .tf.json, .tfvars, .tfvars.json and .json files are accepted",
    ),
]


async def test_hostile_file_names_are_422_and_write_nothing(
    services: Services, tokens: dict[str, str], api: httpx.AsyncClient
) -> None:
    before = await counts(services)
    for name, detail in HOSTILE_NAMES:
        response = await api.post(
            "/deploys",
            json={"files": {"main.tf": MAIN_TF, name: "# x\n"}},
            headers=bearer(tokens["ann"]),
        )
        assert_error(response, 422, detail, what=ascii(name))
    assert await counts(services) == before


WRONG_CONTENT_TYPES = [
    "text/plain",
    "multipart/form-data; boundary=x",
    "application/xml",
    "text/json",
    "garbage",
]


async def test_a_body_that_is_not_announced_as_json_is_415(
    services: Services, tokens: dict[str, str], api: httpx.AsyncClient
) -> None:
    before = await counts(services)
    body = msgspec.json.encode({"files": {"main.tf": MAIN_TF}})
    for content_type in WRONG_CONTENT_TYPES:
        response = await api.post(
            "/deploys",
            content=body,
            headers={**bearer(tokens["ann"]), "Content-Type": content_type},
        )
        media_type = content_type.split(";")[0]
        assert_error(
            response,
            415,
            f"the request body must be JSON (Content-Type: application/json), not '{media_type}'",
            what=content_type,
        )
    # JSON in another charset: the body must be UTF-8.
    response = await api.post(
        "/deploys",
        content=body,
        headers={**bearer(tokens["ann"]), "Content-Type": "application/json; charset=latin-1"},
    )
    assert_error(response, 415, "the request body must be JSON in UTF-8")
    assert await counts(services) == before
    # JSON with its parameters, no Content-Type at all, or what `curl -d` sends without -H
    # (the CONTRACT names no Content-Type; such clients worked before the check): fine.
    for header in (
        {"Content-Type": "Application/JSON; charset=UTF-8"},
        {},
        {"Content-Type": "application/x-www-form-urlencoded"},
    ):
        response = await api.post(
            "/deploys", content=body, headers={**bearer(tokens["ann"]), **header}
        )
        assert response.status_code == 202, response.text


# ---------------------------------------------------------------- 4. headers and queries


async def test_invalid_utf8_in_headers_query_and_path(
    services: Services, tokens: dict[str, str], world: World, served: str
) -> None:
    """Raw bytes on the wire, as no well-behaved client sends them."""
    before = await counts(services)

    async def get(target: bytes, *headers: bytes) -> tuple[int, Any]:
        request = b"GET " + target + b" HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
        answer = await raw_exchange(
            served, request + b"".join(h + b"\r\n" for h in headers) + b"\r\n"
        )
        status, response_headers, body = parse_raw(answer)
        assert response_headers["content-type"] == "application/json", response_headers
        return status, body

    ann = b"Authorization: Bearer " + tokens["ann"].encode()
    root = b"Authorization: Bearer " + tokens["root"].encode()
    # A token with invalid UTF-8 appended: not a token.
    assert await get(b"/deploys", ann + b"\xff\xfe") == (
        401,
        {"status_code": 401, "detail": "invalid token"},
    )
    assert await get(b"/events/stream?access_token=%ff%fe") == (
        401,
        {"status_code": 401, "detail": "invalid token"},
    )
    # Off the two stream routes a query token is not looked at.
    assert await get(b"/deploys?access_token=%ff%fe") == (
        401,
        {"status_code": 401, "detail": "missing token: send Authorization: Bearer <token>"},
    )
    # Garbage bytes as Last-Event-ID, on both streams.
    stream = f"/deploys/{world.queued}/stream".encode()
    assert await get(stream, ann, b"Last-Event-ID: \xff\xfe") == (
        400,
        {"status_code": 400, "detail": 'Last-Event-ID must be "<version>" or "<version>.<seq>"'},
    )
    assert await get(b"/events/stream", root, b"Last-Event-ID: \xc3\x28") == (
        400,
        {"status_code": 400, "detail": "Last-Event-ID must be an event position (an integer)"},
    )
    # Invalid UTF-8 in query values and paths: no such workspace, actor or deploy.
    assert await get(b"/deploys?workspace=%ff%fe", ann) == (
        404,
        {"status_code": 404, "detail": "workspace not found"},
    )
    assert await get(b"/events?actor=%c3%28&type=%ff", root) == (200, {"items": [], "next": None})
    assert await get(b"/deploys/%ff%fe/events", ann) == (
        404,
        {"status_code": 404, "detail": "deploy not found"},
    )
    for target in (
        b"/workspaces/%ff/state",
        b"/workspaces/a%00b/states",
        b"/workspaces/%c0%af/states/1",
    ):
        assert await get(target, root) == (
            404,
            {"status_code": 404, "detail": "workspace not found"},
        ), target
    assert await counts(services) == before


LAST_EVENT_IDS = [
    "garbage",
    "-1",
    "1.2.3",
    "1.",
    ".1",
    "1e3",
    "0x10",
    "99999999999999999999",
    "1.-1",
    "NaN",
]


async def test_a_garbage_last_event_id_is_400_on_both_streams(
    services: Services, tokens: dict[str, str], world: World, api: httpx.AsyncClient
) -> None:
    ann, root = bearer(tokens["ann"]), bearer(tokens["root"])
    for value in LAST_EVENT_IDS:
        for how in ("header", "query"):
            header = {"Last-Event-ID": value} if how == "header" else {}
            params = {"last_event_id": value} if how == "query" else {}
            response = await api.get(
                f"/deploys/{world.queued}/stream", headers={**ann, **header}, params=params
            )
            assert_error(response, 400, 'Last-Event-ID must be "<version>" or "<version>.<seq>"')
            response = await api.get("/events/stream", headers={**root, **header}, params=params)
            assert_error(response, 400, "Last-Event-ID must be an event position (an integer)")
    # Well-formed, but not an id this deploy's stream ever sent.
    response = await api.get(
        f"/deploys/{world.queued}/stream", headers={**ann, "Last-Event-ID": "7"}
    )
    assert_error(response, 400, "Last-Event-ID is beyond this deploy's last event (1)")


SQLISH = [
    "' OR 1=1 --",
    "anns-ws' --",
    '"; DROP TABLE events; --',
    "%",
    "_",
    "\\",
    "*",
    "anns%",
    "anns_ws",
]


async def test_sql_looking_filter_values_match_nothing_and_nul_is_400(
    services: Services, tokens: dict[str, str], world: World, api: httpx.AsyncClient
) -> None:
    root = bearer(tokens["root"])
    before = await counts(services)
    # The filters work (a control), and compare for equality: no wildcard, no injection.
    ref = "ann:anns-ws"
    listed = (await api.get("/deploys", headers=root, params={"workspace": ref})).json()
    assert len(listed["items"]) == 3
    audited = (await api.get("/events", headers=root, params={"workspace": ref})).json()
    assert len(audited["items"]) > 3
    for value in SQLISH:
        for url, name in (
            ("/deploys", "owner"),
            ("/events", "type"),
            ("/events", "actor"),
        ):
            response = await api.get(url, headers=root, params={name: value})
            assert response.status_code == 200, (url, name, value, response.text)
            assert response.json() == {"items": [], "next": None}, (url, name, value)
        # A workspace ref names one workspace exactly, or none: 404, like any unknown one.
        for url in ("/deploys", "/events"):
            for prefix in ("", "ann:"):
                response = await api.get(url, headers=root, params={"workspace": prefix + value})
                assert_error(response, 404, "workspace not found")
        response = await api.get("/events", headers=root, params={"deploy_id": value})
        assert_error(response, 400, "deploy_id must be a UUID")
        response = await api.get("/deploys", headers=root, params={"status": value})
        assert_error(
            response,
            422,
            "status must be one of queued, deploying, retrying, planned, succeeded, failed, cancelled, discarded",
        )
        for suffix in ("state", "states", "states/1"):
            response = await api.get(
                f"/workspaces/{quote(value, safe='')}/{suffix}", headers=bearer(tokens["ann"])
            )
            assert_error(response, 404, "workspace not found")
    # A NUL: no stored value holds one; 400 rather than a database error.
    for value in ("\x00", "anns-ws\x00", "' OR 1=1 --\x00"):
        for url, name in (
            ("/deploys", "workspace"),
            ("/deploys", "owner"),
            ("/events", "workspace"),
            ("/events", "type"),
            ("/events", "actor"),
        ):
            for user in ("ann", "root"):
                response = await api.get(url, headers=bearer(tokens[user]), params={name: value})
                assert_error(response, 400, f"{name} must not contain a NUL character")
    assert await counts(services) == before


async def test_odd_query_parameters_get_their_exact_answer(
    services: Services, tokens: dict[str, str], world: World, api: httpx.AsyncClient
) -> None:
    ann = bearer(tokens["ann"])
    before = await counts(services)

    def validation(path_and_query: str) -> str:
        return f"Validation failed for GET {path_and_query}"

    huge = str(2**70)
    cases: list[tuple[str, int, str]] = [
        # Page sizes: negative, zero, over the maximum, beyond any integer type, not a number.
        ("/deploys?limit=-1", 422, "limit must be between 1 and 200"),
        ("/deploys?limit=0", 422, "limit must be between 1 and 200"),
        (f"/deploys?limit={huge}", 422, "limit must be between 1 and 200"),
        ("/deploys?limit=abc", 400, validation("/deploys?limit=abc")),
        ("/deploys?limit=1.5", 400, validation("/deploys?limit=1.5")),
        ("/deploys?limit=", 400, validation("/deploys?limit=")),
        ("/events?limit=-1", 422, "limit must be between 1 and 1000"),
        ("/events?limit=1001", 422, "limit must be between 1 and 1000"),
        ("/workspaces/anns-ws/states?limit=-5", 422, "limit must be between 1 and 200"),
        (f"/workspaces/anns-ws/states?limit={huge}", 422, "limit must be between 1 and 200"),
        # Cursors and positions.
        ("/deploys?cursor=garbage!!", 400, "invalid cursor"),
        ("/deploys?cursor=%ff%fe", 400, "invalid cursor"),
        ("/deploys?cursor=eHx5", 400, "invalid cursor"),  # base64 of "x|y"
        ("/deploys?cursor=' OR 1=1 --", 400, "invalid cursor"),
        ("/events?after=-1", 400, validation("/events?after=-1")),
        ("/events?after=x", 400, validation("/events?after=x")),
        (
            "/workspaces/anns-ws/states?before=0",
            400,
            validation("/workspaces/anns-ws/states?before=0"),
        ),
        (
            f"/workspaces/anns-ws/states?before={2**31}",
            400,
            validation(f"/workspaces/anns-ws/states?before={2**31}"),
        ),
        (
            f"/workspaces/anns-ws/states?before={huge}",
            400,
            validation(f"/workspaces/anns-ws/states?before={huge}"),
        ),
        (
            f"/deploys/{world.failed}/events?after=-1",
            400,
            validation(f"/deploys/{world.failed}/events?after=-1"),
        ),
        (
            f"/deploys/{world.failed}/logs?after_seq=-1",
            400,
            validation(f"/deploys/{world.failed}/logs?after_seq=-1"),
        ),
        (f"/workspaces/anns-ws/states/{huge}", 404, "state version not found"),
        ("/workspaces/anns-ws/states/-1", 404, "state version not found"),
        ("/workspaces/anns-ws/states/0", 404, "state version not found"),
        # The same parameter twice: which one would count? Neither.
        ("/deploys?limit=1&limit=200", 400, "query parameter 'limit' given more than once"),
        (
            "/deploys?status=queued&status=failed",
            400,
            "query parameter 'status' given more than once",
        ),
        (
            "/events?actor=user:ann&actor=admin:root",
            400,
            "query parameter 'actor' given more than once",
        ),
        (
            "/workspaces/anns-ws/states?before=2&before=1",
            400,
            "query parameter 'before' given more than once",
        ),
        (
            f"/deploys/{world.failed}/stream?last_event_id=1&last_event_id=2",
            400,
            "query parameter 'last_event_id' given more than once",
        ),
        (
            f"/deploys?access_token={tokens['ann']}&access_token={tokens['bob']}",
            400,
            "query parameter 'access_token' given more than once",
        ),
    ]
    for url, status, detail in cases:
        assert_error(await api.get(url, headers=ann), status, detail)
    # Beyond every position, version and seq: empty, not an error.
    for url, empty in (
        (f"/events?after={huge}", {"items": [], "next": None}),
        (f"/deploys/{world.failed}/events?after={huge}", {"items": []}),
        (f"/workspaces/anns-ws/states?before={2**31 - 1}", None),
    ):
        response = await api.get(url, headers=ann)
        assert response.status_code == 200, (url, response.text)
        if empty is not None:
            assert response.json() == empty
    response = await api.get(f"/deploys/{world.failed}/logs?after_seq={huge}", headers=ann)
    assert response.status_code == 200 and response.text == ""
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert await counts(services) == before


# ---------------------------------------------------------------- 5. another user's token


async def test_another_users_token_on_every_id_taking_route_answers_as_for_an_unknown_id(
    services: Services, tokens: dict[str, str], world: World, api: httpx.AsyncClient
) -> None:
    """bob and cat asking for ann's deploy or workspace get, byte for byte, the answer for an id
    that does not exist: nothing tells them it does."""
    before = await counts(services)
    named = [
        (method, template)
        for (method, template), role in sorted(ROUTES.items())
        if role != "open" and ("{deploy_id" in template or "{name" in template)
    ]
    assert len(named) == 23
    unknown_ws = "ann:no-such-ws"

    def comparable(response: httpx.Response) -> tuple[int, dict[str, str], bytes]:
        # (The RateLimit-* headers are the caller's own budget, one request less each time.)
        headers = {
            k: v for k, v in response.headers.items()
            if k != "date" and not k.startswith("ratelimit-")
        }
        return response.status_code, headers, response.content

    for method, template in named:
        for deploy_id in (world.queued, world.failed, world.cancelled):
            anns = concrete(template, deploy_id, f"ann:{world.workspace}")
            nobodys = concrete(template, UNKNOWN, unknown_ws)
            # cat as EventSource would come (?access_token=) where that is taken: the streams.
            cats = (
                {"params": {"access_token": tokens["cat"]}}
                if template.endswith("/stream")
                else {"headers": bearer(tokens["cat"])}
            )
            for who, auth in (("bob", {"headers": bearer(tokens["bob"])}), ("cat", cats)):
                for extra in ({}, {"Last-Event-ID": "1"}):
                    kwargs: dict[str, Any] = {
                        "headers": {**auth.get("headers", {}), **extra},
                        "params": auth.get("params", {}),
                    }
                    if method == "POST":
                        kwargs["json"] = {}
                    if method == "PUT":
                        kwargs["json"] = {"role": "deploy"}
                    theirs = await api.request(method, anns, **kwargs)
                    none = await api.request(method, nobodys, **kwargs)
                    assert theirs.status_code == 404, (who, method, anns, theirs.text)
                    detail = "workspace not found" if "{name" in template else "deploy not found"
                    assert_error(theirs, 404, detail)
                    assert comparable(theirs) == comparable(none), (who, method, anns)
    assert await counts(services) == before


# Python's ``\d`` matches every Unicode decimal digit: "١" must not be read as 1.
@pytest.mark.parametrize("value", ["\u0661", "\uff11", "1.\u0661"])
async def test_a_last_event_id_in_non_ascii_digits_is_400(
    services: Services, tokens: dict[str, str], world: World, api: httpx.AsyncClient, value: str
) -> None:
    # The cancelled deploy: its stream ends by itself, so today's wrong 200 cannot hang the test.
    response = await api.get(
        f"/deploys/{world.cancelled}/stream",
        headers=bearer(tokens["ann"]),
        params={"last_event_id": value},
    )
    assert_error(response, 400, 'Last-Event-ID must be "<version>" or "<version>.<seq>"')
