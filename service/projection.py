"""The read model of a deploy: what ``GET /deploys/{id}`` shows, folded from its events. Pure."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

import msgspec

from service.events import Action, Event, Requested
from service.lifecycle import ErrorInfo, fold, shown_attempt, status_of


class StoredEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event as the store holds it."""

    position: int
    deploy_id: str
    version: int
    type: str
    data: dict[str, object]
    recorded_at: datetime
    actor: str
    event: Event
    stream: str = "deploy"  # "deploy" | "workspace" (events.stream_kind)
    # The workspace's id: the stream's own for a workspace event; for a deploy event, its
    # deploy's workspace ("" when the store did not read it).
    workspace_id: str = ""


class DeployView(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    owner: str
    workspace: str
    action: Action
    status: str
    attempt: int
    max_attempts: int
    created_at: datetime
    updated_at: datetime
    version: int
    cancel_requested: bool = False
    state_version: int | None = None
    error: ErrorInfo | None = None
    workspace_id: str = ""  # the workspace's uuid (workspace names are per user)
    workspace_owner: str = ""


# The workspace (id, owner) a name of the previous version became (the migrated mapping,
# service.workspaces.LegacyNames): how a Requested event recorded without a workspace_id is read.
Legacy = Callable[[str], tuple[str, str] | None]


def _no_legacy(name: str) -> tuple[str, str] | None:
    return None


def view_of(records: Sequence[StoredEvent], legacy: Legacy = _no_legacy) -> DeployView:
    """Fold a deploy's whole stream (ordered by version) into its read model."""
    if not records:
        raise ValueError("a deploy needs at least one event")
    first, last = records[0], records[-1]
    return view_from(
        first.deploy_id,
        [r.event for r in records],
        created_at=first.recorded_at,
        updated_at=last.recorded_at,
        version=last.version,
        legacy=legacy,
    )


def workspace_of(events: Sequence[Event], legacy: Legacy = _no_legacy) -> tuple[str, str]:
    """The (id, owner) of the workspace a deploy's stream ran in: what its Requested event says,
    or, for one recorded before workspaces had owners, what ``legacy`` maps its name to;
    ("", "") when neither knows."""
    first = events[0] if events else None
    if not isinstance(first, Requested):
        return "", ""
    if first.workspace_id:
        return first.workspace_id, first.workspace_owner
    return legacy(first.workspace) or ("", "")


def view_from(
    deploy_id: str,
    events: Sequence[Event],
    *,
    created_at: datetime,
    updated_at: datetime,
    version: int,
    legacy: Legacy = _no_legacy,
) -> DeployView:
    """The read model of a deploy's whole stream given as its events (ordered by version) and
    the stream's first and last ``recorded_at`` and last version: what ``view_of`` computes,
    for callers that hold the events without a ``StoredEvent`` around each (the rebuild)."""
    state = fold(events)
    workspace_id, workspace_owner = workspace_of(events, legacy)
    return DeployView(
        id=deploy_id,
        owner=state.owner,
        workspace=state.workspace,
        action=state.action,
        status=status_of(state),
        attempt=shown_attempt(state),
        max_attempts=state.max_attempts,
        created_at=created_at,
        updated_at=updated_at,
        version=version,
        cancel_requested=state.cancel_requested,
        state_version=state.state_version,
        error=state.error,
        workspace_id=workspace_id,
        workspace_owner=workspace_owner,
    )
