"""API-key auth: hashed keys from config or env, 401 in OpenAI's shape, open without keys."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from gateway.config import parse_settings
from gateway.errors import ConfigError
from plugins import auth

CONFIG = """
[[models]]
name = "fake-model"
backend = "fake"

[plugins.auth]
keys = ["${KEYS}"]
key_hashes = ["{hash}"]
"""
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


def _settings(keys: str, hashed: str = "sk-from-hash") -> object:
    return parse_settings(CONFIG.replace("{hash}", auth.hash_key(hashed)), env={"KEYS": keys})


@pytest.fixture
async def client() -> AsyncIterator[AsyncTestClient]:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gateway"))
    from gateway_fakes import fake_plugins

    app = create_app(_settings("sk-one, sk-two"), plugins=fake_plugins())  # type: ignore[arg-type]
    async with AsyncTestClient(app) as client:
        yield client


async def test_missing_or_wrong_key_is_401(client: AsyncTestClient) -> None:
    for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": "Basic sk-one"}):
        response = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert response.status_code == 401
        error = response.json()["error"]
        assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
    assert (await client.get("/v1/models")).status_code == 401
    assert (await client.get("/health")).status_code == 200  # not an API route
    assert (await client.get("/ready")).status_code == 200


async def test_keys_from_env_and_hashes_are_accepted(client: AsyncTestClient) -> None:
    for key in ("sk-one", "sk-two", "sk-from-hash"):
        response = await client.post("/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {key}"})
        assert response.status_code == 200, key


def test_only_digests_are_kept() -> None:
    auth.plugin_configure(_settings("sk-plain"))  # type: ignore[arg-type]
    assert all(len(d) == 32 for d in auth._state.digests)
    assert b"sk-plain" not in b"".join(auth._state.digests)


def test_open_without_keys() -> None:
    auth.plugin_configure(parse_settings('[[models]]\nname = "m"\nbackend = "x"\n', env={}))
    assert auth._state.digests == ()
    auth.authenticate(ctx=None, headers={})  # type: ignore[arg-type]  # no error


def test_bad_hash_names_the_key() -> None:
    text = '[[models]]\nname = "m"\nbackend = "x"\n[plugins.auth]\nkey_hashes = ["md5:abc"]\n'
    with pytest.raises(ConfigError) as info:
        auth.plugin_configure(parse_settings(text, env={}))
    assert info.value.path == "plugins.auth.key_hashes[0]"
    text = '[[models]]\nname = "m"\nbackend = "x"\n[plugins.auth]\nkeyz = ["a"]\n'
    with pytest.raises(ConfigError) as info:
        auth.plugin_configure(parse_settings(text, env={}))
    assert info.value.path == "plugins.auth.keyz"
