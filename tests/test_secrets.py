"""Encryption at rest (the key ring, SecretBox, the key file) and masking in logs."""

from __future__ import annotations

import json
import os
import stat
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import pytest
from cryptography.fernet import Fernet

from service.secrets import (
    HEADER_LEN,
    KEY_FILE,
    OVERHEAD,
    KeyRing,
    Masker,
    SecretBox,
    SecretsError,
    generate_key,
    load_or_create_key,
    mask,
)
from service.settings import Settings, SettingsError

# -- the key ring ---------------------------------------------------------------------------------


def test_seal_open_round_trip_sizes_and_randomness() -> None:
    ring = KeyRing(generate_key())
    for data in (b"", b"x", b'{"serial": 1, "password": "hunter2"}', os.urandom(100_000)):
        sealed = ring.seal(data)
        assert isinstance(sealed, bytes) and len(sealed) == len(data) + OVERHEAD  # no base64
        assert sealed.startswith(ring.primary_prefix)
        assert ring.open(sealed) == data and ring.open(memoryview(sealed)) == data
        assert ring.seal(data) != sealed  # a fresh nonce each time
    assert b"hunter2" not in ring.seal(b'{"password": "hunter2"}')


def test_key_ids_name_keys_without_revealing_them() -> None:
    key = generate_key()
    a, b = KeyRing(key), KeyRing(key)
    assert a.key_ids == b.key_ids and len(a.primary_id) == 8
    assert a.primary_id != KeyRing(generate_key()).primary_id
    assert a.primary_id.hex() not in key and a.primary_id not in Fernet(key)._signing_key
    sealed = a.seal(b"data")
    assert KeyRing.key_id_of(sealed) == a.primary_id and KeyRing.is_sealed(sealed)
    assert KeyRing.key_id_of(b'{"version": 4}') is None and not KeyRing.is_sealed(b"{}")
    assert a.sealed_with_primary(sealed)


def test_every_key_opens_the_first_seals() -> None:
    old, new = generate_key(), generate_key()
    sealed_old = KeyRing(old).seal(b"state one")
    ring = KeyRing(f" {new} , {old},{new}")  # blanks and repeats are ignored
    assert len(ring.key_ids) == 2 and ring.primary_id == KeyRing(new).primary_id
    assert ring.open(sealed_old) == b"state one"
    assert not ring.sealed_with_primary(sealed_old)
    sealed_new = ring.seal(b"state two")
    assert KeyRing(new).open(sealed_new) == b"state two"
    with pytest.raises(SecretsError, match=f"key {KeyRing(new).primary_id.hex()}.*not in") as err:
        KeyRing(old).open(sealed_new)
    assert new not in str(err.value) and old not in str(err.value)


def test_any_change_to_a_sealed_blob_is_refused() -> None:
    ring = KeyRing(generate_key())
    sealed = ring.seal(b"the state of a workspace")
    # Every byte is covered: the header (authenticated data), the ciphertext and the tag.
    for i in range(len(sealed)):
        altered = bytearray(sealed)
        altered[i] ^= 0x01
        with pytest.raises(SecretsError):
            ring.open(bytes(altered))
    for cut in (sealed[:-1], sealed[: OVERHEAD - 1], sealed[:HEADER_LEN]):
        with pytest.raises(SecretsError):
            ring.open(cut)
    other_format = sealed[:4] + b"\x02" + sealed[5:]
    with pytest.raises(SecretsError, match="format"):
        ring.open(other_format)


def test_plain_text_opens_only_when_allowed() -> None:
    ring = KeyRing(generate_key())
    with pytest.raises(SecretsError, match="not a sealed"):
        ring.open(b'{"version": 4}')
    assert ring.open(b'{"version": 4}', legacy_plaintext=True) == b'{"version": 4}'
    # A blob that says it is sealed is never taken for plain text.
    with pytest.raises(SecretsError):
        ring.open(ring.seal(b"x")[:-1], legacy_plaintext=True)


def test_seal_and_open_hold_no_more_than_the_input_and_the_output() -> None:
    """A 64 MiB tfstate: sealing and opening allocate the result once, no extra copy."""
    ring = KeyRing(generate_key())
    data = os.urandom(64 * 2**20)
    tracemalloc.start()
    try:
        sealed = ring.seal(data)
        _, seal_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        held, _ = tracemalloc.get_traced_memory()  # the sealed blob
        opened = ring.open(sealed)
        open_peak = tracemalloc.get_traced_memory()[1] - held
    finally:
        tracemalloc.stop()
    assert opened == data
    assert seal_peak < len(data) * 1.1 and open_peak < len(data) * 1.1, (seal_peak, open_peak)


def test_invalid_keys_are_refused_by_the_key_ring() -> None:
    for bad in ("", " , ", "short", "x" * 44, generate_key()[:-4]):
        with pytest.raises(ValueError, match="TFDEPLOY_SECRETS_KEY"):
            KeyRing(bad)
    with pytest.raises(ValueError, match="TFDEPLOY_SECRETS_KEY"):
        KeyRing(f"{generate_key()},not-a-key")


# -- SecretBox ------------------------------------------------------------------------------------


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


def test_secrets_are_sealed_and_fernet_tokens_from_before_still_open() -> None:
    old, new = generate_key(), generate_key()
    box = SecretBox(KeyRing(f"{new},{old}"))
    assert box.encrypt({"a": "b"}).startswith(box.keyring.primary_prefix)
    # What the previous version stored: a Fernet token, under the old key or the new one.
    for key in (old, new):
        legacy = Fernet(key.encode()).encrypt(b'{"token":"hunter2"}')
        assert box.decrypt(legacy) == {"token": "hunter2"}
        assert box.decrypt(memoryview(legacy)) == {"token": "hunter2"}
        assert box.decrypt(legacy.decode()) == {"token": "hunter2"}
    with pytest.raises(SecretsError, match="wrong key"):
        SecretBox(generate_key()).decrypt(Fernet(old.encode()).encrypt(b"{}"))


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
