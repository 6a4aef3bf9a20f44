"""The deploy event types: a msgspec tagged union, tag field ``type``.

Events are facts, append-only. Their ``data`` (everything but the tag) is what the event
store keeps in its ``data`` column; ``encode_data``/``decode`` convert both ways.
"""

from __future__ import annotations

from typing import Literal

import msgspec

Action = Literal["apply", "destroy", "plan"]
Actor = str  # "user:<name>", "admin:<name>", "worker:<id>", "cli:<name>", "system"
# What a run does: "run" is a whole run (init .. apply/destroy, or a speculative plan); "plan"
# plans for approval; "apply" applies the approved saved plan.
Step = Literal["run", "plan", "apply"]


class _Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", forbid_unknown_fields=False):
    pass


class Requested(_Event, frozen=True, kw_only=True, tag="Requested"):
    workspace: str
    action: Action
    max_attempts: int
    owner: str
    files: dict[str, str]  # file name -> sha256 of its content; the content lives in deploy_inputs
    variables: dict[str, str] = {}
    secret_names: list[str] = []
    # The workspace's id and owner (workspace names are per user). Empty in events recorded
    # before workspaces had owners; the read model resolves those through the migrated mapping.
    workspace_id: str = ""
    workspace_owner: str = ""
    # False: each attempt stops after its plan until a person approves it (Approved).
    auto_approve: bool = True


class Started(_Event, frozen=True, kw_only=True, tag="Started"):
    attempt: int
    runner: str = ""
    worker: str = ""
    step: Step = "run"


class StatePersisted(_Event, frozen=True, kw_only=True, tag="StatePersisted"):
    attempt: int
    workspace: str
    store: str  # "postgres" | "s3" | "postgres-emergency"
    location: str
    serial: int
    lineage: str
    sha256: str
    size: int
    state_version: int  # this workspace's state version number, 1, 2, ...


class Failed(_Event, frozen=True, kw_only=True, tag="Failed"):
    attempt: int
    reason: str  # apply_failed | timeout | runner_error | state_not_persisted | worker_lost | ...
    message: str = ""
    exit_code: int | None = None
    # Whether another attempt follows. Recorded so that every prefix of a stream folds to the
    # status a client should see (no flicker to "failed" between Failed and Retried).
    final: bool = True
    # Whether the attempt spent the budget. False when the service, not the deploy, stopped it
    # (a worker shutting down handed it over, reason worker_stopped): the Retried after it
    # grows max_attempts by one, so an operator's restart never fails a user's deploy.
    counted: bool = True


class Retried(_Event, frozen=True, kw_only=True, tag="Retried"):
    attempt: int  # the attempt that will run next
    max_attempts: int  # the budget after this event (an admin replay extends it)
    by: Literal["worker", "admin"] = "worker"
    delay_seconds: float = 0.0


class Destroyed(_Event, frozen=True, kw_only=True, tag="Destroyed"):
    """The resources an attempt created were destroyed because its state could not be kept."""

    attempt: int
    reason: str = "state_not_persisted"
    message: str = ""


class StateRescued(_Event, frozen=True, kw_only=True, tag="StateRescued"):
    """The state could neither be persisted normally nor destroyed: an emergency copy holds it."""

    attempt: int
    location: str
    sha256: str
    message: str = ""


class Succeeded(_Event, frozen=True, kw_only=True, tag="Succeeded"):
    attempt: int


class PlanSummary(msgspec.Struct, frozen=True, kw_only=True):
    """Terraform's own counts: a replace is one to add and one to destroy."""

    add: int = 0
    change: int = 0
    destroy: int = 0


class PlanChange(msgspec.Struct, frozen=True, kw_only=True):
    """One resource change of a plan: no values, so nothing sensitive."""

    address: str
    type: str
    actions: list[str]  # terraform's: ["create"], ["update"], ["delete", "create"], ...
    # Terraform replaces it because an earlier apply left it tainted (action_reason
    # "replace_because_tainted").
    tainted: bool = False


class Planned(_Event, frozen=True, kw_only=True, tag="Planned"):
    """A plan was made. Unless an ``Approved`` follows, a non-speculative deploy waits for one."""

    attempt: int
    summary: PlanSummary
    changes: list[PlanChange] = []
    plan_sha256: str = ""  # of the saved plan file; "" for a speculative plan (not kept)
    plan_id: str = ""  # where the saved plan is kept (encrypted), "" when not kept
    base_state_version: int | None = None  # the workspace state version it was made against
    changed: bool = True  # anything to apply at all ("No changes." otherwise)
    # False when the deploy does not wait for a person: a speculative plan, a plan with nothing
    # to apply (Succeeded follows), or one within the approved changes (Approved follows).
    awaits_approval: bool = True


class Approved(_Event, frozen=True, kw_only=True, tag="Approved"):
    """The latest plan may be applied: by a person, or by the re-plan rule (``rule`` names it)
    when every change of a new plan was in the plan a person approved."""

    attempt: int
    by: str
    rule: str = ""


class Discarded(_Event, frozen=True, kw_only=True, tag="Discarded"):
    """A plan that will not be applied: discarded by a person, or expired (``by`` "system:ttl")."""

    by: str
    reason: str = "discarded"  # "discarded" | "expired"


class CancelRequested(_Event, frozen=True, kw_only=True, tag="CancelRequested"):
    by: str


