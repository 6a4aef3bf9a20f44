"""Serving: ``tfdeploy up`` (API and worker in one process), ``serve`` (the API alone; with
``--workers N`` from N forked processes on one socket) and ``worker``. One handler of SIGINT and
SIGTERM stops the API and the worker together; an API process answers ``503`` at once while
PostgreSQL is away and waits at most ``API_POOL_WAIT`` for a busy pool's connection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

from service.cli.database import Database, database, load_keyring, migrate_all, services_for
from service.settings import Settings

log = logging.getLogger("tfdeploy")


def _server(app: Any, settings: Settings, host: str, port: int) -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        # Signals are ours: one handler stops the API and the worker together, and the
        # embedded PostgreSQL after them.
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    from service.api.limits import connection_limit

    config = uvicorn.Config(
        app, host=host, port=port, log_level=settings.log_level, lifespan="on",
        timeout_graceful_shutdown=5, access_log=settings.log_level == "debug",
        # Connections (an open event stream is one) and requests at once, past which uvicorn
        # answers 503: bounded by the process's file descriptors (service.api.limits).
        limit_concurrency=connection_limit(),
    )
    return Server(config)


async def _run(
    settings: Settings, db: Database, *, api: bool, worker: bool, host: str, port: int,
    sock: Any = None,
) -> None:
    url = db.url
    if api and worker:
        for line in migrate_all(settings, db.owner_url, load_keyring(settings)):
            print(line, file=sys.stderr)
    # An API request waits API_POOL_WAIT for a connection, then answers 503; a worker waits
    # psycopg_pool's default 30 s (its outcome appends retry on their own).
    async with services_for(settings, url, pool_wait=API_POOL_WAIT if api else 30.0) as services:
        if sock is None:  # not from each of `serve --workers`' processes: workers say it too
            await _warn_if_privileged(services)
        if api and worker:
            await _ensure_admin_token(services, settings)
        tasks: list[asyncio.Task[Any]] = []
        stoppers: list[Any] = []
        server = None
        wk = None
        if api:
            from service.api.app import create_app

            server = _server(create_app(services), settings, host, port)
            sockets = [sock] if sock is not None else None  # --workers: the parent's socket
            tasks.append(asyncio.create_task(server.serve(sockets=sockets), name="api"))
            stoppers.append(lambda: setattr(server, "should_exit", True))
            stoppers.append(lambda: _close_event_streams(services))
            print(f"tfdeploy API on http://{host}:{port}/", file=sys.stderr)
        if worker:
            from service.worker import Worker

            wk = Worker(services, local_fallback=api)  # only `up` may fall back to local
            tasks.append(asyncio.create_task(wk.run(), name="worker"))
            stoppers.append(wk.stop)
            print(f"tfdeploy worker {wk.name} (runner {wk.runner.name})", file=sys.stderr)

        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()

        signals = 0

        def request_stop() -> None:
            # 1st signal: graceful stop. 2nd: a worker interrupts its running deploys (state
            # kept, handed over; Worker.stop); an API alone stops waiting. 3rd: stop waiting.
            nonlocal signals
            signals += 1
            if signals >= (3 if wk is not None else 2):
                for t in tasks:
                    t.cancel()
            stop_requested.set()
            for stop in stoppers:
                stop()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, request_stop)
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if not stop_requested.is_set():
                for t in done:
                    if t.exception():
                        log.error("%s stopped: %r", t.get_name(), t.exception())
                request_stop()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            if wk is not None:
                await wk.close()


# While PostgreSQL is away, an API request waits this long for a connection, then answers 503
# (psycopg_pool's default is 30 s). The pool's reconnect window is service.db's.
API_POOL_WAIT = 5.0


def _close_event_streams(services: Any = None) -> None:
    """End open SSE streams at once on shutdown, so their clients reconnect elsewhere instead
    of holding the process for uvicorn's grace period."""
    from sse_starlette.sse import AppStatus

    AppStatus.should_exit = True  # sse-starlette ends every stream within its 0.5 s poll
    hub = services.extras.get("hub") if services is not None else None
    if hub is not None:
        hub.shutdown()  # ours end now, each with a complete response


async def _warn_if_privileged(services: Any) -> None:
    """Say so when the service connects as a superuser or as the tables' owner: then nothing
    but the triggers keeps the event table append-only, and a superuser can disable those."""
    async with services.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT r.rolsuper, pg_has_role(c.relowner, 'USAGE') FROM pg_roles r, pg_class c "
            "WHERE r.rolname = current_user AND c.oid = to_regclass('public.events')"
        )
        row = await cur.fetchone()
    if row and (row[0] or row[1]):
        log.warning(
            "the service connects as %s: the event table is protected by its triggers only; "
            "connect as the service role (docs/operations.md, \"Database roles\")",
            "a superuser" if row[0] else "the owner of the tables",
        )


async def _ensure_admin_token(services: Any, settings: Settings) -> None:
    """On a fresh embedded install, make a first admin user and token so the API can be used at
    once."""
    from service.auth import create_token, list_users

    async with services.pool.connection() as conn:
        if await list_users(conn):
            return
        token = await create_token(conn, "admin", admin=True, label="first admin (tfdeploy up)")
    path = settings.data_path / "admin.token"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    print(f"first admin token (also in {path}):\n  {token}", file=sys.stderr)


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    with database(settings) as db:
        asyncio.run(_run(settings, db, api=True, worker=True, host=args.host, port=args.port))
    return 0


def _run_api(main: Any) -> None:
    """Run an API process's event loop: uvloop's when installed (a cheaper loop under many
    connections: docs/benchmarks.md, ingest and fan-out), else asyncio's. Workers keep asyncio's:
    they spend their time in terraform, not in the loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    with database(settings) as db:
        if args.workers > 1:
            return _serve_processes(settings, db, args.host, args.port, args.workers)
        _run_api(_run(settings, db, api=True, worker=False, host=args.host, port=args.port))
    return 0


def _serve_processes(settings: Settings, db: Database, host: str, port: int, workers: int) -> int:
    """``serve --workers N``: one listening socket, N forked processes each serving the API on
    it with its own event loop, pool and LISTEN hub (a process uses one core at most). SIGINT
    or SIGTERM to this process stops them all; so does any of them exiting."""
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    print(f"tfdeploy API: {workers} processes", file=sys.stderr)
    children: set[int] = set()
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:  # a worker process: its own process group, so only the parent signals it
            code = 1
            try:
                os.setpgid(0, 0)
                _run_api(
                    _run(settings, db, api=True, worker=False, host=host, port=port, sock=sock)
                )
                code = 0
            finally:
                os._exit(code)
        children.add(pid)
    sock.close()

    stopping: list[int] = []  # the signals given to the children so far

    def stop_all(_signum: int = signal.SIGTERM, _frame: Any = None) -> None:
        # Once a graceful stop, a second signal (a second Ctrl-C) as a second: cancel.
        if len(stopping) >= 2:
            return
        stopping.append(signal.SIGTERM)
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGINT, stop_all)
    signal.signal(signal.SIGTERM, stop_all)
    status = 0
    while children:
        pid, wstatus = os.wait()
        children.discard(pid)
        if os.waitstatus_to_exitcode(wstatus) != 0:
            status = 1
        if not stopping:  # one exited on its own: stop the others
            stop_all()
    return status


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    with database(settings) as db:
        asyncio.run(_run(settings, db, api=False, worker=True, host="", port=0))
    return 0
