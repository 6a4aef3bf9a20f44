"""Encryption at rest, and secrets in logs.

``KeyRing`` holds the keys of ``TFDEPLOY_SECRETS_KEY`` (or, when unset, of a key generated once
into ``<data dir>/secrets.key``, mode 0600). The setting may list several Fernet-style keys
separated by commas: the first encrypts, all decrypt (rotation: ``tfdeploy keys rotate``
re-encrypts what an older key sealed, see ``service.rotation``).

``KeyRing.seal`` / ``KeyRing.open`` encrypt blobs of any size (tfstate versions, emergency copies,
secrets, saved plans) with AES-256-GCM. Each configured key yields, through HKDF-SHA256, an AES key
and an 8-byte key id that names it without revealing it. A sealed blob is::

    MAGIC (4) | FORMAT (1) | key id (8) | nonce (12) | ciphertext | GCM tag (16)

binary, 41 bytes longer than the plaintext; the first 25 bytes are authenticated with it. The
magic's first byte (0xFF) never starts UTF-8 JSON, a Fernet token or a zip file, so a sealed blob
is told from legacy plaintext (tfstate stored before encryption) and from legacy Fernet secrets.

``SecretBox`` encrypts a deploy's secrets (a str -> str mapping) with the key ring; secrets
encrypted before the key ring (Fernet tokens) still decrypt.

``Masker`` replaces secret values in terraform output by ``***``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from service.settings import Settings, SettingsError

KEY_ENV = "TFDEPLOY_SECRETS_KEY"
KEY_FILE = "secrets.key"
MASK = "***"
MIN_SECRET_LEN = 3

MAGIC = b"\xffTFD"
FORMAT = 1  # AES-256-GCM, HKDF-SHA256-derived key, 12-byte random nonce
KEY_ID_LEN = 8
NONCE_LEN = 12
TAG_LEN = 16
HEADER_LEN = len(MAGIC) + 1 + KEY_ID_LEN + NONCE_LEN  # 25: authenticated with the ciphertext
PREFIX_LEN = len(MAGIC) + 1 + KEY_ID_LEN  # 13: what tells which key sealed a blob
OVERHEAD = HEADER_LEN + TAG_LEN  # 41
_SALT = b"tfdeploy key ring"

Buffer = bytes | bytearray | memoryview  # what psycopg (bytea), boto3 and callers hand over


class SecretsError(Exception):
    """Secrets could not be decrypted (wrong key or damaged data)."""


def generate_key() -> str:
    return Fernet.generate_key().decode("ascii")


def split_keys(setting: str | None) -> list[str]:
    """The keys of a ``TFDEPLOY_SECRETS_KEY`` value, in order, without blanks and repeats."""
    out: list[str] = []
    for k in (setting or "").split(","):
        k = k.strip()
        if k and k not in out:
            out.append(k)
    return out


def _invalid_key() -> ValueError:
    return ValueError(
        f"invalid secrets key: {KEY_ENV} must be 32 url-safe base64-encoded bytes "
        "(a Fernet key, e.g. from `tfdeploy keys generate` or `python -c 'from "
        "cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'`)"
    )


def _raw(key: str) -> bytes:
    try:
        raw = base64.urlsafe_b64decode(key.encode("ascii"))
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise _invalid_key() from None
    if len(raw) != 32:
        raise _invalid_key()
    return raw


def _derive(raw: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=_SALT, info=info).derive(raw)


class KeyRing:
    """The keys of ``TFDEPLOY_SECRETS_KEY``: the first seals, every one opens.

    ``seal`` and ``open`` write their result in place (``_filled``): a 64 MiB tfstate costs its
    input and its output, no third copy.
    """

    def __init__(self, setting: str) -> None:
        keys = split_keys(setting)
        if not keys:
            raise ValueError(f"empty secrets key; {KEY_ENV} must be a Fernet key")
        raws = [_raw(k) for k in keys]
        self._aead: dict[bytes, AESGCM] = {}
        self.key_ids: list[bytes] = []  # in the setting's order: key_ids[0] is the primary
        for raw in raws:
            key_id = _derive(raw, b"tfdeploy/key-id/v1", KEY_ID_LEN)
            if key_id in self._aead:  # two different keys with one id: 2**-64, but be exact
                raise ValueError(f"two keys of {KEY_ENV} have the same key id; drop one")
            self._aead[key_id] = AESGCM(_derive(raw, b"tfdeploy/aes-256-gcm/v1", 32))
            self.key_ids.append(key_id)
        # Secrets written before the key ring were Fernet tokens under these same keys.
        self.fernet = MultiFernet([Fernet(k.encode("ascii")) for k in keys])

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        """The key ring of ``settings``: ``TFDEPLOY_SECRETS_KEY``, else the data dir's key file."""
        return cls(load_or_create_key(settings))

    # -- what a blob says about itself

    @property
    def primary_id(self) -> bytes:
        return self.key_ids[0]

    @property
    def primary_prefix(self) -> bytes:
        """The first bytes of every blob the primary key seals (for SQL: ``substring(col from 1
        for 13)``)."""
        return prefix_for(self.primary_id)

    @staticmethod
    def is_sealed(blob: Buffer) -> bool:
        return bytes(memoryview(blob)[: len(MAGIC)]) == MAGIC

    @staticmethod
    def key_id_of(blob: Buffer) -> bytes | None:
        """The id of the key that sealed ``blob``; None if it is not sealed."""
        view = memoryview(blob)
        if bytes(view[: len(MAGIC)]) != MAGIC or len(view) < OVERHEAD:
            return None
        return bytes(view[len(MAGIC) + 1 : PREFIX_LEN])

    def sealed_with_primary(self, blob: Buffer) -> bool:
        return bytes(memoryview(blob)[:PREFIX_LEN]) == self.primary_prefix

    # -- sealing

    def seal(self, data: Buffer) -> bytes:
        """``data`` encrypted and authenticated under the primary key."""
        view = memoryview(data)
        nonce = os.urandom(NONCE_LEN)
        header = self.primary_prefix + nonce
        aead = self._aead[self.primary_id]

        def fill(out: memoryview) -> None:
            out[:HEADER_LEN] = header
            aead.encrypt_into(nonce, view, header, out[HEADER_LEN:])

        return _filled(HEADER_LEN + len(view) + TAG_LEN, fill)

    def open(self, blob: Buffer, *, legacy_plaintext: bool = False) -> bytes:
        """The plaintext of a sealed ``blob``; SecretsError if no key of the ring sealed it or
        it was altered. With ``legacy_plaintext``, a blob that is not sealed at all (a tfstate
        stored before encryption at rest) is returned as it is."""
        view = memoryview(blob)
        if bytes(view[: len(MAGIC)]) != MAGIC:
            if legacy_plaintext:
                return bytes(view)
            raise SecretsError("not a sealed blob")
        if len(view) < OVERHEAD:
            raise SecretsError("sealed blob is truncated")
        if view[len(MAGIC)] != FORMAT:
            raise SecretsError(f"sealed blob has an unknown format {view[len(MAGIC)]}")
        key_id = bytes(view[len(MAGIC) + 1 : PREFIX_LEN])
        aead = self._aead.get(key_id)
        if aead is None:
            raise SecretsError(
                f"sealed with key {key_id.hex()}, which is not in {KEY_ENV} ({KEY_FILE}): "
                "add the old key after the new one until `tfdeploy keys rotate` has run"
            )
        nonce, header = bytes(view[PREFIX_LEN:HEADER_LEN]), bytes(view[:HEADER_LEN])
        try:
            return _filled(
                len(view) - OVERHEAD,
                lambda out: aead.decrypt_into(nonce, view[HEADER_LEN:], header, out),
            )
        except InvalidTag:
            raise SecretsError(
                f"sealed blob does not authenticate under key {key_id.hex()}: damaged or altered"
            ) from None


