"""The workspaces resource: the workspaces a caller may see, and a workspace's persisted tfstate
versions, outputs and resources.

A workspace is named by a ref: ``name`` (the caller's own) or ``owner:name``. Who may read it is
``service.api.access``'s rule; one the caller may not see, and one that does not exist, are the
same 404. Every read of a tfstate (the latest, or a version) is recorded as ``StateDownloaded``
in the workspace's stream. State, versions, outputs and resources are answered with
``Cache-Control: no-store``: they hold infrastructure details no cache should keep.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
from litestar import Controller, Response, get
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter

from service.api import access
from service.api.auth import SECURITY
from service.api.errors import Malformed, check_limit, check_text
from service.api.limits import validation_gate
from service.api.schemas import (
    LatestDeploy,
    LatestState,
    OutputOut,
    OutputsOut,
    ResourceList,
    ResourceOut,
    StateVersionOut,
    StateVersionPage,
    WorkspaceOut,
    WorkspacePage,
    error_responses,
)
from service.auth import Principal
from service.db import autocommit
from service.deploys import NotFound
from service.services import Services
from service.statestores import index
from service.validation import WORKSPACE_NAME, WORKSPACE_REF
from service.workspaces import Workspace, list_visible, record_download

STATES_LIMIT_MAX = 200
WORKSPACES_LIMIT_MAX = 200
VERSION_MAX = 2**31 - 1  # state_versions.version is an integer
STATE_MEDIA_TYPE = "application/json"
NO_STORE = {"Cache-Control": "no-store"}
REF = Parameter(description="The workspace: `name` (your own) or `owner:name`.")


def _state_responses() -> dict[int, ResponseSpec]:
    """The handlers answer raw bytes (the tfstate as stored); document them as the JSON object
    they are."""
    return {
        200: ResponseSpec(
            data_container=dict[str, Any],
            description="The tfstate, as terraform wrote it (a JSON object).",
            generate_examples=False,
        ),
        **error_responses(400, 404),
    }


def _state_response(version: index.StateVersion, content: bytes) -> Response[bytes]:
    return Response(
        content,
        media_type=STATE_MEDIA_TYPE,
        headers={
            "ETag": f'"{version.sha256}"',
            "X-State-Version": str(version.version),
            "X-State-Serial": str(version.serial),
            **NO_STORE,
        },
    )


# ---------------------------------------------------------------- outputs and resources (pure)


# A stored tfstate is bounded in bytes (TFDEPLOY_MAX_STATE_BYTES), not in how many values it
# holds: it is read with msgspec into structs that keep what is not needed as Raw (never built),
# an output's value stays Raw from the state to the response, and the small fields are decoded
# only when they are small. A state of millions of tiny values costs about its own size here,
# except for a resource's instances, which are listed (at most LIST_MAX of them).
SMALL_FIELD = 4096  # a type, name, module, provider or index key longer than this is not one
LIST_MAX = 100_000  # resource instances listed by GET .../resources


_NULL = msgspec.Raw(b"null")  # a field the state does not hold (msgspec.Raw takes no None)


class _Top(msgspec.Struct, gc=False):
    outputs: msgspec.Raw = _NULL
    resources: msgspec.Raw = _NULL


class _Output(msgspec.Struct, gc=False):
    value: msgspec.Raw = _NULL
    type: msgspec.Raw = _NULL
    sensitive: msgspec.Raw = _NULL


class _Instance(msgspec.Struct, gc=False):
    index_key: msgspec.Raw = _NULL


class _Resource(msgspec.Struct, gc=False):
    module: msgspec.Raw = _NULL
    mode: msgspec.Raw = _NULL
    type: msgspec.Raw = _NULL
    name: msgspec.Raw = _NULL
    provider: msgspec.Raw = _NULL
    instances: msgspec.Raw = _NULL


_TOP = msgspec.json.Decoder(_Top)
_OUTPUTS = msgspec.json.Decoder(dict[str, msgspec.Raw])
_OUTPUT = msgspec.json.Decoder(_Output)
_RESOURCES = msgspec.json.Decoder(list[msgspec.Raw])
_RESOURCE = msgspec.json.Decoder(_Resource)
# An instance that is not an object (a garbage state) is listed without a key, as before.
_INSTANCES = msgspec.json.Decoder(list[_Instance | None | bool | int | float | str])


def _top(content: bytes) -> _Top:
    try:
        return _TOP.decode(content)
    except (msgspec.DecodeError, RecursionError):  # ValidationError included: not an object
        raise ValueError("the stored state is not a JSON object") from None


def _small(raw: msgspec.Raw) -> Any:
    """A small JSON value of the state, decoded; None for a missing, big or odd one."""
    if len(raw) > SMALL_FIELD:
        return None
    try:
        return msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return None


def outputs_of(content: bytes) -> dict[str, OutputOut]:
    """The root module's outputs of a tfstate: name -> value, type, sensitive. A sensitive
    output's value is never given (null). Values are passed on as the state holds them."""
    raw = _top(content).outputs
    out: dict[str, OutputOut] = {}
    if raw is _NULL:
        return out
    try:
        outputs = _OUTPUTS.decode(raw)
    except (msgspec.DecodeError, RecursionError):  # not an object
        return out
    for name, entry in sorted(outputs.items()):
        try:
            output = _OUTPUT.decode(entry)
        except (msgspec.DecodeError, RecursionError):  # not an object
            continue
        sensitive = _small(output.sensitive) is True
        out[name] = OutputOut(
            value=None if sensitive or output.value is _NULL else output.value,
            type=None if output.type is _NULL else output.type,
            sensitive=sensitive,
        )
    return out


