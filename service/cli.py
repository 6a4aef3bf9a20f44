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
from typing import Any, NamedTuple

from service.runners.base import RunnerError
from service.settings import Settings, SettingsError, from_env

log = logging.getLogger("tfdeploy")


# ---------------------------------------------------------------- database


class Database(NamedTuple):
    """Where the service connects (``url``: the service role) and where migrations run
    (``owner_url``: the schema's owner)."""

    url: str
    owner_url: str


@contextlib.contextmanager
def database(settings: Settings, *, quiet: bool = False) -> Iterator[Database]:
    """The database: TFDEPLOY_DATABASE_URL (and TFDEPLOY_MIGRATE_DATABASE_URL for migrations,
    else the same), or the embedded cluster under the data dir (started here if it is not
    running, and then stopped here at the end), with its two roles."""
    if settings.database_url:
        yield Database(settings.database_url, settings.migrate_database_url or settings.database_url)
        return
    from service.embedded import EmbeddedPostgres

    pg = EmbeddedPostgres(settings.data_path / "postgres")
    pg.start()
    if not quiet:
        print(
            f"embedded PostgreSQL at {pg.display_url()} (data in {pg.pgdata}; "
            f"passwords in {pg.credentials})",
            file=sys.stderr,
        )
    try:
        yield Database(pg.url, pg.owner_url)
    finally:
        if pg._started_here:
            pg.stop()


def migrate_all(settings: Settings, owner_url: str, keyring: Any) -> list[str]:
    """The SQL migrations, then the data step that seals what an earlier version stored in
    plain text; returns what was done, for printing."""
    from service.migrate import migrate, seal_plaintext

    done = [f"migrated: {', '.join(applied)}"] if (applied := migrate(owner_url)) else []
    s3 = _s3_store(settings, keyring)
    for report in seal_plaintext(owner_url, keyring, s3):
        if report.resealed or not report.finished:
            done.append(f"sealed at rest: {report.line()}")
        done += [f"  cannot seal {f}" for f in report.failed[:20]]
    return done


def _s3_store(settings: Settings, keyring: Any) -> Any:
    if settings.state_store != "s3":
        return None
    from service.statestores.s3 import S3StateStore

    return S3StateStore(settings, keyring=keyring)


def _keyring(settings: Settings) -> Any:
    from service.secrets import KeyRing

    return KeyRing.from_settings(settings)


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
        for line in migrate_all(settings, db.owner_url, _keyring(settings)):
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


# ---------------------------------------------------------------- commands


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


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from service.migrate import MigrationError

    keyring = _keyring(settings)
    with database(settings) as db:
        try:
            lines = migrate_all(settings, db.owner_url, keyring)
        except MigrationError as exc:
            print(f"tfdeploy: {exc}", file=sys.stderr)
            return 1
    print("\n".join(lines) if lines else "up to date")
    return 0


def cmd_keys(settings: Settings, args: argparse.Namespace) -> int:
    """``keys generate`` (a new key to put first in TFDEPLOY_SECRETS_KEY), ``keys rotate``
    (re-seal everything under it), ``keys status`` (which keys PostgreSQL's blobs need),
    ``keys open-emergency ID`` (a rescued state, opened, to stdout)."""
    from service.secrets import generate_key

    if args.keys_cmd == "generate":
        print(generate_key())
        return 0
    import psycopg

    from service import rotation

    keyring = _keyring(settings)
    with database(settings, quiet=True) as db, psycopg.connect(db.url, autocommit=True) as conn:
        if args.keys_cmd == "status":
            ids = {kid.hex(): ("primary" if i == 0 else "old") for i, kid in enumerate(keyring.key_ids)}
            print("keys: " + ", ".join(f"{k} ({v})" for k, v in ids.items()))
            for kind, kid, n in rotation.key_usage(conn):
                state = ids.get(kid, "legacy" if kid == "unsealed" else "NOT CONFIGURED")
                print(f"{kind:<28} {kid:<16} {state:<15} {n}")
            print("S3 objects: not counted here (`tfdeploy keys rotate` checks each one)")
            return 0
        if args.keys_cmd == "open-emergency":
            from service.secrets import SecretsError
            from service.statestores import index

            location = args.location
            if location.isdigit():
                location = f"{index.EMERGENCY_PREFIX}{location}"

            async def fetch() -> dict[str, Any] | None:
                async with await psycopg.AsyncConnection.connect(db.url) as aconn:
                    return await index.get_emergency(aconn, location, keyring)

            try:
                row = asyncio.run(fetch())
            except (SecretsError, ValueError) as exc:
                print(f"tfdeploy: {exc}", file=sys.stderr)
                return 1
            if row is None:
                print(f"no emergency copy {location}", file=sys.stderr)
                return 1
            sys.stdout.buffer.write(row["content"])
            sys.stdout.flush()
            return 0

        def progress(kind: str, n: int) -> None:
            print(f"{kind}: {n} re-sealed so far", flush=True)

        print(f"re-sealing under key {keyring.primary_id.hex()}", flush=True)
        reports = rotation.rotate(conn, keyring, _s3_store(settings, keyring), progress=progress)
    for report in reports:
        print(report.line())
        for failure in report.failed:
            print(f"  {failure}")
    if all(r.finished for r in reports):
        print(f"done: every blob is sealed with key {keyring.primary_id.hex()}"
              + ("; the other keys may go from TFDEPLOY_SECRETS_KEY" if len(keyring.key_ids) > 1 else ""))
        return 0
    print("not finished: keep the old keys, fix what is listed and run it again", file=sys.stderr)
    return 1
