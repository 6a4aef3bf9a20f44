"""``tfdeploy approve ID`` and ``tfdeploy discard ID``, run as real processes: recorded as
``admin:<the shell's user>``, like ``tfdeploy replay``."""

from __future__ import annotations

import asyncio
from pathlib import Path

from test_cli import tfdeploy
from test_plans_api import planned_deploy

from service import store
from service.services import open_services
from service.settings import from_env


def test_approve_and_discard_from_the_shell(database_url: str, tmp_path: Path) -> None:
    env = {"TFDEPLOY_DATABASE_URL": database_url, "TFDEPLOY_DATA_DIR": str(tmp_path)}

    async def make() -> tuple[str, str]:
        services = await open_services(from_env({}, data_dir=str(tmp_path)), database_url)
        try:
            return (
                await planned_deploy(services, workspace="one"),
                await planned_deploy(services, workspace="two"),
            )
        finally:
            await services.close()

    async def last_event(deploy_id: str) -> tuple[str, str, dict[str, object]]:
        services = await open_services(from_env({}, data_dir=str(tmp_path)), database_url)
        try:
            async with services.pool.connection() as conn:
                last = (await store.read_stream(conn, deploy_id))[-1]
            return last.type, last.actor, last.data
        finally:
            await services.close()

    first, second = asyncio.run(make())
    out = tfdeploy("approve", first, "--actor", "ops", env=env).stdout
    assert out.strip() == f"{first} queued (attempt 1 of 3)"
    assert asyncio.run(last_event(first)) == (
        "Approved", "admin:ops", {"attempt": 1, "by": "admin:ops", "rule": ""}
    )
    again = tfdeploy("approve", first, env=env, check=False)
    assert again.returncode == 1 and "cannot approve a deploy that is queued" in again.stderr

    out = tfdeploy("discard", second, "--actor", "ops", env=env).stdout
    assert out.strip() == f"{second} discarded (attempt 1 of 3)"
    assert asyncio.run(last_event(second)) == (
        "Discarded", "admin:ops", {"by": "admin:ops", "reason": "discarded"}
    )
    unknown = tfdeploy("discard", "00000000-0000-4000-8000-000000000000", env=env, check=False)
    assert unknown.returncode == 1 and "not found" in unknown.stderr
    malformed = tfdeploy("approve", "nope", env=env, check=False)
    assert malformed.returncode == 2 and "not a deploy id" in malformed.stderr