def _filled(size: int, fill: Callable[[memoryview], object]) -> bytes:
    """A new ``bytes`` of ``size`` bytes written by ``fill`` in place. ``AESGCM.encrypt`` and
    ``decrypt`` would return a buffer that then needs copying (a header in front; decrypt keeps
    its own copy until the tag checks), and ``bytes(bytearray)`` copies too. ``BytesIO.getvalue``
    hands over its own buffer when no view of it is left (CPython), so this costs ``size`` once."""
    if size <= 1:  # getvalue copies these anyway; nothing to save
        buf = bytearray(size)
        fill(memoryview(buf))
        return bytes(buf)
    bio = io.BytesIO()
    bio.seek(size - 1)
    bio.write(b"\0")
    with bio.getbuffer() as out:
        fill(out)
    return bio.getvalue()


def prefix_for(key_id: bytes) -> bytes:
    return MAGIC + bytes([FORMAT]) + key_id


class SecretBox:
    """A deploy's secrets, sealed with the key ring (Fernet tokens from before still open)."""

    def __init__(self, key: str | KeyRing) -> None:
        self.keyring = key if isinstance(key, KeyRing) else KeyRing(key)

    def encrypt(self, secrets: Mapping[str, str]) -> bytes:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in secrets.items()):
            raise TypeError("secrets must map str to str")
        data = json.dumps(dict(secrets), sort_keys=True, separators=(",", ":")).encode()
        return bytes(self.keyring.seal(data))

    def decrypt(self, token: bytes | bytearray | memoryview | str) -> dict[str, str]:
        if isinstance(token, str):
            token = token.encode("ascii", "replace")
        data = open_secret(self.keyring, token)
        value = json.loads(data)
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise SecretsError("decrypted secrets are not a str -> str mapping")
        return value


