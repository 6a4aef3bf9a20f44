"""Re-sealing what is stored under an old key, or in plain text, with the key ring's primary key.

``tfdeploy keys rotate`` (``rotate``) re-seals every kind of blob the service keeps; ``tfdeploy
migrate`` runs ``seal_plaintext`` after the SQL migrations, which seals what an earlier version
stored in plain text (tfstate versions and emergency copies; S3 objects listed by migration
0008 in ``unsealed_s3_objects``).

One function per kind of blob: ``reseal_state_blobs``, ``reseal_emergency_copies``,
``reseal_secrets``, ``reseal_saved_plans``, ``reseal_s3_objects``. A new kind of sealed column (saved plans) is one
``SealedColumn`` added to ``SEALED_COLUMNS``; ``reseal_column`` does the rest.

Resumable by construction: each row is re-sealed in a transaction of its own (read under ``FOR
UPDATE``, checked again, rewritten), and a row is picked only while its first bytes do not name
the primary key. A run killed half-way leaves every row either as it was or done; the next run
picks up what is left. Two runs at once re-seal each row once. A row that no key of the ring
opens is reported and left as it is; the run goes on and ends "not finished".

Synchronous (psycopg's blocking API): it runs from the command line, not in the event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from service.secrets import MAGIC, PREFIX_LEN, KeyRing, SecretsError, open_secret

if TYPE_CHECKING:
    from service.statestores.s3 import S3StateStore

Progress = Callable[[str, int], None]  # (kind, re-sealed so far)
BATCH = 200  # candidate keys read per query


@dataclass
class Report:
    """What one kind of blob took."""

    kind: str
    resealed: int = 0
    failed: list[str] = field(default_factory=list)  # "<row>: <why>", no content
    skipped: str = ""  # why nothing was tried (S3 objects without an S3 store)

    @property
    def finished(self) -> bool:
        return not self.failed and not self.skipped

    def line(self) -> str:
        text = f"{self.kind}: {self.resealed} re-sealed"
        if self.failed:
            text += f", {len(self.failed)} failed"
        if self.skipped:
            text += f" ({self.skipped})"
        return text


def _plain(keyring: KeyRing, blob: bytes) -> bytes:
    return blob


def _fernet(keyring: KeyRing, blob: bytes) -> bytes:
    return open_secret(keyring, blob)


@dataclass(frozen=True)
class SealedColumn:
    """A bytea column whose every value is sealed with the key ring.

    ``legacy``: how to read a value that is not sealed at all (written before the key ring);
    None when every value ever written was sealed. ``legacy_is_plaintext``: such a value is
    plain text, so ``tfdeploy migrate`` seals it (a Fernet secret is encrypted already and
    waits for ``keys rotate``)."""

    kind: str
    table: str
    key: tuple[str, ...]
    column: str
    legacy: Callable[[KeyRing, bytes], bytes] | None = None
    legacy_is_plaintext: bool = False


STATE_BLOBS = SealedColumn(
    "state versions (PostgreSQL)", "state_blobs", ("workspace", "version"), "content",
    legacy=_plain, legacy_is_plaintext=True,
)
EMERGENCY_COPIES = SealedColumn(
    "emergency copies", "state_emergency", ("id",), "content",
    legacy=_plain, legacy_is_plaintext=True,
)
SECRETS = SealedColumn(
    "deploy secrets", "deploy_secrets", ("deploy_id",), "ciphertext", legacy=_fernet
)
# Plan files kept for approval (migration 0010): sealed from the first one written.
SAVED_PLANS = SealedColumn("saved plans", "saved_plans", ("id",), "content")
# Every sealed column in PostgreSQL, in the order `keys rotate` takes them.
SEALED_COLUMNS: list[SealedColumn] = [STATE_BLOBS, EMERGENCY_COPIES, SECRETS, SAVED_PLANS]


def _candidates(
    conn: psycopg.Connection[Any], col: SealedColumn, prefix: bytes, plaintext_only: bool
) -> Iterator[tuple[Any, ...]]:
    """Keys of the rows still to do, in key order, a page at a time (keyset pagination: a row
    that fails stays behind the cursor instead of being read again and again)."""
    keys = sql.SQL(", ").join(sql.Identifier(k) for k in col.key)
    if plaintext_only:  # not sealed at all
        test = sql.SQL("substring({c} from 1 for {n}) IS DISTINCT FROM {p}").format(
            c=sql.Identifier(col.column), n=sql.Literal(len(MAGIC)), p=sql.Literal(MAGIC))
    else:  # not sealed by the primary key
        test = sql.SQL("substring({c} from 1 for {n}) IS DISTINCT FROM {p}").format(
            c=sql.Identifier(col.column), n=sql.Literal(PREFIX_LEN), p=sql.Literal(prefix))
    after: tuple[Any, ...] | None = None
    while True:
        query = sql.SQL("SELECT {keys} FROM {t} WHERE {test}{after} ORDER BY {keys} LIMIT {n}").format(
            keys=keys, t=sql.Identifier(col.table), test=test, n=sql.Literal(BATCH),
            after=sql.SQL("") if after is None else sql.SQL(" AND ({keys}) > ({vals})").format(
                keys=keys, vals=sql.SQL(", ").join(sql.Literal(v) for v in after)),
        )
        rows = conn.execute(query).fetchall()
        yield from rows
        if len(rows) < BATCH:
            return
        after = rows[-1]


def reseal_column(
    conn: psycopg.Connection[Any],
    keyring: KeyRing,
    col: SealedColumn,
    *,
    plaintext_only: bool = False,
    progress: Progress | None = None,
) -> Report:
    """Re-seal every value of ``col`` that the primary key did not seal (``plaintext_only``:
    only those not sealed at all). ``conn`` must be in autocommit mode: each row commits on
    its own."""
    if not conn.autocommit:
        raise RuntimeError("reseal_column needs an autocommit connection")
    report = Report(col.kind)
    where = sql.SQL(" AND ").join(
        sql.SQL("{} = {}").format(sql.Identifier(k), sql.Placeholder()) for k in col.key)
    select = sql.SQL("SELECT {c} FROM {t} WHERE {w} FOR UPDATE").format(
        c=sql.Identifier(col.column), t=sql.Identifier(col.table), w=where)
    update = sql.SQL("UPDATE {t} SET {c} = %s WHERE {w}").format(
        c=sql.Identifier(col.column), t=sql.Identifier(col.table), w=where)
    for key in _candidates(conn, col, keyring.primary_prefix, plaintext_only):
        with conn.transaction():
            row = conn.execute(select, key).fetchone()
            if row is None:  # gone meanwhile (a deploy's secrets, deleted when it ended)
                continue
            blob: bytes = row[0]
            if keyring.sealed_with_primary(blob) or (plaintext_only and KeyRing.is_sealed(blob)):
                continue  # another run did it
            try:
                if KeyRing.is_sealed(blob):
                    plain = keyring.open(blob)
                elif col.legacy is not None:
                    plain = col.legacy(keyring, blob)
                else:
                    raise SecretsError("not sealed")
            except SecretsError as exc:
                report.failed.append(f"{_describe(col, key)}: {exc}")
                continue
            conn.execute(update, (keyring.seal(plain), *key))
        report.resealed += 1
        if progress is not None and report.resealed % BATCH == 0:
            progress(col.kind, report.resealed)
    return report


def _describe(col: SealedColumn, key: tuple[Any, ...]) -> str:
    return f"{col.table} " + " ".join(f"{k}={v}" for k, v in zip(col.key, key, strict=True))


def reseal_state_blobs(conn: psycopg.Connection[Any], keyring: KeyRing, **kw: Any) -> Report:
    return reseal_column(conn, keyring, STATE_BLOBS, **kw)


def reseal_emergency_copies(conn: psycopg.Connection[Any], keyring: KeyRing, **kw: Any) -> Report:
    return reseal_column(conn, keyring, EMERGENCY_COPIES, **kw)


def reseal_secrets(conn: psycopg.Connection[Any], keyring: KeyRing, **kw: Any) -> Report:
    return reseal_column(conn, keyring, SECRETS, **kw)


def reseal_saved_plans(conn: psycopg.Connection[Any], keyring: KeyRing, **kw: Any) -> Report:
    return reseal_column(conn, keyring, SAVED_PLANS, **kw)


S3_KIND = "state versions (S3)"


def reseal_s3_objects(
    conn: psycopg.Connection[Any],
    store: S3StateStore | None,
    *,
    backlog_only: bool = False,
    progress: Progress | None = None,
) -> Report:
    """Re-seal the S3 object of every state version the index records in S3
    (``backlog_only``: only those migration 0008 listed as stored before encryption at rest),
    and clear ``unsealed_s3_objects`` as they are done. Without an S3 store (this process is
    not configured for S3) nothing is tried and the report says so."""
    from service.statestores.base import StateStoreError

    report = Report(S3_KIND)
    source = "unsealed_s3_objects" if backlog_only else "state_versions"
    query = sql.SQL(
        "SELECT workspace, version, location FROM {t}{s3} ORDER BY workspace, version"
    ).format(t=sql.Identifier(source),
             s3=sql.SQL("") if backlog_only else sql.SQL(" WHERE store = 's3'"))
    rows = conn.execute(query).fetchall()
    if not rows:
        return report
    if store is None:
        report.skipped = (
            f"{len(rows)} object(s) not checked: TFDEPLOY_STATE_STORE is not s3 here; run this "
            "again with the S3 settings"
        )
        return report
    for workspace, version, location in rows:
        try:
            done = store.reseal(workspace, version, location)
        except StateStoreError as exc:
            report.failed.append(f"{location}: {exc}")
            continue
        conn.execute(
            "DELETE FROM unsealed_s3_objects WHERE workspace = %s AND version = %s",
            (workspace, version),
        )
        if done:
            report.resealed += 1
            if progress is not None and report.resealed % BATCH == 0:
                progress(S3_KIND, report.resealed)
    return report


def rotate(
    conn: psycopg.Connection[Any],
    keyring: KeyRing,
    s3: S3StateStore | None,
    *,
    progress: Progress | None = None,
) -> list[Report]:
    """``tfdeploy keys rotate``: everything under the primary key."""
    reports = [reseal_column(conn, keyring, col, progress=progress) for col in SEALED_COLUMNS]
    has_s3 = conn.execute("SELECT EXISTS (SELECT FROM state_versions WHERE store = 's3')")
    if s3 is not None or has_s3.fetchone() == (True,):
        reports.append(reseal_s3_objects(conn, s3, progress=progress))
    return reports


def seal_plaintext(
    conn: psycopg.Connection[Any],
    keyring: KeyRing,
    s3: S3StateStore | None,
    *,
    progress: Progress | None = None,
) -> list[Report]:
    """The data step of ``tfdeploy migrate``: seal what an earlier version stored in plain
    text. Cheap when there is nothing: one scan of each table's first bytes, one small read of
    ``unsealed_s3_objects``."""
    reports = [
        reseal_column(conn, keyring, col, plaintext_only=True, progress=progress)
        for col in SEALED_COLUMNS
        if col.legacy_is_plaintext
    ]
    backlog = conn.execute("SELECT EXISTS (SELECT FROM unsealed_s3_objects)").fetchone()
    if backlog == (True,):
        reports.append(reseal_s3_objects(conn, s3, backlog_only=True, progress=progress))
    return reports


def key_usage(conn: psycopg.Connection[Any]) -> list[tuple[str, str, int]]:
    """``(kind, key id or "plain text/legacy", rows)`` for every sealed column: which keys
    PostgreSQL's blobs still need (``tfdeploy keys status``)."""
    out: list[tuple[str, str, int]] = []
    for col in SEALED_COLUMNS:
        query = sql.SQL(
            "SELECT CASE WHEN substring({c} from 1 for {m}) = {magic} "
            "THEN encode(substring({c} from {start} for {n}), 'hex') ELSE NULL END AS kid, "
            "count(*) FROM {t} GROUP BY 1 ORDER BY 1"
        ).format(c=sql.Identifier(col.column), t=sql.Identifier(col.table),
                 m=sql.Literal(len(MAGIC)), magic=sql.Literal(MAGIC),
                 start=sql.Literal(len(MAGIC) + 2), n=sql.Literal(PREFIX_LEN - len(MAGIC) - 1))
        for kid, n in conn.execute(query):
            out.append((col.kind, kid or "unsealed", int(n)))
    return out
