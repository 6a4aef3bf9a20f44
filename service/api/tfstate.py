"""Terraform's ``http`` state backend on a workspace (docs/terraform-cli.md; the rules are
``service/cli_backend_rules.py``, the transactions ``service/cli_backend.py``):

    GET    /workspaces/{ref}/tfstate        the latest state (204: none yet)
    POST   /workspaces/{ref}/tfstate[?ID=]  a new state version
    LOCK   /workspaces/{ref}/tfstate/lock   take the workspace's lock (also POST)
    UNLOCK /workspaces/{ref}/tfstate/lock   release it; an empty body force-unlocks (also DELETE)

Auth: the bearer token, or HTTP Basic with the token as the password (what terraform sends).
Who may: read the state -- whoever may read the workspace; lock, unlock, write -- whoever may
deploy to it; force-unlock -- admins. Anyone else learns nothing (404). A LOCK or a write to one
of the caller's own names that does not exist yet makes the workspace, as a deploy does.

Litestar routes only the standard methods, so ``LockMethodsApp`` maps LOCK and UNLOCK on the
lock path (and nowhere else) to POST and DELETE before routing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import re
from typing import Any

import msgspec
from litestar import Controller, Litestar, MediaType, Request, Response, delete, get, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Example, OpenAPIMediaType, Operation, RequestBody, Schema
from litestar.openapi.spec.enums import OpenAPIType
from litestar.params import Parameter
from litestar.types import Receive, Send

from service import cli_backend
from service.api import access
from service.api.auth import BASIC_AUTH_OPT, BASIC_SECURITY
from service.api.deploys import read_body
from service.api.errors import Malformed, Unprocessable
from service.api.schemas import error_responses
from service.auth import Principal
from service.cli_backend import Target
from service.cli_backend_rules import (
    LOCK_BODY_MAX,
    LOCK_ID_MAX,
    BackendError,
    LockInfo,
    parse_lock_info,
)
from service.runners.statecheck import state_shape_problem
from service.services import Services
from service.validation import WORKSPACE_NAME, WORKSPACE_REF
from service.workspaces import WorkspaceNotFound, parse_ref

STATE_MEDIA_TYPE = "application/json"
NO_STORE = {"Cache-Control": "no-store"}
REF = Parameter(description="The workspace: `name` (your own) or `owner:name`.")
OPT = {BASIC_AUTH_OPT: True}

# ---------------------------------------------------------------- LOCK and UNLOCK

LOCK_PATH = re.compile(r"^/workspaces/[^/]+/tfstate/lock/?$")
LOCK_METHODS = {"LOCK": "POST", "UNLOCK": "DELETE"}


class LockMethodsApp(Litestar):
    """The app, with terraform's LOCK and UNLOCK taken as POST and DELETE on a workspace's
    ``tfstate/lock`` path. Any other path keeps its method (so LOCK elsewhere is a 405)."""

    async def __call__(self, scope: Any, receive: Receive, send: Send) -> None:  # type: ignore[override]
        if scope["type"] == "http":
            mapped = LOCK_METHODS.get(scope["method"])
            if mapped is not None and LOCK_PATH.match(scope["path"]):
                scope["method"] = mapped
        await super().__call__(scope, receive, send)


# ---------------------------------------------------------------- OpenAPI


_LOCK_INFO_SCHEMA = Schema(
    type=OpenAPIType.OBJECT,
    description="terraform's LockInfo, as `terraform` sends it.",
    properties={
        name: Schema(type=OpenAPIType.STRING)
        for name in ("ID", "Operation", "Info", "Who", "Version", "Created", "Path")
    },
    required=["ID"],
)
_HELD_EXAMPLE = {
    "status_code": 423,
    "detail": "the workspace is locked by ann's terraform",
    "ID": "2f1bca3e-5a0c-6f2d-9b55-0d4f3b1e9a77",
    "Operation": "OperationTypeApply",
    "Info": "",
    "Who": "ann@laptop",
    "Version": "1.11.4",
    "Created": "2026-12-05T08:50:23.848353578Z",
    "Path": "",
}


class HeldBody(msgspec.Struct, frozen=True):
    """A refusal with the holder's LockInfo beside ``status_code`` and ``detail``: terraform
    reads the LockInfo (its ``ID``) from it."""

    status_code: int
    detail: str
    ID: str = ""
    Operation: str = ""
    Info: str = ""
    Who: str = ""
    Version: str = ""
    Created: str = ""
    Path: str = ""


def _held(code: int, description: str) -> ResponseSpec:
    return ResponseSpec(
        data_container=HeldBody,
        description=description,
        generate_examples=False,
        examples=[Example(value={**_HELD_EXAMPLE, "status_code": code})],
    )


class LockInfoOperation(Operation):
    """LOCK/UNLOCK read their raw body themselves: document it as terraform's LockInfo."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.request_body = RequestBody(
            required=False,
            content={"application/json": OpenAPIMediaType(schema=_LOCK_INFO_SCHEMA)},
        )


