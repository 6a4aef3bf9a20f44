"""The deploys resource: request, read, list, follow the events and logs, cancel, replay. A plan's
review (read it, approve it, discard it) is ``service.api.plans``.

Every id-taking route resolves the deploy through ``service.api.access``: a malformed id, an
unknown id and a deploy the caller may not see are all 404. A deploy names its workspace by a ref
(``name``: the requester's own, claimed on first use; ``owner:name``: another user's, for its
``deploy`` members and admins).
"""

from __future__ import annotations

from typing import Any

from litestar import Controller, MediaType, Request, Response, get, post
from litestar.exceptions import InternalServerException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.openapi.spec import (
    OpenAPIMediaType,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
)
from litestar.params import Parameter
from litestar.response import Stream

from service import store
from service.api import access
from service.api.auth import SECURITY, require_admin
from service.api.errors import (
    Malformed,
    TooLarge,
    Unprocessable,
    UnsupportedMediaType,
    check_limit,
    check_text,
)
from service.api.limits import validation_gate
from service.api.schemas import (
    DeployOut,
    DeployPage,
    EventList,
    EventOut,
    decode_cursor,
    encode_cursor,
    error_responses,
)
from service.auth import Principal
from service.deploys import NewDeploy
from service.lifecycle import STATUSES, Cancel, Replay
from service.logs import page_end, text_between
from service.services import Services
from service.validation import body_limit, parse_deploy_request

IDEMPOTENCY_KEY_MAX = 200
IDEMPOTENCY_KEY = Parameter(
    header="Idempotency-Key",
    required=False,
    description=f"At most {IDEMPOTENCY_KEY_MAX} printable characters: a retry of the same "
    "request with the same key answers as the first did.",
)
LIST_LIMIT_MAX = 200
LIST_LIMIT_DEFAULT = 50
LOG_LIMIT_MAX = 100_000
DEPLOY_ID = Parameter(description="The deploy's id (a UUID).")


async def read_body(request: Request[Any, Any, Any], max_bytes: int) -> bytes:
    """The raw body, refused with 413 before reading when Content-Length announces more than
    ``max_bytes``, and while reading as soon as more arrives."""
    announced = request.content_length  # a malformed header is a 400 (ClientException)
    if announced is not None and announced > max_bytes:
        raise TooLarge(f"request body larger than {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise TooLarge(f"request body larger than {max_bytes} bytes")
            chunks.append(chunk)
    except RequestEntityTooLarge:
        # Litestar's own limit (the app's request_max_body_size, the same number) came first.
        raise TooLarge(f"request body larger than {max_bytes} bytes") from None
    except InternalServerException:
        # "client disconnected prematurely": nobody hears the answer, but it is no server error.
        raise Malformed("the client disconnected before the request body was complete") from None
    return b"".join(chunks)


def check_json_content_type(request: Request[Any, Any, Any]) -> None:
    """415 unless the body is announced as JSON in UTF-8: ``application/json`` (or another
    ``application/*+json``), no charset or a UTF-8 one. A missing Content-Type is taken as JSON,
    and so is ``application/x-www-form-urlencoded``: it is what ``curl -d`` sends unless told
    otherwise, and the CONTRACT names no Content-Type -- such clients keep working (the body
    must still parse as JSON)."""
    header = request.headers.get("content-type")
    if header is None or not header.strip():
        return
    media_type, _, params = header.partition(";")
    media_type = media_type.strip().lower()
    if media_type == "application/x-www-form-urlencoded":
        return
    if media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    ):
        for param in params.split(";"):
            name, _, value = param.partition("=")
            if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in (
                "utf-8",
                "utf8",
            ):
                raise UnsupportedMediaType("the request body must be JSON in UTF-8")
        return
    raise UnsupportedMediaType(
        f"the request body must be JSON (Content-Type: application/json), not {ascii(media_type)[:80]}"
    )


def check_idempotency_key(key: str | None) -> None:
    if key is not None and (not 1 <= len(key) <= IDEMPOTENCY_KEY_MAX or not key.isprintable()):
        raise Unprocessable(f"Idempotency-Key must be 1-{IDEMPOTENCY_KEY_MAX} printable characters")


def _string_map(description: str) -> Schema:
    return Schema(
        type=OpenAPIType.OBJECT,
        additional_properties=Schema(type=OpenAPIType.STRING),
        description=description,
    )