def _provider(raw: object) -> str:
    """``provider["registry.terraform.io/hashicorp/null"]`` -> ``registry.terraform.io/hashicorp/null``
    (an alias stays: ``....null.west``)."""
    text = str(raw or "")
    if text.startswith('provider["') and '"]' in text:
        source, _, alias = text[len('provider["') :].partition('"]')
        return source + alias
    return text


def _index(key: object) -> str:
    """An instance key as an address writes it: ``[0]`` (count), ``["a"]`` (for_each)."""
    if key is None:
        return ""
    if isinstance(key, int) and not isinstance(key, bool):
        return f"[{key}]"
    return f"[{json.dumps(key)}]"


def resources_of(content: bytes, limit: int | None = None) -> list[ResourceOut]:
    """One item per resource instance of a tfstate (what ``terraform state list`` lists), with
    no attribute values; at most ``limit`` of them."""
    raw = _top(content).resources
    out: list[ResourceOut] = []
    if raw is _NULL:
        return out
    try:
        resources = _RESOURCES.decode(raw)
    except (msgspec.DecodeError, RecursionError):  # not a list
        return out
    for entry in resources:
        if limit is not None and len(out) >= limit:
            break
        try:
            r = _RESOURCE.decode(entry)
        except (msgspec.DecodeError, RecursionError):  # not an object
            continue
        module = _small(r.module) or None
        mode = str(_small(r.mode) or "managed")
        type_, name = str(_small(r.type) or ""), str(_small(r.name) or "")
        base = f"{'data.' if mode == 'data' else ''}{type_}.{name}"
        if module:
            base = f"{module}.{base}"
        provider = _provider(_small(r.provider))
        try:
            instances = _INSTANCES.decode(r.instances) if r.instances is not _NULL else [None]
        except (msgspec.DecodeError, RecursionError):  # not a list of objects
            instances = [None]
        for instance in instances or [None]:
            if limit is not None and len(out) >= limit:
                break
            key = _small(instance.index_key) if isinstance(instance, _Instance) else None
            out.append(
                ResourceOut(
                    address=base + _index(key),
                    type=type_,
                    name=name,
                    provider=provider,
                    mode=mode,
                    module=str(module) if module else None,
                )
            )
    return out


# ``state_store`` is a service.statestores.StateStore; annotated Any because Litestar checks
# dependency values with isinstance, which a typing.Protocol refuses.


async def _latest_content(
    services: Services, state_store: Any, ws: Workspace
) -> tuple[index.StateVersion, bytes]:
    async with services.pool.connection() as conn:
        version = await index.latest(conn, ws.id)
    if version is None:
        raise NotFound("workspace has no persisted state")
    return version, await state_store.get(ws.id, version.version, version.location)


async def _downloaded(
    services: Services, principal: Principal, ws: Workspace, version: index.StateVersion, latest: bool
) -> None:
    async with autocommit(services.pool) as conn:
        await record_download(conn, ws.id, version.version, version.sha256, latest, principal.actor)


def _after(after: str | None) -> tuple[str, str] | None:
    if after is None or after == "":
        return None
    owner, sep, name = after.rpartition(":")
    if not sep or WORKSPACE_REF.match(after) is None or WORKSPACE_NAME.match(name) is None:
        raise Malformed("after must be a workspace ref owner:name (the next of the previous page)")
    return owner, name


