"""Maintenance: retention as settings, applied by a periodic procrastinate job
(``tfdeploy.maintenance`` in the ``maintenance`` queue, service/queue.py; every worker defers it,
the database keeps one job per tick, and one runs at a time).

What each setting removes (None, the default, keeps everything; docs/reliability.md,
"Retention"):

- ``TFDEPLOY_LOG_RETENTION_DAYS``: the terraform output of deploys that ENDED (succeeded,
  failed, cancelled, discarded) that long ago. The last line stays, as a marker saying how many
  lines went, so a replay's new lines and the ids of streams go on after it.
- ``TFDEPLOY_INPUT_RETENTION_DAYS``: the files and variables of deploys that ended that long ago.
  Such a deploy can no longer be replayed (409; migration 0011 refuses it in the replay's own
  transaction, so a replay racing the removal is either done first or refused).
- ``TFDEPLOY_IDEMPOTENCY_RETENTION_DAYS``: Idempotency-Key records that old (the same key then
  makes a new deploy).
- ``TFDEPLOY_STATE_RETENTION_DAYS``: state versions that old -- their content too, in PostgreSQL
  or S3 (every version of the object on a versioned bucket) -- except a workspace's latest one,
  and nothing of a workspace with an unfinished deploy (queued, running, retrying, or planned:
  it may need the version it started from or was planned against) or held by the CLI's lock.

Events are never deleted, nor emergency copies of states. Everything is done in short batches
(the deploys' and the state index's locks are held for milliseconds); a run stops after
``run_budget`` seconds and the next one goes on. The job also forgets request counters and
API processes gone quiet (service/api/limits.py).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import msgspec

from service.db import autocommit
from service.queries import q
from service.settings import RATE_WINDOW_SECONDS
from service.statestores import StateStore, StateStoreError

log = logging.getLogger("tfdeploy.maintenance")

DAY = 86400.0
BATCH = 500  # deploys, state versions or keys per transaction


class Report(msgspec.Struct, kw_only=True):
    """What one run removed."""

    logs: int = 0  # deploys whose log was removed
    inputs: int = 0  # deploys whose files and variables were removed
    idempotency_keys: int = 0
    state_versions: int = 0
    state_objects: int = 0  # S3 objects deleted (versions removed earlier included)
    state_objects_left: int = 0  # still to delete (S3 unreachable or not configured)
    finished: bool = True  # False: the run's time was up; the next run goes on

    def line(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in msgspec.structs.asdict(self).items())


class Maintenance:
    """One run of the maintenance job over ``services``' database (``run``); ``state_store``:
    the worker's, used to delete S3 objects (one is made from the settings if it is not S3)."""

    def __init__(
        self,
        services: Any,
        state_store: StateStore | None = None,
        *,
        batch: int = BATCH,
        run_budget: float = 300.0,
    ) -> None:
        self.services = services
        self.settings = services.settings
        self.state_store = state_store
        self.batch = batch
        self.run_budget = run_budget

    async def run(self) -> Report:
        settings = self.settings
        report = Report()
        deadline = time.monotonic() + self.run_budget

        def more_time() -> bool:
            if time.monotonic() < deadline:
                return True
            report.finished = False
            return False

        if settings.log_retention_days is not None:
            report.logs = await self._deploys("logs", settings.log_retention_days, more_time)
        if settings.input_retention_days is not None:
            report.inputs = await self._deploys("inputs", settings.input_retention_days, more_time)
        if settings.idempotency_retention_days is not None:
            report.idempotency_keys = await self._idempotency(
                settings.idempotency_retention_days, more_time
            )
        if settings.state_retention_days is not None:
            report.state_versions = await self._states(settings.state_retention_days, more_time)
        report.state_objects, report.state_objects_left = await self._state_objects(more_time)
        await self._limits()
        if report != Report():
            log.info("maintenance: removed %s", report.line())
        return report

    async def _deploys(self, kind: str, days: float, more_time: Any) -> int:
        done = 0
        while more_time():
            async with autocommit(self.services.pool) as conn:
                cur = await conn.execute(
                    q("prune_deploys"), {"kind": kind, "age": days * DAY, "batch": self.batch}
                )
                row = await cur.fetchone()
            assert row is not None
            done += int(row[0])
            if not row[1]:
                break
        return done

    async def _idempotency(self, days: float, more_time: Any) -> int:
        done = 0
        while more_time():
            async with autocommit(self.services.pool) as conn:
                cur = await conn.execute(
                    q("prune_idempotency"), {"age": days * DAY, "batch": self.batch}
                )
            done += cur.rowcount
            if cur.rowcount < self.batch:
                break
        return done

    async def _states(self, days: float, more_time: Any) -> int:
        done = 0
        while more_time():
            async with autocommit(self.services.pool) as conn:
                cur = await conn.execute(
                    q("prune_states"), {"age": days * DAY, "batch": self.batch}
                )
                rows = await cur.fetchall()
            done += len(rows)
            if len(rows) < self.batch:
                break
        return done

    async def _state_objects(self, more_time: Any) -> tuple[int, int]:
        """Delete the S3 objects of deleted state versions; (deleted, still to delete)."""
        deleted = 0
        store: Any = None
        while more_time():
            async with self.services.pool.connection() as conn:
                cur = await conn.execute(q("state_objects_to_delete"), {"batch": self.batch})
                rows = await cur.fetchall()
            if not rows:
                return deleted, 0
            if store is None:
                store = self._s3_store()
                if store is None:
                    return deleted, len(rows)
            failed = 0
            for location, workspace, version in rows:
                try:
                    await store.delete(workspace, version, location)
                except StateStoreError as exc:
                    log.warning("maintenance: cannot delete %s yet: %s", location, exc)
                    failed += 1
                    continue
                async with autocommit(self.services.pool) as conn:
                    await conn.execute(q("state_object_deleted"), {"location": location})
                deleted += 1
            if failed:  # the store is failing: try again at the next run
                return deleted, failed
            if len(rows) < self.batch:
                return deleted, 0
        return deleted, 0

    def _s3_store(self) -> Any:
        if self.state_store is not None and hasattr(self.state_store, "delete"):
            return self.state_store
        try:
            from service.statestores.s3 import S3StateStore

            return S3StateStore(self.settings, keyring=self.services.extras.get("keyring"))
        except StateStoreError as exc:
            log.warning("maintenance: S3 objects of deleted state versions are left: %s", exc)
            return None

    async def _limits(self) -> None:
        unit, _ = self.settings.rate_limit_rule
        async with autocommit(self.services.pool) as conn:
            await conn.execute(q("prune_request_counts"), {"window": RATE_WINDOW_SECONDS[unit]})
            await conn.execute(q("prune_api_processes"))