DEPLOY_REQUEST_SCHEMA = Schema(
    type=OpenAPIType.OBJECT,
    title="DeployRequest",
    required=["files"],
    properties={
        "files": _string_map(
            "Relative file name (`main.tf`, `modules/net/main.tf`) -> content: `.tf`, "
            "`.tf.json`, `.tfvars`, `.tfvars.json` or `.json`, and the lock file "
            "`.terraform.lock.hcl` at the top level; no `backend` or `cloud` block."
        ),
        "workspace": Schema(
            type=OpenAPIType.STRING,
            default="default",
            description="Your own workspace's name (made on first use), or `owner:name` for "
            "another user's workspace you may deploy to.",
        ),
        "variables": _string_map("Terraform variables (`-var`), not secret."),
        "secrets": _string_map(
            "Secret variables: reach terraform only as `TF_VAR_<name>`, never stored in clear."
        ),
        "action": Schema(
            type=OpenAPIType.STRING,
            enum=["apply", "destroy", "plan"],
            default="apply",
            description="`plan`: a speculative plan (never changes anything, never waits).",
        ),
        "auto_approve": Schema(
            type=OpenAPIType.BOOLEAN,
            default=True,
            description="false: each attempt stops after its plan until it is approved.",
        ),
        "max_attempts": Schema(
            type=[OpenAPIType.INTEGER, OpenAPIType.NULL],
            minimum=1,
            description="Attempts in all, the first included; default TFDEPLOY_MAX_ATTEMPTS.",
        ),
    },
    additional_properties=False,
)