class Cancelled(_Event, frozen=True, kw_only=True, tag="Cancelled"):
    by: str
    attempt: int | None = None  # the attempt that was interrupted, if one ran


Event = (
    Requested
    | Started
    | StatePersisted
    | Failed
    | Retried
    | Destroyed
    | StateRescued
    | Succeeded
    | Planned
    | Approved
    | Discarded
    | CancelRequested
    | Cancelled
)

DEPLOY_EVENT_CLASSES: tuple[type[Event], ...] = (
    Requested,
    Started,
    StatePersisted,
    Failed,
    Retried,
    Destroyed,
    StateRescued,
    Succeeded,
    Planned,
    Approved,
    Discarded,
    CancelRequested,
    Cancelled,
)


# ---------------------------------------------------------------- workspace streams
# Facts about a workspace (created, members, state downloads, CLI locks) live in the same table,
# in the workspace's own stream (stream_kind 'workspace', deploy_id = the workspace's id).


class WorkspaceCreated(_Event, frozen=True, kw_only=True, tag="WorkspaceCreated"):
    """A workspace was claimed: by its owner's first deploy to the name, or by the upgrade that
    gave an existing name to the user whose deploy came first (``migrated``)."""

    name: str
    owner: str
    # The deploy that claimed it; "" when migrated, or claimed by its owner's terraform CLI (a
    # LOCK or a state write; the actor is then cli:<owner>).
    deploy_id: str = ""
    migrated: bool = False


class MemberSet(_Event, frozen=True, kw_only=True, tag="MemberSet"):
    """A user became a member with ``role``, or their role changed (``previous`` was it)."""

    user: str
    role: Literal["read", "deploy"]
    previous: str = ""


class MemberRemoved(_Event, frozen=True, kw_only=True, tag="MemberRemoved"):
    user: str
    role: str  # the role they had


class StateDownloaded(_Event, frozen=True, kw_only=True, tag="StateDownloaded"):
    """A tfstate of the workspace was read through the API (the latest, or one version)."""

    state_version: int
    sha256: str
    latest: bool  # GET .../state (True) or GET .../states/{version} (False)
    via: str = "api"  # "api" | "cli" (the terraform http backend: GET .../tfstate)


# The terraform CLI's http state backend (docs/terraform-cli.md). ``lock_id`` is the ID of
# terraform's LockInfo; the actor of these events is ``cli:<user>`` (``admin:<name>`` for an
# unlock from the shell, ``tfdeploy workspace unlock``).


class StateLocked(_Event, frozen=True, kw_only=True, tag="StateLocked"):
    """A terraform CLI took the workspace's lock: deploys of it stay queued until it is
    released."""

    lock_id: str
    operation: str = ""  # terraform's, e.g. "OperationTypeApply"
    who: str = ""  # terraform's "user@host"
    info: str = ""
    terraform_version: str = ""


class StateUnlocked(_Event, frozen=True, kw_only=True, tag="StateUnlocked"):
    """The CLI that held the lock released it."""

    lock_id: str


class StateForceUnlocked(_Event, frozen=True, kw_only=True, tag="StateForceUnlocked"):
    """An admin removed a CLI's lock without its ID (``terraform force-unlock``, or
    ``tfdeploy workspace unlock``)."""

    lock_id: str  # the lock that was removed
    holder: str  # the user who held it
    held_since: str = ""  # when it was taken (ISO 8601)
    # "cli" (UNLOCK with an empty body) | "shell" (tfdeploy workspace unlock) | "membership"
    # (the holder was removed from the workspace, or may no longer deploy to it)
    via: str = "cli"


class StateWritten(_Event, frozen=True, kw_only=True, tag="StateWritten"):
    """A terraform CLI wrote a new state version (``POST .../tfstate``)."""

    state_version: int
    serial: int
    lineage: str
    sha256: str  # of the plaintext tfstate
    size: int
    lock_id: str = ""  # the lock it was written under ("" when written without one)


WorkspaceEvent = (
    WorkspaceCreated
    | MemberSet
    | MemberRemoved
    | StateDownloaded
    | StateLocked
    | StateUnlocked
    | StateForceUnlocked
    | StateWritten
)

WORKSPACE_EVENT_CLASSES: tuple[type[_Event], ...] = (
    WorkspaceCreated,
    MemberSet,
    MemberRemoved,
    StateDownloaded,
    StateLocked,
    StateUnlocked,
    StateForceUnlocked,
    StateWritten,
)


EVENT_TYPES: dict[str, type[Event]] = {
    cls.__struct_config__.tag: cls  # type: ignore[misc]
    for cls in (*DEPLOY_EVENT_CLASSES, *WORKSPACE_EVENT_CLASSES)
}

_encoder = msgspec.json.Encoder()


def type_name(event: Event) -> str:
    return type(event).__struct_config__.tag  # type: ignore[return-value]


def to_data(event: Event) -> dict[str, object]:
    """The event's fields without its tag: what the store keeps as ``data``."""
    data: dict[str, object] = msgspec.to_builtins(event)
    data.pop("type", None)
    return data


def encode_data(event: Event) -> bytes:
    return _encoder.encode(to_data(event))


def from_data(type_: str, data: object) -> Event:
    """Rebuild an event from its stored type and data; raises KeyError/ValidationError."""
    cls = EVENT_TYPES[type_]
    return msgspec.convert(data, type=cls)