def _when(at: datetime | None) -> str:
    return f"{at:%Y-%m-%d %H:%M}" if at else "-"


async def _connect(url: str) -> Any:
    import psycopg

    return await psycopg.AsyncConnection.connect(url, autocommit=True)


def cmd_user(settings: Settings, args: argparse.Namespace) -> int:
    from service import auth

    async def go(url: str) -> int:
        async with await _connect(url) as conn:
            if args.user_cmd == "create":
                await auth.create_user(conn, args.name, admin=args.admin)
                print(f"user {args.name} created{' (admin)' if args.admin else ''}")
            elif args.user_cmd == "list":
                print(f"{'user':<24} {'role':<6} {'created':<16}  {'tokens':>6}  state")
                for u in await auth.list_users(conn):
                    role = "admin" if u["admin"] else "user"
                    state = f"disabled {_when(u['disabled_at'])}" if u["disabled_at"] else "active"
                    print(f"{_safe(u['name']):<24} {role:<6} {_when(u['created_at']):<16}  {u['tokens']:>6}  {state}")
            else:
                if not await auth.disable_user(conn, args.name):
                    print(f"no enabled user {args.name!r}", file=sys.stderr)
                    return 1
                print(f"user {args.name} disabled: their tokens are refused from now on")
        return 0

    with database(settings, quiet=True) as db:
        try:
            return asyncio.run(go(db.url))
        except auth.UserError as exc:
            print(f"tfdeploy: {exc}", file=sys.stderr)
            return 1


def cmd_token(settings: Settings, args: argparse.Namespace) -> int:
    from service import auth

    async def go(url: str) -> int:
        async with await _connect(url) as conn:
            if args.token_cmd == "create":
                expires = datetime.now(UTC) + args.expires if args.expires else None
                if args.user:
                    token = await auth.create_user_token(
                        conn, args.user, expires_at=expires, label=args.label
                    )
                else:
                    token = await auth.create_token(
                        conn, args.name, admin=args.admin, expires_at=expires, label=args.label
                    )
                print(token)
            elif args.token_cmd == "list":
                print(
                    f"{'id':>5}  {'user':<24} {'label':<20} {'role':<6} {'created':<16}  "
                    f"{'expires':<16}  {'last used':<16}  state"
                )
                for t in await auth.list_tokens(conn):
                    role = "admin" if t["admin"] else "user"
                    print(
                        f"{t['id']:>5}  {_safe(t['user']):<24} {_safe(t['label'] or '-'):<20} "
                        f"{role:<6} {_when(t['created_at']):<16}  {_when(t['expires_at']):<16}  "
                        f"{_when(t['last_used_at']):<16}  {auth.token_state(t)}"
                    )
            else:
                if not await auth.revoke_token(conn, args.id):
                    print(f"no active token with id {args.id}", file=sys.stderr)
                    return 1
                print(f"revoked token {args.id}")
        return 0

    if args.token_cmd == "create" and bool(args.user) == bool(args.name):
        print("tfdeploy: give --user NAME (an existing user) or --name NAME", file=sys.stderr)
        return 2
    if args.token_cmd == "create" and args.user and args.admin:
        print("tfdeploy: --admin goes with --name (a user's tokens are admin ones if the user is)", file=sys.stderr)
        return 2
    with database(settings, quiet=True) as db:
        try:
            return asyncio.run(go(db.url))
        except auth.UserError as exc:
            print(f"tfdeploy: {exc}", file=sys.stderr)
            return 1


