"""Secrets at rest and in logs.

``SecretBox`` encrypts a deploy's secrets (Fernet: AES-128-CBC + HMAC-SHA256, authenticated) before
they reach the database. The key is ``TFDEPLOY_SECRETS_KEY`` or, when unset, a key generated once
into ``<data dir>/secrets.key`` (mode 0600). ``TFDEPLOY_SECRETS_KEY`` may list several keys
separated by commas: the first encrypts, all decrypt (key rotation).

``Masker`` replaces secret values in terraform output by ``***``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from service.settings import Settings, SettingsError

KEY_ENV = "TFDEPLOY_SECRETS_KEY"
KEY_FILE = "secrets.key"
MASK = "***"
MIN_SECRET_LEN = 3


class SecretsError(Exception):
    """Secrets could not be decrypted (wrong key or damaged data)."""


def generate_key() -> str:
    return Fernet.generate_key().decode("ascii")


class SecretBox:
    def __init__(self, key: str) -> None:
        keys = [k.strip() for k in (key or "").split(",") if k.strip()]
        if not keys:
            raise ValueError(f"empty secrets key; {KEY_ENV} must be a Fernet key")
        try:
            self._fernet = MultiFernet([Fernet(k.encode("ascii")) for k in keys])
        except (ValueError, UnicodeEncodeError):
            raise ValueError(
                f"invalid secrets key: {KEY_ENV} must be 32 url-safe base64-encoded bytes "
                "(a Fernet key, e.g. from `python -c 'from cryptography.fernet import Fernet; "
                "print(Fernet.generate_key().decode())'`)"
            ) from None

    def encrypt(self, secrets: Mapping[str, str]) -> bytes:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in secrets.items()):
            raise TypeError("secrets must map str to str")
        data = json.dumps(dict(secrets), sort_keys=True, separators=(",", ":")).encode()
        return self._fernet.encrypt(data)

    def decrypt(self, token: bytes | memoryview | str) -> dict[str, str]:
        if isinstance(token, memoryview):
            token = token.tobytes()
        try:
            data = self._fernet.decrypt(token)
        except InvalidToken:
            raise SecretsError(
                f"cannot decrypt secrets: wrong key ({KEY_ENV} or {KEY_FILE}) or damaged data"
            ) from None
        value = json.loads(data)
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise SecretsError("decrypted secrets are not a str -> str mapping")
        return value


def load_or_create_key(settings: Settings) -> str:
    """``settings.secrets_key`` (validated), else the key in ``<data dir>/secrets.key``,
    generated with mode 0600 the first time and reused after."""
    if settings.secrets_key:
        try:
            SecretBox(settings.secrets_key)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        return settings.secrets_key
    path = settings.data_path / KEY_FILE
    if not path.exists():
        _create_key_file(path)
    key = path.read_text(encoding="ascii").strip()
    try:
        SecretBox(key)
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