def open_secret(keyring: KeyRing, token: Buffer) -> bytes:
    """The plaintext of a ``deploy_secrets`` ciphertext: sealed by the key ring, or a Fernet
    token written before it (under any key of the ring)."""
    try:
        if KeyRing.is_sealed(token):
            return keyring.open(token)
        return keyring.fernet.decrypt(bytes(memoryview(token)))
    except (SecretsError, InvalidToken):
        raise SecretsError(
            f"cannot decrypt secrets: wrong key ({KEY_ENV} or {KEY_FILE}) or damaged data"
        ) from None


def load_or_create_key(settings: Settings) -> str:
    """``settings.secrets_key`` (validated), else the key in ``<data dir>/secrets.key``,
    generated with mode 0600 the first time and reused after."""
    if settings.secrets_key:
        try:
            KeyRing(settings.secrets_key)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        return settings.secrets_key
    path = settings.data_path / KEY_FILE
    if not path.exists():
        _create_key_file(path)
        if settings.database_url:
            # Another host sharing this database makes a key of its own and cannot open what
            # this one sealed (secrets of queued deploys, states, plans).
            logging.getLogger(__name__).warning(
                "%s is unset: generated a key into %s; with a shared database, every API "
                "process and worker must use one key -- set %s on all of them",
                KEY_ENV, path, KEY_ENV,
            )
    key = path.read_text(encoding="ascii").strip()
    try:
        KeyRing(key)
    except ValueError:
        raise SettingsError(
            f"{path} does not hold a valid secrets key; restore it or set {KEY_ENV}"
        ) from None
    return key


def _create_key_file(path: Path) -> None:
    """Write a new key atomically; if another process got there first, keep its key."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=".secrets.key.", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(generate_key() + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        try:
            os.link(tmp, path)  # fails if the file exists: never overwrite a key
        except FileExistsError:
            pass
        except OSError:  # no hard links on this file system
            with contextlib.suppress(FileExistsError):
                fd2 = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd2, "w", encoding="ascii") as f, open(tmp, encoding="ascii") as src:
                    f.write(src.read())
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


class Masker:
    """Masks a deploy's secret values in log lines; build once per deploy."""

    def __init__(self, secrets: Mapping[str, str] | Iterable[str]) -> None:
        values = secrets.values() if isinstance(secrets, Mapping) else secrets
        needles: set[str] = set()
        for value in values:
            if not isinstance(value, str):
                continue
            for v in _variants(value):
                if len(v) >= MIN_SECRET_LEN:
                    needles.add(v)
        ordered = sorted(needles, key=lambda v: (-len(v), v))
        self._regex = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def __bool__(self) -> bool:
        return self._regex is not None

    def mask(self, text: str) -> str:
        if self._regex is None or not text:
            return text
        return self._regex.sub(MASK, text)

    __call__ = mask


def _variants(value: str) -> Iterable[str]:
    """The value, its JSON-escaped form (terraform prints strings quoted and escaped) and, for a
    multi-line value, each of its lines (logs arrive line by line)."""
    yield value
    yield json.dumps(value, ensure_ascii=False)[1:-1]
    yield json.dumps(value)[1:-1]
    if "\n" in value:
        for line in value.splitlines():
            yield line.strip()


def mask(text: str, secrets: Mapping[str, str]) -> str:
    """``text`` with every secret value of at least 3 characters replaced by ``***``."""
    return Masker(secrets).mask(text)