def cmd_workspace(settings: Settings, args: argparse.Namespace) -> int:
    if args.workspace_cmd == "unlock":
        return _workspace_unlock(settings, args)
    from service import workspaces

    async def go(url: str) -> int:
        async with await _connect(url) as conn:
            rows = await workspaces.contested(conn)
        if not rows:
            print("no contested workspace")
            return 0
        print(
            "workspace names several users deployed to before the upgrade: each went to its first "
            "deployer;\nthe others below (docs/workspaces.md, 'Contested workspaces')"
        )
        print(f"{'workspace':<40} {'other user':<24} {'deploys':>7}  {'last deploy':<16}  member")
        for r in rows:
            ref = _safe(f"{r['owner']}:{r['name']}")
            print(
                f"{ref:<40} {_safe(r['other_user']):<24} {r['deploys']:>7}  "
                f"{_when(r['last_deploy_at']):<16}  {r['member_role'] or '-'}"
            )
        return 0

    with database(settings, quiet=True) as db:
        return asyncio.run(go(db.url))


def _workspace_unlock(settings: Settings, args: argparse.Namespace) -> int:
    """Force-unlock a workspace's CLI lock from the shell (what ``terraform force-unlock`` does
    for an admin): recorded as ``StateForceUnlocked`` by ``admin:<actor>``; the workspace's
    queued deploys then start. A deploy's hold is not the CLI's: cancel the deploy instead."""
    from service import cli_backend, workspaces
    from service.cli_backend_rules import BackendError

    owner, sep, name = args.ref.rpartition(":")
    if not sep or not owner or not name:
        print("name the workspace as owner:name", file=sys.stderr)
        return 2

    async def go(url: str) -> int:
        async with services_for(settings, url, pool_size=2) as services:
            async with services.pool.connection() as conn:
                ws = await workspaces.find(conn, owner, name)
            if ws is None:
                print(f"no workspace {_safe(args.ref)}", file=sys.stderr)
                return 1
            try:
                released = await cli_backend.force_unlock_from_shell(services.pool, ws, args.actor)
            except BackendError as exc:
                print(f"{_safe(ws.ref)}: {_safe(exc.detail)}", file=sys.stderr)
                return 1
        if released is None:
            print(f"{_safe(ws.ref)} was not locked")
        else:
            print(
                f"{_safe(ws.ref)} unlocked: lock {_safe(released.lock_id)} of "
                f"{_safe(released.holder)} (held since {_when(released.created_at)}) removed"
            )
        return 0

    with database(settings, quiet=True) as db:
        return asyncio.run(go(db.url))


def parse_age(text: str) -> timedelta:
    m = re.fullmatch(r"(\d+)([smhdw])", text.strip())
    if not m:
        raise argparse.ArgumentTypeError("use a number and a unit: 30m, 1h, 2d, 1w")
    unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[m.group(2)]
    return timedelta(**{unit: int(m.group(1))})


def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    import psycopg

    from service import store
    from service.api.errors import INPUTS_REMOVED_SQLSTATE
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
                except psycopg.DatabaseError as exc:
                    if exc.sqlstate != INPUTS_REMOVED_SQLSTATE:
                        raise
                    print(f"{deploy_id}: its files and variables were removed by retention; "
                          "it cannot run again", file=sys.stderr)
                    status = 1
            if args.failed and not ids:
                print("no failed deploys")
            return status

    with database(settings, quiet=True) as db:
        return asyncio.run(go(db.url))


def cmd_plan_command(settings: Settings, args: argparse.Namespace) -> int:
    """``approve ID`` / ``discard ID``: a planned deploy's plan, from the shell, recorded as
    ``admin:<actor>`` (the shell's user) like ``replay``."""
    from uuid import UUID

    from service import planning
    from service.deploys import NotFound
    from service.lifecycle import IllegalTransition

    actor = f"admin:{args.actor}"
    try:
        deploy_id = str(UUID(args.id))
    except ValueError:
        print(f"{_safe(args.id)}: not a deploy id", file=sys.stderr)
        return 2

    async def go(url: str) -> int:
        async with services_for(settings, url, pool_size=2) as services:
            view = await services.deploys.get(deploy_id)
            try:
                if view is None:
                    raise NotFound(deploy_id)
                view, _ = await planning.command(
                    services.deploys, view, args.command, by=actor, actor=actor, owner=actor
                )
            except (IllegalTransition, NotFound) as exc:
                print(f"{deploy_id}: {exc if isinstance(exc, IllegalTransition) else 'not found'}",
                      file=sys.stderr)
                return 1
            print(f"{deploy_id} {view.status} (attempt {view.attempt} of {view.max_attempts})")
            return 0

    with database(settings, quiet=True) as db:
        return asyncio.run(go(db.url))


