"""The deploy event types: a msgspec tagged union, tag field ``type``.

Events are facts, append-only. Their ``data`` (everything but the tag) is what the event
store keeps in its ``data`` column; ``encode_data``/``decode`` convert both ways.
"""

from __future__ import annotations

from typing import Literal

import msgspec

Action = Literal["apply", "destroy"]
Actor = str  # "user:<name>", "admin:<name>", "worker:<id>", "system"


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


class Started(_Event, frozen=True, kw_only=True, tag="Started"):
    attempt: int
    runner: str = ""
    worker: str = ""


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
    | CancelRequested
    | Cancelled
)

EVENT_TYPES: dict[str, type[Event]] = {
    cls.__struct_config__.tag: cls  # type: ignore[misc]
    for cls in (
        Requested,
        Started,
        StatePersisted,
        Failed,
        Retried,
        Destroyed,
        StateRescued,
        Succeeded,
        CancelRequested,
        Cancelled,
    )
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