class WorkspaceController(Controller):
    path = "/workspaces"
    tags = ["workspaces"]
    security = SECURITY

    @get("/", summary="The workspaces you may see", responses=error_responses(400, 422))
    async def list_workspaces(
        self,
        services: Services,
        principal: Principal,
        owner: str | None = Parameter(required=False, description="Only this user's."),
        after: str | None = Parameter(
            required=False, description="The `next` of the previous page (a ref `owner:name`)."
        ),
        limit: int = Parameter(
            default=100,
            description=f"1-{WORKSPACES_LIMIT_MAX}.",
            schema_extra={"minimum": 1, "maximum": WORKSPACES_LIMIT_MAX},
        ),
    ) -> WorkspacePage:
        check_limit(limit, WORKSPACES_LIMIT_MAX)
        check_text("owner", owner)
        start = _after(after)
        async with services.pool.connection() as conn:
            rows = await list_visible(
                conn,
                principal.name,
                admin=principal.admin,
                owner=owner or None,
                after=start,
                limit=limit + 1,
            )
        page = rows[:limit]
        items = [
            WorkspaceOut(
                id=r["id"],
                owner=r["owner"],
                name=r["name"],
                ref=f"{r['owner']}:{r['name']}",
                role=r["role"],
                created_at=r["created_at"],
                latest_deploy=LatestDeploy(
                    id=r["deploy_id"],
                    action=r["deploy_action"],
                    status=r["deploy_status"],
                    owner=r["deploy_owner"],
                    created_at=r["deploy_created_at"],
                )
                if r["deploy_id"]
                else None,
                latest_state=LatestState(
                    version=r["state_version"],
                    serial=r["state_serial"],
                    created_at=r["state_created_at"],
                )
                if r["state_version"] is not None
                else None,
            )
            for r in page
        ]
        more = len(rows) > limit
        return WorkspacePage(items=items, next=items[-1].ref if more else None)

    @get(
        "/{name:str}/state",
        summary="The latest persisted tfstate",
        media_type=STATE_MEDIA_TYPE,
        responses=_state_responses(),
    )
    async def latest_state(
        self, services: Services, principal: Principal, state_store: Any, name: str = REF
    ) -> Response[bytes]:
        ws = (await access.workspace(services, principal, name)).workspace
        version, content = await _latest_content(services, state_store, ws)
        await _downloaded(services, principal, ws, version, latest=True)
        return _state_response(version, content)

    @get(
        "/{name:str}/states",
        summary="State versions, newest first",
        responses=error_responses(400, 404, 422),
    )
    async def state_versions(
        self,
        services: Services,
        principal: Principal,
        name: str = REF,
        limit: int = Parameter(
            default=50,
            description=f"1-{STATES_LIMIT_MAX}.",
            schema_extra={"minimum": 1, "maximum": STATES_LIMIT_MAX},
        ),
        before: int | None = Parameter(
            required=False, description="The `next` of the previous page.", ge=1, le=VERSION_MAX
        ),
    ) -> Response[StateVersionPage]:
        check_limit(limit, STATES_LIMIT_MAX)
        ws = (await access.workspace(services, principal, name)).workspace
        async with services.pool.connection() as conn:
            versions = await index.list_versions(conn, ws.id, limit=limit + 1, before=before)
        page = versions[:limit]
        more = len(versions) > limit
        body = StateVersionPage(
            items=[StateVersionOut.of(v, ws) for v in page],
            next=page[-1].version if more else None,
        )
        return Response(body, headers=NO_STORE)

    @get(
        "/{name:str}/states/{version:int}",
        summary="One state version's tfstate",
        responses=_state_responses(),
        media_type=STATE_MEDIA_TYPE,
    )
    async def state_version(
        self,
        services: Services,
        principal: Principal,
        state_store: Any,
        version: int,
        name: str = REF,
    ) -> Response[bytes]:
        ws = (await access.workspace(services, principal, name)).workspace
        async with services.pool.connection() as conn:
            found = (
                await index.get_version(conn, ws.id, version) if 1 <= version <= VERSION_MAX else None
            )
        if found is None:
            raise NotFound("state version not found")
        content = await state_store.get(ws.id, found.version, found.location)
        await _downloaded(services, principal, ws, found, latest=False)
        return _state_response(found, content)

    @get(
        "/{name:str}/outputs",
        summary="The outputs of the latest state (sensitive values null)",
        responses=error_responses(400, 404),
    )
    async def outputs(
        self, services: Services, principal: Principal, state_store: Any, name: str = REF
    ) -> Response[OutputsOut]:
        ws = (await access.workspace(services, principal, name)).workspace
        _, content = await _latest_content(services, state_store, ws)
        # A tfstate may be tens of MiB: parsed off the event loop, on the bounded validation
        # threads, one at a time per user (service.api.limits): a user's GETs of a huge state
        # cannot hold more than one parse's memory of the process at once.
        outputs = await validation_gate(services).run(principal.name, outputs_of, content)
        return Response(OutputsOut(outputs=outputs), headers=NO_STORE)

    @get(
        "/{name:str}/resources",
        summary="The resources of the latest state (no attribute values)",
        responses=error_responses(400, 404),
    )
    async def resources(
        self, services: Services, principal: Principal, state_store: Any, name: str = REF
    ) -> Response[ResourceList]:
        ws = (await access.workspace(services, principal, name)).workspace
        _, content = await _latest_content(services, state_store, ws)
        items = await validation_gate(services).run(
            principal.name, resources_of, content, LIST_MAX + 1
        )
        truncated = len(items) > LIST_MAX
        return Response(ResourceList(items=items[:LIST_MAX], truncated=truncated), headers=NO_STORE)
