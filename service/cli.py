"""The ``tfdeploy`` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from service.runners.base import RunnerError
from service.settings import Settings, SettingsError, from_env

log = logging.getLogger("tfdeploy")


# ---------------------------------------------------------------- database


@contextlib.contextmanager
def database(settings: Settings, *, quiet: bool = False) -> Iterator[str]:
    """The database URL: TFDEPLOY_DATABASE_URL, or the embedded cluster under the data dir
    (started here if it is not running, and then stopped here at the end)."""
    if settings.database_url:
        yield settings.database_url
        return
    from service.embedded import EmbeddedPostgres

    pg = EmbeddedPostgres(settings.data_path / "postgres")
    url = pg.start()
    if not quiet:
        print(f"embedded PostgreSQL at {url} (data in {pg.pgdata})", file=sys.stderr)
    try:
        yield url
    finally:
        if pg._started_here:
            pg.stop()


@contextlib.asynccontextmanager
async def services_for(settings: Settings, url: str, **kw: Any) -> AsyncIterator[Any]:
    from service.services import open_services

    services = await open_services(settings, url, **kw)
    try:
        yield services
    finally:
        await services.close()


# ---------------------------------------------------------------- serving


def _server(app: Any, settings: Settings, host: str, port: int) -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        # Signals are ours: one handler stops the API and the worker together, and the
        # embedded PostgreSQL after them.
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    config = uvicorn.Config(
        app, host=host, port=port, log_level=settings.log_level, lifespan="on",
        timeout_graceful_shutdown=5, access_log=settings.log_level == "debug",
    )
    return Server(config)


async def _run(
    settings: Settings, url: str, *, api: bool, worker: bool, host: str, port: int, sock: Any = None
) -> None:
    from service.migrate import migrate

    if api and worker:
        applied = migrate(url)
        if applied:
            print(f"migrated: {', '.join(applied)}", file=sys.stderr)
    # An API request waits API_POOL_WAIT for a connection, then answers 503; a worker waits
    # psycopg_pool's default 30 s (its outcome appends retry on their own).
    async with services_for(settings, url, pool_wait=API_POOL_WAIT if api else 30.0) as services:
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


async def _ensure_admin_token(services: Any, settings: Settings) -> None:
    """On a fresh embedded install, make a first admin token so the API can be used at once."""
    from service.auth import create_token, list_tokens

    async with services.pool.connection() as conn:
        if await list_tokens(conn):
            return
        token = await create_token(conn, "admin", admin=True)
    path = settings.data_path / "admin.token"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    print(f"first admin token (also in {path}):\n  {token}", file=sys.stderr)


# ---------------------------------------------------------------- commands


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    with database(settings) as url:
        asyncio.run(_run(settings, url, api=True, worker=True, host=args.host, port=args.port))
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
    with database(settings) as url:
        if args.workers > 1:
            return _serve_processes(settings, url, args.host, args.port, args.workers)
        _run_api(_run(settings, url, api=True, worker=False, host=args.host, port=args.port))
    return 0


def _serve_processes(settings: Settings, url: str, host: str, port: int, workers: int) -> int:
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
                    _run(settings, url, api=True, worker=False, host=host, port=port, sock=sock)
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
    with database(settings) as url:
        asyncio.run(_run(settings, url, api=False, worker=True, host="", port=0))
    return 0


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from service.migrate import migrate

    with database(settings) as url:
        applied = migrate(url)
    print("applied: " + ", ".join(applied) if applied else "up to date")
    return 0


def cmd_token(settings: Settings, args: argparse.Namespace) -> int:
    from service import auth

    async def go(url: str) -> int:
        import psycopg

        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            if args.token_cmd == "create":
                print(await auth.create_token(conn, args.name, admin=args.admin))
            elif args.token_cmd == "list":
                for t in await auth.list_tokens(conn):
                    state = f"revoked {t['revoked_at']:%Y-%m-%d %H:%M}" if t["revoked_at"] else "active"
                    role = "admin" if t["admin"] else "user"
                    print(f"{t['id']:>5}  {t['name']:<24} {role:<6} {t['created_at']:%Y-%m-%d %H:%M}  {state}")
            else:
                n = await auth.revoke_token(conn, args.ref)
                if not n:
                    print(f"no active token {args.ref!r}", file=sys.stderr)
                    return 1
                print(f"revoked {n} token(s)")
        return 0

    with database(settings, quiet=True) as url:
        return asyncio.run(go(url))


def parse_age(text: str) -> timedelta:
    m = re.fullmatch(r"(\d+)([smhdw])", text.strip())
    if not m:
        raise argparse.ArgumentTypeError("use a number and a unit: 30m, 1h, 2d, 1w")
    unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[m.group(2)]
    return timedelta(**{unit: int(m.group(1))})


def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    from service import store
    from service.deploys import NotFound
    from service.lifecycle import IllegalTransition, Replay

    actor = f"admin:{args.actor}"

    async def go(url: str) -> int:
        async with services_for(settings, url, pool_size=4) as services:
            if args.failed:
                since = datetime.now(UTC) - args.since if args.since else None
                ids: list[str] = []
                cursor = None
                async with services.pool.connection() as conn:
                    while True:
                        page = await store.list_deploys(conn, status="failed", cursor=cursor, limit=200)
                        ids += [d.id for d in page if since is None or d.updated_at >= since]
                        if len(page) < 200:
                            break
                        cursor = (page[-1].created_at, page[-1].id)
            else:
                if not args.id:
                    print("give a deploy id or --failed", file=sys.stderr)
                    return 2
                ids = [args.id]
            status = 0
            for deploy_id in ids:
                try:
                    _, view = await services.deploys.execute(
                        deploy_id, Replay(by=actor, budget=settings.max_attempts), actor
                    )
                    print(f"{deploy_id} {view.status} (attempt {view.attempt} of {view.max_attempts})")
                except (IllegalTransition, NotFound) as exc:
                    print(f"{deploy_id}: {exc or 'not found'}", file=sys.stderr)
                    status = 1
            if args.failed and not ids:
                print("no failed deploys")
            return status

    with database(settings, quiet=True) as url:
        return asyncio.run(go(url))


def cmd_projections(settings: Settings, args: argparse.Namespace) -> int:
    from service import store

    async def go(url: str) -> int:
        import psycopg

        async with await psycopg.AsyncConnection.connect(url) as conn, conn.transaction():
            n = await store.rebuild_projections(conn)
        print(f"rebuilt {n} deploy(s) from their events")
        return 0

    with database(settings, quiet=True) as url:
        return asyncio.run(go(url))


def format_event(e: Any) -> str:
    data = {k: v for k, v in e.data.items() if v not in (None, "", [], {})}
    if e.type == "Requested":
        data["files"] = sorted(data.get("files", {}))
    detail = " ".join(f"{k}={v}" for k, v in data.items())
    return f"{e.recorded_at:%Y-%m-%d %H:%M:%S} #{e.position:<6} {e.deploy_id[:8]} v{e.version:<3} {e.type:<15} {e.actor:<22} {detail}"


def cmd_events(settings: Settings, args: argparse.Namespace) -> int:
    from service import store

    async def go(url: str) -> int:
        import psycopg

        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            after = 0
            while True:
                page = await store.audit_page(conn, after=after, limit=500, deploy_id=args.deploy)
                for e in page:
                    print(format_event(e), flush=True)
                if page:
                    after = page[-1].position
                if len(page) == 500:
                    continue
                if not args.follow:
                    return 0
                await conn.execute("LISTEN tfdeploy_events")
                gen = conn.notifies(timeout=5.0)
                async for _ in gen:
                    break
                await conn.execute("UNLISTEN tfdeploy_events")

    with database(settings, quiet=True) as url:
        try:
            return asyncio.run(go(url))
        except KeyboardInterrupt:
            return 0


# ---------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tfdeploy", description="A Terraform deploy service.")
    sub = p.add_subparsers(dest="command", required=True)

    for name, helptext in (("up", "API and worker in one process"), ("serve", "the API alone")):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("--host", default=None)
        sp.add_argument("--port", type=int, default=None)
        if name == "serve":
            sp.add_argument(
                "--workers", type=int, default=1, metavar="N",
                help="serve the API from N processes on one socket (default 1)",
            )
    sub.add_parser("worker", help="a worker alone")
    sub.add_parser("migrate", help="apply the database migrations")

    tp = sub.add_parser("token", help="API tokens")
    tsub = tp.add_subparsers(dest="token_cmd", required=True)
    tc = tsub.add_parser("create", help="print a new token once")
    tc.add_argument("--name", required=True)
    tc.add_argument("--admin", action="store_true")
    tsub.add_parser("list", help="list tokens")
    tr = tsub.add_parser("revoke", help="revoke a token by id or name")
    tr.add_argument("ref")

    rp = sub.add_parser("replay", help="queue failed deploys again with a fresh attempt budget")
    rp.add_argument("id", nargs="?")
    rp.add_argument("--failed", action="store_true", help="every failed deploy")
    rp.add_argument("--since", type=parse_age, help="with --failed: failed within this age, e.g. 1h")
    rp.add_argument("--actor", default=os.environ.get("USER", "cli"), help="recorded as admin:<actor>")

    pp = sub.add_parser("projections", help="read models")
    psub = pp.add_subparsers(dest="proj_cmd", required=True)
    psub.add_parser("rebuild", help="recompute the read models from the events")

    ep = sub.add_parser("events", help="print events")
    ep.add_argument("--deploy")
    ep.add_argument("--follow", "-f", action="store_true")
    return p


COMMANDS = {
    "up": cmd_up,
    "serve": cmd_serve,
    "worker": cmd_worker,
    "migrate": cmd_migrate,
    "token": cmd_token,
    "replay": cmd_replay,
    "projections": cmd_projections,
    "events": cmd_events,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = from_env(
            host=getattr(args, "host", None),
            port=getattr(args, "port", None),
        )
    except SettingsError as exc:
        print(f"tfdeploy: configuration error: {exc}", file=sys.stderr)
        return 2
    if hasattr(args, "host"):
        args.host = settings.host
        args.port = settings.port
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return COMMANDS[args.command](settings, args)
    except RunnerError as exc:  # e.g. `worker` with no Docker engine and no TFDEPLOY_RUNNER
        print(f"tfdeploy: runner error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
