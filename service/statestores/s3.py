"""The S3 state store: each tfstate version is one object under a versioned key.

Works with AWS S3, MinIO and NCP Object Storage: path-style addressing when an endpoint URL is
set, a ``Content-MD5`` header on every upload (which all three verify, refusing a corrupted
body), no SDK-default flexible checksums (some S3-compatible servers refuse them), short timeouts
and few retries (the deployer retries on its own). Credentials come from boto3's usual chain and
never appear in an error message or in object metadata; the only metadata is the sha256 (of the
plaintext) and the id of the key that sealed the object.

Every object is sealed with the key ring (``service.secrets.KeyRing``) before it leaves: the
bucket never holds a tfstate in plain text. ``get`` opens it, and still reads an object stored in
plain text before encryption at rest (``tfdeploy keys rotate`` seals those). On top of that, each
upload asks for server-side encryption (``ServerSideEncryption="AES256"``, SSE-S3); a store that
refuses it (MinIO without a KMS answers ``InvalidArgument``, others ``NotImplemented``) gets the
upload again without it, and this store stops asking for the rest of the process (a warning in
the log). No setting: the objects are sealed by us either way, SSE only adds the store's own layer.

The bucket is never created implicitly; ``ensure_bucket()`` does it on request (tests, dev).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from service.secrets import KeyRing, SecretsError
from service.settings import Settings
from service.statestores.base import StateStoreError, StoredState

log = logging.getLogger("tfdeploy.s3")

_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
# A read is retried here (a put is retried by the deployer, put_with_retries): the deployer
# reads the workspace's latest state before every attempt, and a blip must not fail it.
GET_ATTEMPTS = 3
GET_RETRY_DELAY = 0.2  # doubling
_TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "Throttling", "ThrottlingException", "InternalError",
                    "ServiceUnavailable", "RequestTimeTooSkewed"}
# How stores say "no server-side encryption here" (MinIO without a KMS: InvalidArgument).
_SSE_REFUSED_CODES = {"NotImplemented", "InvalidArgument", "InvalidRequest", "KMS.NotConfigured",
                      "UnsupportedHeader", "InvalidEncryptionAlgorithmError"}
SSE = "AES256"
SHA_META = "sha256"
KEY_META = "tfdeploy-key"  # hex id of the key that sealed the object


def _transient(exc: Exception) -> bool:
    """Worth another try: the connection failed or the server said so (5xx, slow down)."""
    if not isinstance(exc, ClientError):
        return True  # BotoCoreError: connection refused/reset, timeouts, a broken answer
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    return status >= 500 or exc.response.get("Error", {}).get("Code") in _TRANSIENT_CODES


def _short(op: str, exc: Exception) -> str:
    """A short, credential-free message for a boto error."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = err.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        text = f"{code}: {err.get('Message') or ''}".rstrip(": ")
    else:
        text = f"{type(exc).__name__}: {exc}"
    text = _USERINFO.sub("", text)
    if len(text) > 200:
        text = text[:197] + "..."
    return f"s3 {op} failed ({text})"


def _client_config(
    endpoint_url: str | None,
    connect_timeout: float,
    read_timeout: float,
    max_attempts: int,
    addressing_style: str | None,
) -> Config:
    style = addressing_style or ("path" if endpoint_url else None)
    options: dict[str, Any] = {
        "connect_timeout": connect_timeout,
        "read_timeout": read_timeout,
        "retries": {"total_max_attempts": max_attempts, "mode": "standard"},
        "user_agent_extra": "tfdeploy",
    }
    if style:
        options["s3"] = {"addressing_style": style}
    # botocore >= 1.36 adds CRC32 checksums (aws-chunked uploads) by default; several
    # S3-compatible stores refuse them. We send Content-MD5 ourselves instead.
    for name in ("request_checksum_calculation", "response_checksum_validation"):
        if name in Config.OPTION_DEFAULTS:
            options[name] = "when_required"
    return Config(**options)


