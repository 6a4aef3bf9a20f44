"""Credentials from the shell: ``tfdeploy user`` (create, list, disable), ``token`` (create,
list, revoke) and ``keys`` (generate, rotate, status, open-emergency: the key ring that seals
what is stored).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime
from typing import Any

from service.cli.database import connect, database, load_keyring, s3_state_store
from service.cli.text import safe, when
from service.settings import Settings


def cmd_user(settings: Settings, args: argparse.Namespace) -> int:
    from service import auth

    async def go(url: str) -> int:
        async with await connect(url) as conn:
            if args.user_cmd == "create":
                await auth.create_user(conn, args.name, admin=args.admin)
                print(f"user {args.name} created{' (admin)' if args.admin else ''}")
            elif args.user_cmd == "list":
                print(f"{'user':<24} {'role':<6} {'created':<16}  {'tokens':>6}  state")
                for u in await auth.list_users(conn):
                    role = "admin" if u["admin"] else "user"
                    state = f"disabled {when(u['disabled_at'])}" if u["disabled_at"] else "active"
                    print(f"{safe(u['name']):<24} {role:<6} {when(u['created_at']):<16}  {u['tokens']:>6}  {state}")
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
        async with await connect(url) as conn:
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
                        f"{t['id']:>5}  {safe(t['user']):<24} {safe(t['label'] or '-'):<20} "
                        f"{role:<6} {when(t['created_at']):<16}  {when(t['expires_at']):<16}  "
                        f"{when(t['last_used_at']):<16}  {auth.token_state(t)}"
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

    keyring = load_keyring(settings)
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
        reports = rotation.rotate(conn, keyring, s3_state_store(settings, keyring), progress=progress)
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
