"""The ``tfdeploy`` command line: the parser, and each command's handler from the module of its
group --

- ``serving``: ``up``, ``serve [--workers N]``, ``worker``;
- ``database``: where the command connects, ``migrate``;
- ``credentials``: ``user``, ``token``, ``keys``;
- ``deploys``: ``replay``, ``approve``, ``discard``;
- ``workspaces``: ``workspace contested``, ``workspace unlock``;
- ``events``: ``events``, ``projections rebuild``;
- ``text``: what the commands print, and the ages they take.

``main`` is the console entry point (``tfdeploy``); ``python -m service.cli`` runs it too.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from service.cli.credentials import cmd_keys, cmd_token, cmd_user
from service.cli.database import cmd_migrate
from service.cli.deploys import cmd_plan_command, cmd_replay
from service.cli.events import cmd_events, cmd_projections

# Re-exported: bench/_serve.py runs an API process the way `tfdeploy serve` does, with these.
from service.cli.serving import _close_event_streams as _close_event_streams
from service.cli.serving import _run_api as _run_api
from service.cli.serving import cmd_serve, cmd_up, cmd_worker
from service.cli.text import parse_age
from service.cli.workspaces import cmd_workspace
from service.runners.base import RunnerError
from service.settings import SettingsError, from_env


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
