"""The deploy command handler: the shell around the pure lifecycle.

Loads a deploy's stream, asks ``lifecycle.decide`` what follows a command, appends the answer
with the expected version, and, in the same transaction, performs what those events require:
queue the next run (``Requested``, ``Retried``) and forget the secrets once the deploy ended.
A request to a name its owner has not used yet claims the workspace in the same transaction.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence
from typing import Any
from uuid import UUID, uuid4

import msgspec
from psycopg.errors import UniqueViolation
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from service import store, workspaces
from service.db import autocommit
from service.events import (
    Approved,
    Cancelled,
    Discarded,
    Event,
    Failed,
    Requested,
    Retried,
    Succeeded,
)
from service.lifecycle import (
    INITIAL,
    Command,
    DeployState,
    RequestDeploy,
    decide,
    fold,
)
from service.projection import DeployView, StoredEvent, view_of
from service.queries import q
from service.queue import Queue
from service.workspaces import Workspace, WorkspaceNotFound, parse_ref

CONFLICT_RETRIES = 8


class NotFound(Exception):
    pass


class IdempotencyMismatch(Exception):
    """The same Idempotency-Key came with a different request."""


class NewDeploy(msgspec.Struct, frozen=True, kw_only=True):
    """A validated deploy request, ready to record. ``workspace`` is a ref: the requester's own
    name, or ``owner:name`` (service.workspaces)."""

    workspace: str
    action: str
    files: dict[str, str]
    variables: dict[str, str] = {}
    secrets: dict[str, str] = {}
    max_attempts: int
    auto_approve: bool = True


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ends_deploy(event: Event) -> bool:
    return isinstance(event, Succeeded | Cancelled | Discarded) or (
        isinstance(event, Failed) and event.final
    )


class Deploys:
    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        queue: Queue,
        *,
        encrypt: Any,
        digest_key: bytes,
    ) -> None:
        self.pool = pool
        self.queue = queue
        self._encrypt = encrypt  # callable: dict[str, str] -> bytes
        self._digest_key = digest_key
        self.workspace_names = workspaces.Names()

    # ------------------------------------------------------------ request

    def request_digest(self, new: NewDeploy) -> str:
        """Identifies a request for Idempotency-Key checks. Keyed (HMAC), so the stored digest
        reveals nothing about the secrets in it."""
        canonical = msgspec.json.encode(msgspec.to_builtins(new), order="sorted")
        return hmac.new(self._digest_key, canonical, hashlib.sha256).hexdigest()

    async def request(
        self,
        new: NewDeploy,
        *,
        owner: str,
        actor: str,
        idempotency_key: str | None = None,
        workspace: Workspace | None = None,
    ) -> tuple[DeployView, bool]:
        """Record a new deploy and queue its first run, in one transaction.

        ``workspace``: the workspace ``new.workspace`` names, when the caller resolved it (and
        checked that ``owner`` may deploy to it); None for the requester's own name, which is
        claimed for them, in the same transaction, if they have not used it yet.

        Returns (deploy, created): ``created`` is False when an Idempotency-Key matched.
        """
        digest = self.request_digest(new) if idempotency_key else ""
        for _ in range(3):
            try:
                return await self._request_once(new, owner, actor, idempotency_key, digest, workspace)
            except UniqueViolation:
                # A concurrent request with the same key won (answer with its deploy), or one of
                # the same owner claimed the same new name (deploy to the workspace it made).
                continue
        raise RuntimeError("idempotency key or workspace race did not settle")  # pragma: no cover

    async def _request_once(
        self,
        new: NewDeploy,
        owner: str,
        actor: str,
        key: str | None,
        digest: str,
        workspace: Workspace | None,
    ) -> tuple[DeployView, bool]:
        # Autocommit: the Idempotency-Key lookup needs no transaction of its own (a twin
        # request racing this one collides on the key's primary key), and the writes are one
        # query, which PostgreSQL runs as one transaction.
        async with autocommit(self.pool) as conn:
            return await self._record(conn, new, owner, actor, key, digest, workspace)

    async def _record(
        self,
        conn: Any,
        new: NewDeploy,
        owner: str,
        actor: str,
        key: str | None,
        digest: str,
        workspace: Workspace | None,
    ) -> tuple[DeployView, bool]:
        if key:
            cur = await conn.execute(q("get_idempotency"), {"owner": owner, "key": key})
            row = await cur.fetchone()
            if row:
                if row[0] != digest:
                    raise IdempotencyMismatch(
                        "this Idempotency-Key was used with a different request"
                    )
                view = await store.get_deploy(conn, row[1])
                assert view is not None
                return view, False
        deploy_id = str(uuid4())
        claim: list[tuple[str, dict[str, Any]]] = []
        if workspace is None:
            ws_owner, name = parse_ref(new.workspace, owner)
            if ws_owner != owner:
                raise WorkspaceNotFound()  # another user's: the caller resolves those
            workspace = await self.workspace_names.find(conn, owner, name)
            if workspace is None:
                workspace = Workspace(id=str(uuid4()), owner=owner, name=name)
                claim = workspaces.claim(workspace, deploy_id, actor)
        files = {name: _sha256(content.encode()) for name, content in sorted(new.files.items())}
        command = RequestDeploy(
            workspace=workspace.name,
            action=new.action,  # type: ignore[arg-type]
            max_attempts=new.max_attempts,
            owner=owner,
            files=files,
            variables=dict(new.variables),
            secret_names=sorted(new.secrets),
            auto_approve=new.auto_approve,
        )
        # The workspace is the shell's fact, not a decision: the Requested event names it.
        events = [
            msgspec.structs.replace(e, workspace_id=workspace.id, workspace_owner=workspace.owner)
            if isinstance(e, Requested)
            else e
            for e in decide(command, INITIAL)
        ]
        writes = claim + self._reactions(deploy_id, DeployState(), events, workspace.id)  # the job
        writes.append(
            (
                "insert_inputs",
                {
                    "deploy_id": deploy_id,
                    "files": Jsonb(new.files),
                    "variables": Jsonb(new.variables),
                    "sha256": _sha256(msgspec.json.encode(new.files, order="sorted")),
                },
            )
        )
        if new.secrets:
            writes.append(
                (
                    "insert_secrets",
                    {"deploy_id": deploy_id, "ciphertext": self._encrypt(dict(new.secrets))},
                )
            )
        if key:
            writes.append(
                (
                    "insert_idempotency",
                    {"owner": owner, "key": key, "request_sha256": digest, "deploy_id": deploy_id},
                )
            )
        # The job, the inputs, the secrets, the key and, last, the append go to PostgreSQL
        # as ONE query, which in autocommit mode is one transaction: all or nothing, one
        # round trip, and the global append lock is held only while PostgreSQL appends and
        # commits.
        stored = await store.append_and_commit(
            conn, deploy_id, 0, events, actor, prior=[], before=writes
        )
        if claim:
            self.workspace_names.remember(workspace)
        return view_of(stored), True

    # ------------------------------------------------------------ commands

    async def execute(
        self,
        deploy_id: str | UUID,
        command: Command,
        actor: str,
        *,
        also: Sequence[tuple[str, dict[str, Any]]] = (),
        check: Callable[[Sequence[StoredEvent], DeployState], None] | None = None,
    ) -> tuple[list[StoredEvent], DeployView]:
        """Decide and append what follows ``command``; retried on a version conflict.

        ``also``: further named statements for the append's transaction (an Idempotency-Key of
        the command). ``check``: called with the stream read in that transaction and its state
        before deciding; it raises IllegalTransition to refuse (a plan's TTL: only a plan that
        is still the expired one is discarded).

        Raises NotFound, or lifecycle.IllegalTransition when the command is not allowed now.
        """
        deploy_id = str(deploy_id)
        for _ in range(CONFLICT_RETRIES):
            try:
                # One transaction, committed by append_and_commit (rolled back by the pool's
                # connection context on any error).
                async with self.pool.connection() as conn:
                    prior = await store.read_stream(conn, deploy_id)
                    if not prior:
                        raise NotFound(deploy_id)
                    state = fold(e.event for e in prior)
                    if check is not None:
                        check(prior, state)
                    events = decide(command, state)
                    workspace_key = await workspaces.key_of(conn, deploy_id, prior)
                    # What the events require, then the append and the COMMIT, in one round
                    # trip: the append lock is held only while PostgreSQL appends and commits.
                    new = await store.append_and_commit(
                        conn,
                        deploy_id,
                        prior[-1].version,
                        events,
                        actor,
                        prior=prior,
                        before=[
                            *self._reactions(deploy_id, state, events, workspace_key),
                            *also,
                        ],
                    )
                    stream = [*prior, *new]
                    return new, view_of(stream, await store.legacy_for(conn, [e.event for e in stream]))
            except store.VersionConflict:
                continue
        raise store.VersionConflict(deploy_id, -1, -1)

    def _reactions(
        self, deploy_id: str, before: DeployState, events: Sequence[Event], workspace_key: str
    ) -> list[tuple[str, dict[str, Any]]]:
        """What the new events require, as statements for their transaction (which rolls back
        with them if the append that follows conflicts): the next run's job (on the lock of the
        workspace whose key is ``workspace_key``), and forgetting the secrets when the deploy
        ends; an approved plan's apply is queued like an attempt; a deploy that ends forgets its
        saved plans too (they hold variable values)."""
        holds = fold(events, before).action != "plan"  # a speculative plan holds no workspace
        out: list[tuple[str, dict[str, Any]]] = []
        for event in events:
            if isinstance(event, Requested):
                out.append(self._defer_run(deploy_id, 1, workspace_key, holds=holds))
            elif isinstance(event, Retried):
                out.append(
                    self._defer_run(
                        deploy_id, event.attempt, workspace_key, event.delay_seconds, holds=holds
                    )
                )
            elif isinstance(event, Approved):
                out.append(self._defer_run(deploy_id, event.attempt, workspace_key, holds=holds))
            if ends_deploy(event):
                out.append(("delete_secrets", {"deploy_id": deploy_id}))
                out.append(("delete_saved_plans", {"deploy_id": deploy_id}))
        return out

    def _defer_run(
        self,
        deploy_id: str,
        attempt: int,
        workspace: str,
        delay: float = 0.0,
        *,
        holds: bool = True,
    ) -> tuple[str, dict[str, Any]]:
        """procrastinate's ``run_deploy`` job (``Queue.run_job``), inserted by procrastinate's
        own SQL function (``defer_job``) so that it travels with the append. ``workspace`` is
        the workspace's key (its id)."""
        job = self.queue.run_job(
            deploy_id=deploy_id,
            attempt=attempt,
            workspace=workspace,
            delay=delay,
            holds_workspace=holds,
        )
        return (
            "defer_job",
            {
                "queue_name": job.queue,
                "task_name": job.task_name,
                "priority": job.priority,
                "lock": job.lock,
                "queueing_lock": job.queueing_lock,
                "args": Jsonb(job.task_kwargs),
                "scheduled_at": job.scheduled_at,
            },
        )

    async def requeue(self, deploy_id: str) -> bool:
        """Queue a job again for a queued deploy that lost its own (recovery: every deploy
        ends). No event: nothing ran and nothing is spent. False if the deploy is not queued."""
        async with self.pool.connection() as conn:
            stream = await store.read_stream(conn, deploy_id)
            state = fold(e.event for e in stream)
            if not stream or state.phase != "queued":
                return False
            view = await store.get_deploy(conn, deploy_id)
            key = view.workspace_id if view is not None and view.workspace_id else state.workspace
            name, params = self._defer_run(
                deploy_id, state.next_attempt, key, holds=not state.speculative
            )
            async with conn.transaction():
                await conn.execute(q(name), params)
        return True

    # ------------------------------------------------------------ reads

    async def get(self, deploy_id: str | UUID) -> DeployView | None:
        async with self.pool.connection() as conn:
            return await store.get_deploy(conn, deploy_id)

    async def stream(self, deploy_id: str | UUID) -> list[StoredEvent]:
        async with self.pool.connection() as conn:
            return await store.read_stream(conn, deploy_id)