class S3StateStore:
    name = "s3"

    def __init__(
        self,
        settings: Settings,
        client: Any = None,
        *,
        keyring: KeyRing | None = None,
        connect_timeout: float = 2.0,
        read_timeout: float = 5.0,
        max_attempts: int = 2,
        addressing_style: str | None = None,
    ) -> None:
        if not settings.s3_bucket:
            raise StateStoreError("TFDEPLOY_S3_BUCKET is required for the s3 state store")
        self.bucket = settings.s3_bucket
        self.prefix = settings.s3_prefix.strip("/")
        self.region = settings.s3_region
        # The service's key ring; by default the one the settings name (the same key file).
        self.keyring = keyring or KeyRing.from_settings(settings)
        self.sse: bool = True  # False once the store refused server-side encryption
        if client is None:
            client = boto3.session.Session().client(
                "s3",
                endpoint_url=settings.s3_endpoint_url or None,
                region_name=settings.s3_region or None,
                config=_client_config(
                    settings.s3_endpoint_url,
                    connect_timeout,
                    read_timeout,
                    max_attempts,
                    addressing_style,
                ),
            )
        self.client = client

    # -- keys ---------------------------------------------------------------------------------

    def key(self, workspace: str, version: int) -> str:
        if not workspace or any(p in ("", ".", "..") for p in workspace.split("/")):
            raise StateStoreError(f"workspace name {workspace!r} cannot be an S3 key")
        tail = f"{workspace}/{version:08d}.tfstate"
        return f"{self.prefix}/{tail}" if self.prefix else tail

    def location(self, workspace: str, version: int) -> str:
        return f"s3://{self.bucket}/{self.key(workspace, version)}"

    def _parse(self, workspace: str, version: int, location: str) -> tuple[str, str]:
        """Bucket and key: from the recorded location (so a later prefix change still reads old
        versions), else from the settings."""
        if location.startswith("s3://"):
            bucket, _, key = location[5:].partition("/")
            if bucket and key:
                return bucket, key
        return self.bucket, self.key(workspace, version)

    # -- operations ---------------------------------------------------------------------------

    async def put(self, workspace: str, version: int, content: bytes, sha256: str) -> StoredState:
        if hashlib.sha256(content).hexdigest() != sha256:
            raise StateStoreError("state content does not match its sha256")
        key = self.key(workspace, version)
        await self._call(f"put {key}", self._put_sync, self.bucket, key, content, sha256)
        return StoredState(store=self.name, location=f"s3://{self.bucket}/{key}")

    def _put_sync(self, bucket: str, key: str, content: bytes, sha256: str) -> str | None:
        """Seal and upload ``content``, then check what the store holds; the new object's
        version id (None on an unversioned bucket)."""
        sealed = self.keyring.seal(content)
        md5 = base64.b64encode(hashlib.md5(sealed, usedforsecurity=False).digest()).decode()
        args: dict[str, Any] = {
            "Bucket": bucket,
            "Key": key,
            "Body": sealed,
            "ContentType": "application/octet-stream",
            "ContentMD5": md5,
            "Metadata": {SHA_META: sha256, KEY_META: self.keyring.primary_id.hex()},
        }
        if self.sse:
            try:
                resp = self.client.put_object(**args, ServerSideEncryption=SSE)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in _SSE_REFUSED_CODES:
                    raise
                # Refused for SSE or for something else: without SSE tells which. If the
                # store takes it, it does not do SSE; if it refuses again, that error counts.
                resp = self.client.put_object(**args)
                self.sse = False
                log.warning(
                    "the S3 store refused server-side encryption (%s); objects are stored "
                    "sealed by tfdeploy's key ring only",
                    _short("put", exc),
                )
        else:
            resp = self.client.put_object(**args)
        head = self.client.head_object(Bucket=bucket, Key=key)
        size = head.get("ContentLength")
        stored_sha = (head.get("Metadata") or {}).get(SHA_META)
        if size != len(sealed) or stored_sha != sha256:
            raise StateStoreError(
                f"s3 put verification failed for {key}: stored size {size} sha256 {stored_sha}, "
                f"expected {len(sealed)} {sha256}"
            )
        version_id: str | None = resp.get("VersionId")
        return version_id

    async def get(self, workspace: str, version: int, location: str) -> bytes:
        bucket, key = self._parse(workspace, version, location)
        for i in range(GET_ATTEMPTS):
            if i:
                await asyncio.sleep(GET_RETRY_DELAY * 2 ** (i - 1))
            try:
                content: bytes = await asyncio.to_thread(self._get_sync, bucket, key)
                return content
            except (BotoCoreError, ClientError) as exc:
                if i == GET_ATTEMPTS - 1 or not _transient(exc):
                    raise StateStoreError(_short(f"get {key}", exc)) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _get_sync(self, bucket: str, key: str) -> bytes:
        content, _, _ = self._fetch_sync(bucket, key)
        return content

    def _fetch_sync(self, bucket: str, key: str) -> tuple[bytes, str, dict[str, Any]]:
        """The plaintext of an object (opened, checked against its sha256), its sha256, and the
        GET response's headers (``VersionId``, ``Metadata``)."""
        resp = self.client.get_object(Bucket=bucket, Key=key)
        with resp["Body"] as body:
            stored: bytes = body.read()
        expected = (resp.get("Metadata") or {}).get(SHA_META)
        if expected is None:
            raise StateStoreError(f"s3 object {key} has no sha256 metadata")
        try:
            content = self.keyring.open(stored, legacy_plaintext=True)
        except SecretsError as exc:
            if KeyRing.key_id_of(stored) in self.keyring.key_ids:
                raise StateStoreError(f"s3 object {key} is corrupted ({exc})") from None
            raise StateStoreError(f"s3 object {key}: {exc}") from None
        del stored
        actual = hashlib.sha256(content).hexdigest()
        if actual != expected:
            raise StateStoreError(
                f"s3 object {key} is corrupted (sha256 {actual}, expected {expected})"
            )
        return content, actual, resp

    async def delete(self, workspace: str, version: int, location: str) -> None:
        """Delete one stored version for good (retention, service/maintenance.py): on a
        versioned bucket every version of its object -- a plain delete would only hide it
        behind a delete marker -- else the object. What is not there is no error."""
        bucket, key = self._parse(workspace, version, location)
        await self._call(f"delete {key}", self._delete_sync, bucket, key)

    def _delete_sync(self, bucket: str, key: str) -> None:
        try:
            pages = self.client.get_paginator("list_object_versions").paginate(
                Bucket=bucket, Prefix=key
            )
            ids = [
                v["VersionId"]
                for page in pages
                for v in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]
                if v.get("Key") == key and v.get("VersionId")
            ]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("NotImplemented", "InvalidRequest"):
                raise
            ids = []  # a store without versions
        for version_id in ids:
            self.client.delete_object(Bucket=bucket, Key=key, VersionId=version_id)
        if not ids:
            self.client.delete_object(Bucket=bucket, Key=key)

    # -- key rotation (service.rotation) -----------------------------------------------------

    def reseal(self, workspace: str, version: int, location: str) -> bool:
        """Seal one stored version under the key ring's primary key, if it is not already
        (plain text from before encryption at rest, or an older key): True if it was rewritten.
        The object is written again under its key and checked, and then the version it
        replaced is deleted on a versioned bucket, so no copy under the old key (or in plain
        text) stays behind. Safe to repeat, and beside running deploys (the object of a
        recorded version never changes content). Blocking: for ``tfdeploy keys rotate`` and
        ``tfdeploy migrate``, not for the event loop."""
        bucket, key = self._parse(workspace, version, location)
        try:
            return self._reseal_sync(bucket, key)
        except (BotoCoreError, ClientError) as exc:
            raise StateStoreError(_short(f"reseal {key}", exc)) from exc

    def _reseal_sync(self, bucket: str, key: str) -> bool:
        head = self.client.head_object(Bucket=bucket, Key=key)
        if (head.get("Metadata") or {}).get(KEY_META) == self.keyring.primary_id.hex():
            return False
        content, sha256, resp = self._fetch_sync(bucket, key)
        old_version = resp.get("VersionId")
        new_version = self._put_sync(bucket, key, content, sha256)
        if old_version and old_version != "null" and old_version != new_version:
            self.client.delete_object(Bucket=bucket, Key=key, VersionId=old_version)
        return True

    async def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (tests, ``tfdeploy up`` dev setups only)."""
        await self._call(f"create bucket {self.bucket}", self._ensure_bucket_sync)

    def _ensure_bucket_sync(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status != 404 and exc.response.get("Error", {}).get("Code") not in (
                "404",
                "NoSuchBucket",
            ):
                raise
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        region = self.region or self.client.meta.region_name
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self.client.create_bucket(**kwargs)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                raise

    async def _call(self, op: str, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except StateStoreError:
            raise
        except (BotoCoreError, ClientError) as exc:
            raise StateStoreError(_short(op, exc)) from exc