class StateBodyOperation(Operation):
    """A write's body is the raw tfstate."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.request_body = RequestBody(
            required=True,
            content={
                "application/json": OpenAPIMediaType(
                    schema=Schema(type=OpenAPIType.OBJECT, description="A tfstate (format 4).")
                )
            },
        )


class LockOut(msgspec.Struct, frozen=True):
    """The lock now held: the LockInfo it was taken with."""

    ID: str
    Operation: str
    Info: str
    Who: str
    Version: str
    Created: str
    Path: str


class UnlockOut(msgspec.Struct, frozen=True):
    released: str | None  # the ID of the lock released; null when none was held


class WrittenOut(msgspec.Struct, frozen=True, kw_only=True):
    workspace: str  # owner:name
    version: int | None  # the state version (null only if the workspace had none: cannot be)
    serial: int
    lineage: str
    sha256: str
    created: bool  # False: this content was the latest version already


# ---------------------------------------------------------------- helpers


def _refusal(_: Request[Any, Any, Any], exc: BackendError) -> Response[Any]:
    """A refusal of the backend's rules: ``{"status_code", "detail"}``, and the holder's LockInfo
    beside them where there is one (terraform parses it for the holder's ID)."""
    body: dict[str, Any] = {"status_code": exc.status_code, "detail": exc.detail}
    if exc.lock_info is not None:
        body.update(exc.lock_info)
    return Response(body, status_code=exc.status_code, media_type=MediaType.JSON)


def check_md5(request: Request[Any, Any, Any], body: bytes) -> None:
    """``Content-MD5`` (terraform sends it with every body): 400 when it does not match."""
    header = request.headers.get("content-md5")
    if header is None:
        return
    try:
        claimed = base64.b64decode(header.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise Malformed("Content-MD5 is not base64") from None
    if claimed != hashlib.md5(body).digest():  # noqa: S324 -- an integrity check, as sent
        raise Malformed("the body does not match its Content-MD5")


async def _target(services: Services, principal: Principal, ref: str, *, create: bool) -> Target:
    """The workspace a LOCK, UNLOCK or write is for, checked for deploying (404/403). With
    ``create``, the caller's own name that does not exist yet is a new target (claimed by the
    request's transaction)."""
    try:
        found = await access.workspace(services, principal, ref, "deploy")
    except WorkspaceNotFound:
        owner, name = parse_ref(ref, principal.name)
        if (
            create
            and owner == principal.name
            and WORKSPACE_REF.match(ref) is not None
            and WORKSPACE_NAME.match(name) is not None
        ):
            return cli_backend.new_target(owner, name)
        raise
    return Target(workspace=found.workspace)


def _lock_id(value: str | None) -> str:
    if value is None:
        return ""
    if len(value) > LOCK_ID_MAX or not value.isprintable():
        raise Malformed(f"ID is 1-{LOCK_ID_MAX} printable characters")
    return value.strip()


async def _lock_info(request: Request[Any, Any, Any]) -> LockInfo | None:
    body = await read_body(request, LOCK_BODY_MAX)
    check_md5(request, body)
    return parse_lock_info(body)


# ---------------------------------------------------------------- the routes


class TfstateController(Controller):
    path = "/workspaces"
    tags = ["terraform CLI"]
    security = BASIC_SECURITY
    exception_handlers = {BackendError: _refusal}  # noqa: RUF012 -- Litestar's declaration

    @get(
        "/{name:str}/tfstate",
        summary="terraform http backend: the latest state",
        description=(
            "The workspace's latest tfstate, as written; `204` when it has none. Recorded as "
            '`StateDownloaded` (`via: "cli"`) in the workspace\'s stream.'
        ),
        media_type=STATE_MEDIA_TYPE,
        opt=OPT,
        responses={
            200: ResponseSpec(
                data_container=dict[str, Any],
                description="The tfstate (a JSON object), with its Content-MD5.",
                generate_examples=False,
            ),
            204: ResponseSpec(data_container=None, description="No state yet."),
            **error_responses(400, 404),
        },
    )
    async def read_state(
        self, services: Services, principal: Principal, state_store: Any, name: str = REF
    ) -> Response[bytes]:
        ws = (await access.workspace(services, principal, name)).workspace
        found = await cli_backend.read_latest(
            services.pool, state_store, ws, cli_backend.cli_actor(principal.name)
        )
        if found is None:
            return Response(b"", status_code=204, headers=NO_STORE)
        version, content = found
        return Response(
            content,
            media_type=STATE_MEDIA_TYPE,
            headers={
                "Content-MD5": base64.b64encode(hashlib.md5(content).digest()).decode(),  # noqa: S324
                "ETag": f'"{version.sha256}"',
                "X-State-Version": str(version.version),
                "X-State-Serial": str(version.serial),
                **NO_STORE,
            },
        )

    @post(
        "/{name:str}/tfstate",
        status_code=200,
        summary="terraform http backend: write a new state version",
        description=(
            "The body is the tfstate. While the workspace is locked, only its holder writes "
            "(`?ID=` its lock's ID; `423` otherwise, with the holder's LockInfo); while a deploy "
            "holds it, nobody (`423`). Another lineage, an older serial, or the same serial with "
            "other content is `409`; the latest content again is `200` with `created: false`. "
            "`Content-MD5` is checked (`400`). Recorded as `StateWritten`."
        ),
        opt=OPT,
        request_max_body_size=None,  # the handler reads up to TFDEPLOY_MAX_STATE_BYTES itself
        operation_class=StateBodyOperation,
        responses={
            **error_responses(400, 403, 404, 413, 422),
            409: _held(409, "Not the next state of the workspace, or a lock that is not held."),
            423: _held(423, "Someone else holds the workspace: the holder's LockInfo."),
        },
    )
    async def write_state(
        self,
        request: Request[Any, Any, Any],
        services: Services,
        principal: Principal,
        state_store: Any,
        name: str = REF,
        lock_id: str | None = Parameter(
            query="ID", required=False, description="The ID of the lock the writer holds."
        ),
    ) -> WrittenOut:
        target = await _target(services, principal, name, create=True)
        held_id = _lock_id(lock_id)
        content = await read_body(request, services.settings.max_state_bytes)
        check_md5(request, content)
        problem = await _shape_problem(content)
        if problem is not None:
            raise Unprocessable(f"not a tfstate: {problem}")
        try:
            meta = await cli_backend.state_meta(content)
        except (ValueError, RecursionError) as exc:
            raise Unprocessable(f"not a tfstate: {exc}") from None
        result = await cli_backend.write(
            services.pool,
            state_store,
            target,
            content,
            meta,
            lock_id=held_id,
            user=principal.name,
            actor=cli_backend.cli_actor(principal.name),
        )
        return WrittenOut(
            workspace=result.workspace.ref,
            version=result.version.version if result.version else None,
            serial=meta[0],
            lineage=meta[1],
            sha256=meta[2],
            created=result.created,
        )

    @post(
        "/{name:str}/tfstate/lock",
        status_code=200,
        summary="terraform http backend: lock (also the LOCK method)",
        description=(
            "Takes the workspace's lock with terraform's LockInfo. While a deploy runs or a plan "
            "waits for approval, or another CLI holds it: `423` with the holder's LockInfo "
            "(`terraform -lock-timeout` waits). The holder's own ID again: `200`. While the CLI "
            "holds it, the workspace's deploys stay queued. Recorded as `StateLocked`."
        ),
        opt=OPT,
        request_max_body_size=None,
        operation_class=LockInfoOperation,
        responses={
            **error_responses(400, 403, 404, 413),
            423: _held(423, "Someone else holds the workspace: the holder's LockInfo."),
        },
    )
    async def lock(
        self, request: Request[Any, Any, Any], services: Services, principal: Principal, name: str = REF
    ) -> LockOut:
        target = await _target(services, principal, name, create=True)
        info = await _lock_info(request)
        if info is None:
            raise Malformed("LOCK needs terraform's LockInfo (with an ID) as its body")
        result = await cli_backend.lock(
            services.pool, target, info, principal.name, cli_backend.cli_actor(principal.name)
        )
        return LockOut(**result.info)

    @delete(
        "/{name:str}/tfstate/lock",
        status_code=200,
        summary="terraform http backend: unlock (also the UNLOCK method)",
        description=(
            "Releases the lock held under the body's LockInfo ID (another ID: `409` with the "
            "holder's LockInfo; nothing held: `200`). An empty body is a force-unlock, what "
            "`terraform force-unlock` sends: admins only (`403`), and not of a deploy's hold "
            "(`409`: cancel the deploy). Queued deploys of the workspace then start. Recorded "
            "as `StateUnlocked` or `StateForceUnlocked`."
        ),
        opt=OPT,
        request_max_body_size=None,
        operation_class=LockInfoOperation,
        responses={
            **error_responses(400, 403, 404, 413),
            409: _held(409, "The lock is held under another ID, or by a deploy."),
        },
    )
    async def unlock(
        self, request: Request[Any, Any, Any], services: Services, principal: Principal, name: str = REF
    ) -> UnlockOut:
        ws = (await _target(services, principal, name, create=False)).workspace
        info = await _lock_info(request)
        result = await cli_backend.unlock(
            services.pool,
            ws,
            info.ID if info is not None else None,
            user=principal.name,
            admin=principal.admin,
            actor=cli_backend.cli_actor(principal.name),
        )
        return UnlockOut(released=result.released.lock_id if result.released else None)


async def _shape_problem(content: bytes) -> str | None:
    # Up to TFDEPLOY_MAX_STATE_BYTES of JSON: checked off the event loop.
    return await asyncio.to_thread(state_shape_problem, content)
