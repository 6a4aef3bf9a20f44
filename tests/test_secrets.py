"""Secrets at rest (SecretBox, the key file) and masking in logs."""

from __future__ import annotations

import json
import stat
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.secrets import (
    KEY_FILE,
    Masker,
    SecretBox,
    SecretsError,
    generate_key,
    load_or_create_key,
    mask,
)
from service.settings import Settings, SettingsError


def test_secret_box_round_trip() -> None:
    box = SecretBox(generate_key())
    secrets = {"db_password": "hunter2-xyz", "token": "t0k€n with spaces", "empty": ""}
    token = box.encrypt(secrets)
    assert isinstance(token, bytes)
    assert b"hunter2" not in token and b"db_password" not in token
    assert box.decrypt(token) == secrets
    assert box.decrypt(memoryview(token)) == secrets  # as psycopg returns bytea
    assert box.encrypt(secrets) != token  # random IV: equal inputs give different tokens
    assert box.decrypt(box.encrypt({})) == {}


def test_wrong_key_fails_clearly() -> None:
    token = SecretBox(generate_key()).encrypt({"a": "secret-value"})
    with pytest.raises(SecretsError, match="wrong key") as err:
        SecretBox(generate_key()).decrypt(token)
    assert "secret-value" not in str(err.value)
    with pytest.raises(SecretsError):
        SecretBox(generate_key()).decrypt(token[:-3] + b"xyz")


def test_invalid_key_is_refused() -> None:
    for bad in ("", "short", "x" * 44, "not base64 at all !!!!!!!!!!!!!!!!!!!!!!!!"):
        with pytest.raises(ValueError, match="TFDEPLOY_SECRETS_KEY"):
            SecretBox(bad)
    with pytest.raises(TypeError):
        SecretBox(generate_key()).encrypt({"a": 1})  # type: ignore[dict-item]


def test_key_rotation() -> None:
    old, new = generate_key(), generate_key()
    token = SecretBox(old).encrypt({"a": "b"})
    both = SecretBox(f"{new},{old}")
    assert both.decrypt(token) == {"a": "b"}
    assert SecretBox(new).decrypt(both.encrypt({"c": "d"})) == {"c": "d"}


def test_key_from_settings(tmp_path) -> None:
    key = generate_key()
    settings = Settings(secrets_key=key, data_dir=str(tmp_path / "data"))
    assert load_or_create_key(settings) == key
    assert not (tmp_path / "data").exists()  # nothing written when the key is configured
    with pytest.raises(SettingsError, match="TFDEPLOY_SECRETS_KEY") as err:
        load_or_create_key(Settings(secrets_key="nope-not-a-key", data_dir=str(tmp_path)))
    assert "nope-not-a-key" not in str(err.value)


def test_key_file_created_0600_and_reused(tmp_path) -> None:
    settings = Settings(data_dir=str(tmp_path / "data"))
    key = load_or_create_key(settings)
    path = tmp_path / "data" / KEY_FILE
    assert path.read_text().strip() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(settings) == key
    SecretBox(key).decrypt(SecretBox(load_or_create_key(settings)).encrypt({"a": "b"}))
    assert [p.name for p in (tmp_path / "data").iterdir()] == [KEY_FILE]  # no temp files left


def test_key_file_created_once_under_concurrency(tmp_path) -> None:
    settings = Settings(data_dir=str(tmp_path / "data"))
    with ThreadPoolExecutor(8) as pool:
        keys = set(pool.map(lambda _: load_or_create_key(settings), range(16)))
    assert len(keys) == 1


def test_damaged_key_file_is_reported(tmp_path) -> None:
    (tmp_path / KEY_FILE).write_text("garbage\n")
    with pytest.raises(SettingsError, match="TFDEPLOY_SECRETS_KEY"):
        load_or_create_key(Settings(data_dir=str(tmp_path)))


def test_mask_every_occurrence_and_nothing_else() -> None:
    secrets = {"password": "hunter2", "token": "abc", "short": "ab", "empty": ""}
    line = "user=admin password=hunter2 again:hunter2 token abc! ab stays, abcd -> "
    assert mask(line, secrets) == "user=admin password=*** again:*** token ***! ab stays, ***d -> "
    assert mask("nothing secret here", secrets) == "nothing secret here"
    assert mask("", secrets) == ""
    assert mask("hunter2", {}) == "hunter2"


def test_masker_longest_first_and_special_characters() -> None:
    m = Masker({"a": "secret", "b": "secret-longer", "c": "a.b*c(d)", "d": "$1\\2"})
    assert m.mask("secret-longer secret") == "*** ***"
    assert m("x a.b*c(d) y axbxc(d) $1\\2") == "x *** y axbxc(d) ***"
    assert not Masker({}) and Masker({"x": "xyz"})
    assert Masker({}).mask("a line") == "a line"


def test_masker_catches_what_terraform_prints() -> None:
    secret = 'p"ss\\word'
    quoted = json.dumps({"v": secret})  # how terraform shows a string value
    assert secret not in Masker({"x": secret}).mask(quoted)
    assert Masker({"x": secret}).mask(quoted) == '{"v": "***"}'
    pem = "-----BEGIN KEY-----\nMIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX\n-----END KEY-----"
    m = Masker({"key": pem})
    for line in pem.splitlines():  # logs arrive line by line
        assert m.mask(f"  {line}") == "  ***"
