"""The API alone (no worker) under uvicorn, for the bench scripts that need a separate server
process: ``_serve.py DATABASE_URL DATA_DIR PORT [PROFILE_OUT]``. SIGINT stops it.

With PROFILE_OUT, the process runs under cProfile and writes its stats there on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvicorn  # noqa: E402

from service.api.app import create_app  # noqa: E402
from service.cli import _run_api  # noqa: E402  (the event loop `tfdeploy serve` runs on)
from service.services import open_services  # noqa: E402
from service.settings import from_env  # noqa: E402


class Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[no-untyped-def]
        yield


# The per-user limits are settings like any other here (ApiProcess raises them, so that a bench
# measures throughput, not the limit; bench/ingest.py measures the limiter's own cost).
LIMITS = ("TFDEPLOY_RATE_LIMIT", "TFDEPLOY_MAX_STREAMS_PER_USER")


async def main(url: str, data_dir: str, port: int) -> None:
    settings = from_env(
        {k: v for k, v in os.environ.items() if k in LIMITS}, data_dir=data_dir, log_level="warning"
    )
    services = await open_services(settings, url)
    config = uvicorn.Config(
        create_app(services), host="127.0.0.1", port=port, log_level="warning", lifespan="on",
        timeout_graceful_shutdown=1, access_log=False, backlog=2048,
    )
    server = Server(config)
    loop = asyncio.get_running_loop()

    def stop() -> None:
        server.should_exit = True
        # Open SSE streams would hold the graceful shutdown: close the hub's streams.
        with contextlib.suppress(Exception):
            from service.cli import _close_event_streams

            _close_event_streams()

    loop.add_signal_handler(signal.SIGINT, stop)
    loop.add_signal_handler(signal.SIGTERM, stop)
    try:
        await server.serve()
    finally:
        await services.close()


if __name__ == "__main__":
    url, data_dir, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if len(sys.argv) > 4:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
        try:
            _run_api(main(url, data_dir, port))
        finally:
            prof.disable()
            prof.dump_stats(sys.argv[4])
    else:
        _run_api(main(url, data_dir, port))
