"""The rules of terraform's ``http`` state backend, pure: what the CLI's requests may be refused
(``BackendError`` and its kinds, each with the status the backend answers), terraform's
``LockInfo``, who holds a workspace (its CLI lock, or the deploy that holds it) as terraform reads
it back, and the decisions -- ``decide_lock``, ``decide_unlock``, ``decide_write`` -- over what a
transaction read. ``service.cli_backend`` runs them in its transactions (docs/terraform-cli.md).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import msgspec

LOCK_BODY_MAX = 64 * 1024  # a LockInfo is a few hundred bytes
LOCK_ID_MAX = 256
# RFC 3339, what Go's time.Time reads back (terraform parses the holder's LockInfo).
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$")
_LOCK_FIELDS = ("ID", "Operation", "Info", "Who", "Version", "Created", "Path")


# ---------------------------------------------------------------- what a request may be refused


class BackendError(Exception):
    """A refusal, with the status the http backend answers and, where terraform reads one, the
    holder's LockInfo for the body."""

    status_code = 409

    def __init__(self, detail: str, lock_info: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.lock_info = lock_info


class BadLockInfo(BackendError):
    """A LOCK or UNLOCK body that is not terraform's LockInfo."""

    status_code = 400


class Locked(BackendError):
    """Someone else holds the workspace (423, the holder's LockInfo: terraform's -lock-timeout
    waits and asks again)."""

    status_code = 423


class LockConflict(BackendError):
    """An UNLOCK of a lock one does not hold, or a write under a lock that is not held (409)."""


class StateRefused(BackendError):
    """A state that is not the next of the workspace's (another lineage, an older or repeated
    serial with other content): 409."""


class ForceUnlockDenied(BackendError):
    """A force-unlock (UNLOCK with no LockInfo) by someone who is not an admin: 403."""

    status_code = 403


# ---------------------------------------------------------------- terraform's LockInfo (pure)


class LockInfo(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """terraform's statemgr.LockInfo, as its http client sends it with LOCK and UNLOCK."""

    ID: str
    Operation: str = ""
    Info: str = ""
    Who: str = ""
    Version: str = ""
    Created: str = ""
    Path: str = ""

    def to_json(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in _LOCK_FIELDS}


_lock_decoder = msgspec.json.Decoder(LockInfo)


def parse_lock_info(body: bytes, now: datetime | None = None) -> LockInfo | None:
    """The LockInfo of a LOCK or UNLOCK body; None for an empty body (``terraform force-unlock``
    sends none). BadLockInfo for anything else that is not one: not a JSON object of strings,
    no ID, an ID that is too long or not printable, a ``Created`` Go could not read back. A
    missing ``Created`` is set to ``now``, so the info given back to other clients always
    parses."""
    if not body.strip():
        return None
    try:
        info = _lock_decoder.decode(body)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise BadLockInfo(f"the body is not terraform's LockInfo: {exc}") from None
    lock_id = info.ID.strip()
    if not lock_id:
        raise BadLockInfo("the LockInfo has no ID")
    if len(lock_id) > LOCK_ID_MAX or not lock_id.isprintable():
        raise BadLockInfo(f"a lock ID is 1-{LOCK_ID_MAX} printable characters")
    if any("\x00" in getattr(info, name) for name in _LOCK_FIELDS):
        raise BadLockInfo("the LockInfo holds a NUL character")
    created = info.Created
    if not created:
        created = rfc3339(now or datetime.now(UTC))
    elif _RFC3339.match(created) is None:
        raise BadLockInfo("the LockInfo's Created is not an RFC 3339 time")
    return msgspec.structs.replace(info, ID=lock_id, Created=created)


def rfc3339(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


# ---------------------------------------------------------------- who holds a workspace


class DeployHolder(msgspec.Struct, frozen=True, kw_only=True):
    """A deploy that holds its workspace: running (its job taken) or planned."""

    id: str
    owner: str
    action: str
    status: str
    created_at: datetime

    @property
    def lock_id(self) -> str:
        return f"deploy:{self.id}"


class CliLock(msgspec.Struct, frozen=True, kw_only=True):
    """The CLI's lock on a workspace: the LockInfo it was taken with, and by whom."""

    lock_id: str
    info: dict[str, Any]
    holder: str  # a user name
    created_at: datetime


def deploy_lock_info(holder: DeployHolder, ref: str) -> dict[str, str]:
    """A deploy's hold as terraform's LockInfo: its ID names the deploy (terraform shows it:
    "already locked: ID=deploy:<id>"), the rest says what it is and how to end it."""
    if holder.status == "planned":
        operation = f"tfdeploy {holder.action}: plan waiting for approval"
        info = (
            f"deploy {holder.id} of {ref} waits for approval: approve or discard it "
            f"(POST /deploys/{holder.id}/approve or /discard) to release the workspace"
        )
    else:
        operation = f"tfdeploy {holder.action}"
        info = (
            f"deploy {holder.id} of {ref} is running; the workspace is free when it ends "
            f"(POST /deploys/{holder.id}/cancel stops it)"
        )
    return {
        "ID": holder.lock_id,
        "Operation": operation,
        "Info": info,
        "Who": f"{holder.owner} (tfdeploy deploy)",
        "Version": "",
        "Created": rfc3339(holder.created_at),
        "Path": ref,
    }


def cli_lock_info(lock: CliLock) -> dict[str, str]:
    """A CLI's lock as terraform reads it back: the LockInfo it sent (always with its ID)."""
    info = {name: str(lock.info.get(name) or "") for name in _LOCK_FIELDS}
    info["ID"] = lock.lock_id
    if not info["Created"]:
        info["Created"] = rfc3339(lock.created_at)
    return info


# ---------------------------------------------------------------- the decisions (pure)


class Granted(msgspec.Struct, frozen=True):
    """Take the lock (write the row and StateLocked)."""


class Repeated(msgspec.Struct, frozen=True):
    """The holder asked again with its own ID (a retried LOCK whose answer was lost): 200, nothing
    written."""


def decide_lock(
    cli: CliLock | None, deploy: DeployHolder | None, lock_id: str, user: str, ref: str
) -> Granted | Repeated:
    """LOCK ``lock_id`` by ``user``; raises Locked (423 with the holder's info) if another holds
    the workspace."""
    if cli is not None:
        if cli.lock_id == lock_id and cli.holder == user:
            return Repeated()
        raise Locked(f"the workspace is locked by {cli.holder}'s terraform", cli_lock_info(cli))
    if deploy is not None:
        raise Locked(
            f"deploy {deploy.id} holds the workspace ({deploy.status})", deploy_lock_info(deploy, ref)
        )
    return Granted()


class Release(msgspec.Struct, frozen=True):
    """Delete the CLI's lock and record the unlock (``force``: an admin's, without its ID)."""

    lock: CliLock
    force: bool = False


class NothingHeld(msgspec.Struct, frozen=True):
    """No CLI lock to release: 200 and nothing written (an UNLOCK retried after its answer was
    lost finds nothing left)."""


def decide_unlock(
    cli: CliLock | None,
    deploy: DeployHolder | None,
    lock_id: str | None,
    user: str,
    admin: bool,
    ref: str,
) -> Release | NothingHeld:
    """UNLOCK by ``user`` with ``lock_id`` (None: a force-unlock, terraform's empty body).

    - force-unlock: admins only (ForceUnlockDenied); it removes the CLI's lock, whoever holds it;
      a deploy's hold is not the CLI's to remove (LockConflict: cancel or discard the deploy);
    - with an ID: the holder's own lock (same ID, same user) is released; anyone else's is a
      LockConflict (409) with the holder's info."""
    if lock_id is None:
        if not admin:
            raise ForceUnlockDenied(
                "only an admin may force-unlock; the holder unlocks with its lock's ID"
            )
        if cli is not None:
            return Release(cli, force=True)
        if deploy is not None:
            raise LockConflict(
                f"deploy {deploy.id} holds the workspace, not a CLI: cancel the deploy "
                "(or discard its plan) to release it",
                deploy_lock_info(deploy, ref),
            )
        return NothingHeld()
    if cli is not None:
        if cli.lock_id == lock_id and cli.holder == user:
            return Release(cli)
        raise LockConflict(
            f"the lock is held under another ID, by {cli.holder}'s terraform", cli_lock_info(cli)
        )
    if deploy is not None and lock_id == deploy.lock_id:
        raise LockConflict(
            f"deploy {deploy.id} holds the workspace: cancel the deploy (or discard its plan) "
            "to release it",
            deploy_lock_info(deploy, ref),
        )
    return NothingHeld()


class StateMeta(msgspec.Struct, frozen=True):
    serial: int
    lineage: str
    sha256: str


class Accept(msgspec.Struct, frozen=True):
    """A new state version."""


class Unchanged(msgspec.Struct, frozen=True):
    """The latest version already is this content (a write retried after its answer was
    lost): 200, nothing written."""


def decide_write(
    cli: CliLock | None,
    deploy: DeployHolder | None,
    lock_id: str,
    user: str,
    latest: StateMeta | None,
    new: StateMeta,
    ref: str,
) -> Accept | Unchanged:
    """A state write by ``user`` under ``lock_id`` ("" when its terraform holds no lock):

    - while a deploy holds the workspace: Locked (423), whatever the write says;
    - while a CLI lock is held: only under that lock (its ID, its user), else Locked (423);
    - naming a lock that is not held (force-unlocked since?): LockConflict (409) -- the writer's
      view of the state may be stale;
    - the workspace's latest state decides the content: another lineage, an older serial, or
      the same serial with other content is StateRefused (409); the very same content is
      Unchanged."""
    if deploy is not None:
        raise Locked(
            f"deploy {deploy.id} holds the workspace ({deploy.status}): the state cannot be "
            "written until it ends",
            deploy_lock_info(deploy, ref),
        )
    if cli is not None:
        if cli.lock_id != lock_id or cli.holder != user:
            raise Locked(
                f"the workspace is locked by {cli.holder}'s terraform: a write needs its lock "
                "(?ID=)",
                cli_lock_info(cli),
            )
    elif lock_id:
        raise LockConflict(
            f"the lock {lock_id} this write names is not held (released or force-unlocked): "
            "run terraform again"
        )
    if latest is None:
        return Accept()
    if new.lineage != latest.lineage:
        raise StateRefused(
            f"the state's lineage {new.lineage!r} is not the workspace's ({latest.lineage!r}): "
            "it is another state; write it to a new workspace"
        )
    if new.serial < latest.serial:
        raise StateRefused(
            f"the state's serial {new.serial} is older than the workspace's latest "
            f"({latest.serial}): refresh (terraform plan/apply reads the latest) and try again"
        )
    if new.serial == latest.serial:
        if new.sha256 == latest.sha256:
            return Unchanged()
        raise StateRefused(
            f"the workspace already has serial {new.serial} with other content: a changed "
            "state needs a higher serial"
        )
    return Accept()
