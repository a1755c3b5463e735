"""The playground's files as the app serves them, and the ``endpoints`` its model pickers read
from ``/v1/models``. The page itself in a real browser: tests/gateway/test_playground_browser.py."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import pytest
from gateway_fakes import FakeBackend, fake_plugins, settings
from litestar.testing import AsyncTestClient

from gateway.app import create_app


@pytest.fixture
async def client() -> AsyncIterator[AsyncTestClient]:
    FakeBackend.instances.clear()
    async with AsyncTestClient(create_app(settings(), plugins=fake_plugins())) as client:
        yield client


async def test_the_page_and_its_files_are_served_from_the_package(client: AsyncTestClient) -> None:
    page = await client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    linked = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert linked == ["/playground/playground.css", "/playground/playground.js"]
    for path, kind in (("/playground/playground.css", "text/css"), ("/playground/playground.js", "text/javascript")):
        response = await client.get(path)
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
        # nothing from elsewhere: no URL with a scheme or a protocol-relative one
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", response.text, re.I), path
    missing = await client.get("/playground/secret.txt")
    assert missing.status_code == 404 and "secret.txt" in missing.json()["error"]["message"]
    assert (await client.post("/")).status_code == 405


async def test_models_say_which_endpoints_they_serve(client: AsyncTestClient) -> None:
    cards = {m["id"]: m["endpoints"] for m in (await client.get("/v1/models")).json()["data"]}
    chat = ["/v1/chat/completions", "/v1/completions"]
    assert cards == {"fake-model": chat, "default": chat, "narrow": [*chat, "/v1/embeddings"]}
