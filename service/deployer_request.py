"""What a run gets: the request of a run of an attempt (``RunRequest``) -- the deploy's files
and variables, its secrets opened, the workspace's latest state, the steps of the run the deploy
is at (``service.planning.run_for``), and for the apply of an approved plan the saved plan and the
lock file it was made with; the providers' setup for it (``service.providers``).
"""

from __future__ import annotations

from typing import Any

from service import lockfiles, planning, store
from service.lifecycle import DeployState, fold
from service.planning import PlanUnavailable
from service.providers import Providers
from service.queries import q
from service.runners.base import RunRequest, Step
from service.secrets import SecretBox
from service.settings import Settings
from service.statestores import index
from service.statestores.base import StateStore
from service.workspaces import key_of as workspace_key


async def run_request(
    deploy_id: str,
    attempt: int,
    *,
    steps: list[Step] | None = None,
    run: int | None = None,
    deploy: DeployState | None = None,
    pool: Any,
    box: SecretBox,
    state_store: StateStore,
    providers: Providers,
    settings: Settings,
) -> RunRequest:
    """The request of a run of ``attempt``: its inputs, the workspace's latest state, and
    ``steps``. Without ``steps``, the run the deploy is at (``deploy``, else read from its
    stream): a queued deploy's next run, a running one's current run (recovery) --
    ``planning.run_for``. The apply of an approved plan gets the saved plan and the lock
    file it was made with; if that plan is gone, or (for a run about to start) its base is
    no longer the workspace's latest state, PlanUnavailable."""
    kind = "run"
    if steps is None:
        if deploy is None:
            async with pool.connection() as conn:
                deploy = fold(e.event for e in await store.read_stream(conn, deploy_id))
        kind = deploy.next_step if deploy.phase == "queued" else deploy.step
        steps, composed = planning.run_for(deploy, kind)
        run = run or composed
    saved: planning.SavedPlan | None = None
    async with pool.connection() as conn:
        cur = await conn.execute(q("get_inputs"), {"deploy_id": deploy_id})
        files, variables, _ = await cur.fetchone()
        cur = await conn.execute(q("get_secrets"), {"deploy_id": deploy_id})
        row = await cur.fetchone()
        # The workspace's key (its id) keys its state, whatever name the stream gave.
        workspace = (deploy.workspace_id if deploy is not None else "") or await workspace_key(
            conn, deploy_id
        )
        latest = await index.latest(conn, workspace)
        kept_lock = await lockfiles.latest(conn, workspace)
        if kind == "apply" and deploy is not None:
            plan_id = deploy.plan.plan_id if deploy.plan is not None else ""
            try:
                saved = await planning.load_plan(conn, box.keyring, deploy_id, plan_id)
            except PlanUnavailable:
                if deploy.phase == "queued":
                    raise
                # Recovery concludes a run that already happened: it needs the run's
                # state and secrets, not the plan it applied.
                saved = None
            now = latest.version if latest is not None else None
            base = saved.base_state_version if saved is not None else now
            if deploy.phase == "queued" and now != base:
                raise PlanUnavailable(
                    "plan_stale",
                    f"the approved plan was made against state version {base}, but the "
                    f"workspace is at {now}: planning again",
                )
    if saved is not None:
        # The providers the plan was made with: its lock file wins over the deploy's own.
        files = {k: v for k, v in files.items() if k != lockfiles.LOCK_FILE_NAME}
        if saved.lock_file is not None:
            kept_lock = saved.lock_file.decode()
    secrets = box.decrypt(bytes(row[0])) if row else {}
    start_state = None
    if latest is not None:
        start_state = await state_store.get(workspace, latest.version, latest.location)
    return RunRequest(
        deploy_id=deploy_id,
        attempt=attempt,
        run=run or 1,
        workspace=workspace,
        steps=steps,
        # The files, the lock file to use and how providers install (a host-side fill of
        # the provider cache may happen here, before the run takes a place under the cap).
        **await providers.run_inputs(files, kept_lock),
        saved_plan=saved.plan if saved is not None else None,
        state=start_state,
        variables=variables,
        secrets=secrets,
        timeout=settings.deploy_timeout,
        max_output_bytes=settings.max_output_bytes,
        max_state_bytes=settings.max_state_bytes,
    )