class DeployRequestOperation(Operation):
    """The handler reads the raw body itself (size limit, its own validation), so Litestar cannot
    infer the request body: document it here."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.request_body = RequestBody(
            required=True,
            content={"application/json": OpenAPIMediaType(schema=DEPLOY_REQUEST_SCHEMA)},
        )


class DeployController(Controller):
    path = "/deploys"
    tags = ["deploys"]
    security = SECURITY

    @post(
        "/",
        status_code=202,
        summary="Request a deploy",
        operation_class=DeployRequestOperation,
        responses=error_responses(400, 403, 404, 413, 415, 422),
        description=(
            "Queues a deploy and answers 202 with it. With an `Idempotency-Key`, the same key "
            "and the same request return the same deploy (header `Idempotent-Replayed: true`); "
            "the same key with another request is 422."
        ),
    )
    async def request_deploy(
        self,
        request: Request[Any, Any, Any],
        services: Services,
        principal: Principal,
        idempotency_key: str | None = Parameter(
            header="Idempotency-Key",
            required=False,
            description=f"At most {IDEMPOTENCY_KEY_MAX} characters.",
        ),
    ) -> Response[DeployOut]:
        check_idempotency_key(idempotency_key)
        check_json_content_type(request)
        settings = services.settings
        # JSON escaping inflates content: the raw body may exceed the content limit somewhat;
        # the content itself is held to max_request_bytes by validation (413).
        body = await read_body(request, body_limit(settings.max_request_bytes))
        # Parsing HCL is CPU-bound (up to ~1 s for 1 MiB): off the event loop, on the bounded
        # validation threads, one body per user at a time (service.api.limits).
        parsed = await validation_gate(services).run(
            principal.name, parse_deploy_request, body, settings.max_request_bytes
        )
        new = NewDeploy(
            workspace=parsed.workspace,
            action=parsed.action,
            files=dict(parsed.files),
            variables=dict(parsed.variables),
            secrets=dict(parsed.secrets),
            max_attempts=parsed.max_attempts or settings.max_attempts,
            auto_approve=parsed.auto_approve,
        )
        target = await access.deploy_target(services, principal, parsed.workspace)
        view, created = await services.deploys.request(
            new,
            owner=principal.name,
            actor=principal.actor,
            idempotency_key=idempotency_key,
            workspace=target,
        )
        headers = {"Location": f"/deploys/{view.id}"}
        if not created:
            headers["Idempotent-Replayed"] = "true"
        return Response(DeployOut.of(view), status_code=202, headers=headers)

    @get("/", summary="List deploys, newest first", responses=error_responses(400, 404, 422))
    async def list_deploys(
        self,
        services: Services,
        principal: Principal,
        status: str | None = Parameter(
            required=False,
            description="One of " + ", ".join(STATUSES) + ".",
            schema_extra={"enum": list(STATUSES)},
        ),
        workspace: str | None = Parameter(
            required=False, description="A workspace you may see: `name` or `owner:name`."
        ),
        owner: str | None = Parameter(required=False, description="Only deploys this user requested."),
        limit: int = Parameter(
            default=LIST_LIMIT_DEFAULT,
            description=f"1-{LIST_LIMIT_MAX}.",
            schema_extra={"minimum": 1, "maximum": LIST_LIMIT_MAX},
        ),
        cursor: str | None = Parameter(
            required=False, description="The `next` of the previous page."
        ),
    ) -> DeployPage:
        if status is not None and status not in STATUSES:
            raise Unprocessable(f"status must be one of {', '.join(STATUSES)}")
        check_limit(limit, LIST_LIMIT_MAX)
        check_text("workspace", workspace)
        check_text("owner", owner)
        after = decode_cursor(cursor) if cursor else None
        workspace_id = None
        if workspace:
            workspace_id = (await access.workspace(services, principal, workspace)).workspace.id
        async with services.pool.connection() as conn:
            views = await store.list_deploys(
                conn,
                owner=owner or None,
                status=status,
                workspace_id=workspace_id,
                viewer=None if principal.admin else principal.name,
                cursor=after,
                limit=limit + 1,
            )
        page = views[:limit]
        more = len(views) > limit
        next_cursor = encode_cursor(page[-1].created_at, page[-1].id) if more else None
        return DeployPage(items=[DeployOut.of(v) for v in page], next=next_cursor)

    @get("/{deploy_id:str}", summary="One deploy", responses=error_responses(400, 404))
    async def get_deploy(
        self,
        services: Services,
        principal: Principal,
        deploy_id: str = DEPLOY_ID,
    ) -> DeployOut:
        return DeployOut.of(await access.visible_deploy(services, principal, deploy_id))

    @get(
        "/{deploy_id:str}/events",
        summary="A deploy's events, in order",
        responses=error_responses(400, 404),
    )
    async def deploy_events(
        self,
        services: Services,
        principal: Principal,
        deploy_id: str = DEPLOY_ID,
        after: int = Parameter(
            default=0, description="Only events with a version above this.", ge=0
        ),
    ) -> EventList:
        deploy = await access.visible_deploy(services, principal, deploy_id)
        async with services.pool.connection() as conn:
            events = await store.read_stream(conn, deploy.id, after_version=after)
        return EventList(items=[EventOut.of(e) for e in events])

    @get(
        "/{deploy_id:str}/logs",
        summary="Terraform output so far, a page at a time",
        responses=error_responses(400, 404, 422),
        response_description="The lines, one per text line; header X-Last-Seq: the last one's seq.",
        media_type=MediaType.TEXT,  # Litestar adds "; charset=utf-8"
        description=(
            "The deploy's lines with a sequence number above `after`, at most `limit` of them "
            "(every line so far without it), one per text line. `X-Last-Seq` is the sequence "
            "number of the last line in the answer (`after` when there is none): ask for the "
            "next page with `after` set to it. Streamed from the database, whatever the log's "
            "size."
        ),
    )
    async def deploy_logs(
        self,
        services: Services,
        principal: Principal,
        deploy_id: str = DEPLOY_ID,
        after: int | None = Parameter(
            default=None, description="Only lines after this sequence number.", ge=0
        ),
        after_seq: int | None = Parameter(
            default=None, description="The same as `after` (its earlier name).", ge=0
        ),
        limit: int | None = Parameter(
            default=None,
            description=f"At most this many lines (1-{LOG_LIMIT_MAX}); every line so far without it.",
            schema_extra={"minimum": 1, "maximum": LOG_LIMIT_MAX},
        ),
    ) -> Stream:
        if after is not None and after_seq is not None and after != after_seq:
            raise Malformed("give after or after_seq (its earlier name), not both")
        start = after if after is not None else (after_seq or 0)
        if limit is not None:
            check_limit(limit, LOG_LIMIT_MAX)
        deploy = await access.visible_deploy(services, principal, deploy_id)
        async with services.pool.connection() as conn:
            upto = await page_end(conn, deploy.id, start, limit)
        headers = {"X-Last-Seq": str(upto), "Cache-Control": "no-store"}
        return Stream(
            text_between(services.pool, deploy.id, start, upto),
            media_type=MediaType.TEXT,
            headers=headers,
        )

    @post(
        "/{deploy_id:str}/cancel",
        status_code=202,
        summary="Cancel a deploy (who may deploy to its workspace, its requester, or an admin)",
        responses=error_responses(403, 404, 409),
    )
    async def cancel(
        self,
        services: Services,
        principal: Principal,
        deploy_id: str = DEPLOY_ID,
    ) -> DeployOut:
        deploy = await access.cancellable_deploy(services, principal, deploy_id)
        _, view = await services.deploys.execute(
            deploy.id, Cancel(by=principal.actor), principal.actor
        )
        return DeployOut.of(view)

    @post(
        "/{deploy_id:str}/replay",
        status_code=202,
        summary="Queue a failed deploy again with a fresh attempt budget (admin)",
        responses=error_responses(403, 404, 409),
    )
    async def replay(
        self,
        services: Services,
        principal: Principal,
        deploy_id: str = DEPLOY_ID,
    ) -> DeployOut:
        deploy = await access.visible_deploy(services, principal, deploy_id)
        require_admin(principal, "a replay")
        _, view = await services.deploys.execute(
            deploy.id,
            Replay(by=principal.actor, budget=services.settings.max_attempts),
            principal.actor,
        )
        return DeployOut.of(view)
