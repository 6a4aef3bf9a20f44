"""The composition root: everything a process needs, opened once from the settings."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from psycopg_pool import AsyncConnectionPool

from service.db import open_pool
from service.deploys import Deploys
from service.queue import Queue
from service.settings import Settings


@dataclass
class Services:
    settings: Settings
    database_url: str
    pool: AsyncConnectionPool[Any]
    queue: Queue
    deploys: Deploys
    extras: dict[str, Any] = field(default_factory=dict)

    async def close(self) -> None:
        hub = self.extras.pop("hub", None)  # the SSE streams' LISTEN connection (service.notify)
        if hub is not None:
            await hub.close()
        await self.queue.close()
        await self.pool.close()


async def open_services(
    settings: Settings, database_url: str, *, pool_size: int = 20, pool_wait: float = 30.0
) -> Services:
    from service.secrets import KeyRing, SecretBox, load_or_create_key

    key = load_or_create_key(settings)
    keyring = KeyRing(key)
    box = SecretBox(keyring)
    pool = await open_pool(database_url, max_size=pool_size, wait=pool_wait)
    queue = Queue(database_url)
    await queue.open()
    deploys = Deploys(
        pool,
        queue,
        encrypt=box.encrypt,
        digest_key=hashlib.sha256(b"tfdeploy-request-digest:" + key.encode()).digest(),
    )
    services = Services(settings, database_url, pool, queue, deploys)
    # One key ring per process: every store, the emergency copy and saved plans seal with it.
    services.extras["keyring"] = keyring
    services.extras["secret_box"] = box
    return services
