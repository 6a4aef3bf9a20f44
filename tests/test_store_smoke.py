from uuid import uuid4

from service import store
from service.events import Requested, Started


async def test_append_and_read(pool):
    d = str(uuid4())
    async with pool.connection() as conn, conn.transaction():
        new = await store.append(
            conn, d, 0, [Requested(workspace="w", action="apply", max_attempts=3, owner="u", files={})], "user:u"
        )
    assert [e.version for e in new] == [1]
    async with pool.connection() as conn:
        view = await store.get_deploy(conn, d)
        assert view.status == "queued"
        async with conn.transaction():
            await store.append(conn, d, 1, [Started(attempt=1)], "worker:x")
        view = await store.get_deploy(conn, d)
        assert view.status == "deploying" and view.version == 2