def cmd_projections(settings: Settings, args: argparse.Namespace) -> int:
    from service import store

    async def go(url: str) -> int:
        import psycopg

        async with await psycopg.AsyncConnection.connect(url) as conn, conn.transaction():
            n = await store.rebuild_projections(conn)
        print(f"rebuilt {n} deploy(s) from their events")
        return 0

    with database(settings, quiet=True) as db:
        return asyncio.run(go(db.url))


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _safe(text: object) -> str:
    """Text for a terminal: control characters (ANSI escapes, carriage returns, ...) shown as
    escapes, never interpreted. A user's variable value may carry them."""
    return _CONTROL.sub(lambda m: ascii(m.group())[1:-1], str(text))


def format_event(e: Any) -> str:
    data = {k: v for k, v in e.data.items() if v not in (None, "", [], {})}
    if e.type == "Requested":
        data["files"] = sorted(data.get("files", {}))
    detail = " ".join(f"{k}={v}" for k, v in data.items())
    stream = e.deploy_id[:8] if e.stream == "deploy" else f"ws:{e.deploy_id[:5]}"
    return _safe(
        f"{e.recorded_at:%Y-%m-%d %H:%M:%S} #{e.position:<6} {stream} v{e.version:<3} "
        f"{e.type:<15} {e.actor:<22} {detail}"
    )


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

    with database(settings, quiet=True) as db:
        try:
            return asyncio.run(go(db.url))
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

    up_ = sub.add_parser("user", help="users")
    usub = up_.add_subparsers(dest="user_cmd", required=True)
    uc = usub.add_parser("create", help="a new user")
    uc.add_argument("name")
    uc.add_argument("--admin", action="store_true")
    usub.add_parser("list", help="list users")
    ud = usub.add_parser("disable", help="disable a user: their tokens are refused at once")
    ud.add_argument("name")

    tp = sub.add_parser("token", help="API tokens")
    tsub = tp.add_subparsers(dest="token_cmd", required=True)
    tc = tsub.add_parser("create", help="print a new token once")
    tc.add_argument("--user", help="an existing user")
    tc.add_argument("--name", help="a user, made if there is none (with --admin: an admin)")
    tc.add_argument("--admin", action="store_true")
    tc.add_argument("--expires", type=parse_age, help="valid for this long, e.g. 30d, 12h")
    tc.add_argument("--label", help="what the token is for")
    tsub.add_parser("list", help="list tokens")
    tr = tsub.add_parser("revoke", help="revoke a token by its id (see token list)")
    tr.add_argument("id", type=int)

    wp = sub.add_parser("workspace", help="workspaces")
    wsub = wp.add_subparsers(dest="workspace_cmd", required=True)
    wsub.add_parser(
        "contested", help="names several users deployed to before workspaces had owners"
    )
    wu = wsub.add_parser(
        "unlock", help="force-unlock a workspace's terraform CLI lock (docs/terraform-cli.md)"
    )
    wu.add_argument("ref", help="the workspace, owner:name")
    wu.add_argument("--actor", default=os.environ.get("USER", "cli"), help="recorded as admin:<actor>")

    rp = sub.add_parser("replay", help="queue failed deploys again with a fresh attempt budget")
    rp.add_argument("id", nargs="?")
    rp.add_argument("--failed", action="store_true", help="every failed deploy")
    rp.add_argument("--since", type=parse_age, help="with --failed: failed within this age, e.g. 1h")
    rp.add_argument("--actor", default=os.environ.get("USER", "cli"), help="recorded as admin:<actor>")

    for verb, what in (
        ("approve", "apply a planned deploy's saved plan"),
        ("discard", "discard a planned deploy's plan: it ends discarded"),
    ):
        vp = sub.add_parser(verb, help=what)
        vp.add_argument("id", help="the deploy's id")
        vp.add_argument("--actor", default=os.environ.get("USER", "cli"), help="recorded as admin:<actor>")

    kp = sub.add_parser("keys", help="the key ring of TFDEPLOY_SECRETS_KEY")
    ksub = kp.add_subparsers(dest="keys_cmd", required=True)
    ksub.add_parser("generate", help="print a new key (put it first in TFDEPLOY_SECRETS_KEY)")
    ksub.add_parser("rotate", help="re-seal everything stored under an older key with the first")
    ksub.add_parser("status", help="which keys the blobs in PostgreSQL are sealed with")
    ko = ksub.add_parser("open-emergency", help="print a rescued tfstate (StateRescued), opened")
    ko.add_argument("location", help="postgres-emergency:<id>, or the id")

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
    "keys": cmd_keys,
    "user": cmd_user,
    "token": cmd_token,
    "workspace": cmd_workspace,
    "replay": cmd_replay,
    "approve": cmd_plan_command,
    "discard": cmd_plan_command,
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
