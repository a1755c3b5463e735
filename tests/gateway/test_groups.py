"""Groups and fallbacks in-process (fake backends, litestar's test client) and their config keys."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from gateway_fakes import FakeBackend, HookRecorder, fake_plugins, settings
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from gateway.cli import main
from gateway.config import parse_settings
from gateway.errors import ConfigError, InvalidRequestError, RateLimitError, UpstreamError, UpstreamTimeoutError
from gateway.fleet import Fleet, read_config

CHAT = "/v1/chat/completions"

CONFIG = """
[[models]]
name = "g"
aliases = ["default"]
backend = "fake"
fallbacks = ["spare"]

[[models]]
name = "g"
aliases = ["default"]
backend = "fake"
cooldown_s = 60

[[models]]
name = "spare"
backend = "fake"
options = { embeddings = true }
fallbacks = ["g"]
"""


def _chat(model: str = "g", **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hello world"}], **extra}


@pytest.fixture
def recorder() -> HookRecorder:
    return HookRecorder()


@pytest.fixture
async def client(recorder: HookRecorder) -> AsyncIterator[AsyncTestClient]:
    """The app on ``CONFIG``: a group ``g`` of two fakes falling back to ``spare``, and back."""
    FakeBackend.instances.clear()
    async with AsyncTestClient(create_app(settings(CONFIG), plugins=fake_plugins(("recorder", recorder)))) as client:
        yield client


def _backends() -> tuple[FakeBackend, FakeBackend, FakeBackend]:
    g1, g2, spare = FakeBackend.instances
    return g1, g2, spare


async def test_a_group_spreads_requests_and_lists_once(client: AsyncTestClient) -> None:
    g1, g2, _ = _backends()
    for _ in range(6):
        response = await client.post(CHAT, json=_chat("default"))
        assert response.json()["model"] == "g" and response.headers["x-taxiway-model"] == "g"
    assert len(g1.requests) == len(g2.requests) == 3  # no request in flight: ties in turn
    models = (await client.get("/v1/models")).json()["data"]
    assert [m["id"] for m in models] == ["g", "default", "spare"]
    admin = (await client.get("/admin/models")).json()["data"]
    assert [row["name"] for row in admin] == ["g", "g", "spare"]


async def test_a_failing_deployment_fails_over_and_cools_down(client: AsyncTestClient, recorder: HookRecorder) -> None:
    g1, g2, spare = _backends()
    g1.fail_with = UpstreamError("connection refused")
    for stream in (False, True, False, True):
        response = await client.post(CHAT, json=_chat(stream=stream))
        assert response.status_code == 200 and "echo:" in response.text
        assert response.headers["x-taxiway-model"] == "g"
    assert len(g1.requests) == 1 and len(g2.requests) == 4  # cooled down after its first failure
    assert [c[0] for c in recorder.calls].count("on_error") == 0
    # the whole group failing: the fallback answers, under its own name
    g2.fail_with = UpstreamTimeoutError("too slow")
    response = await client.post(CHAT, json=_chat())
    assert response.json()["model"] == "spare" and response.headers["x-taxiway-model"] == "spare"
    streamed = await client.post(CHAT, json=_chat(stream=True))
    assert '"model":"spare"' in streamed.text and streamed.headers["x-taxiway-model"] == "spare"
    assert recorder.calls[-1][0] == "after_request"
    assert len(spare.requests) == 2


async def test_what_is_not_retried(client: AsyncTestClient) -> None:
    g1, g2, spare = _backends()
    # a client error is the model's answer: not tried elsewhere
    g1.fail_with = g2.fail_with = InvalidRequestError("bad prompt", param="messages")
    response = await client.post(CHAT, json=_chat())
    assert response.status_code == 400 and not spare.requests
    assert len(g1.requests) + len(g2.requests) == 1
    # after the first item nothing is retried: the stream ends with an error event
    g1.fail_with = g2.fail_with = None
    g1.fail_after = g2.fail_after = (1, UpstreamError("lost"))
    response = await client.post(CHAT, json=_chat(stream=True))
    assert response.status_code == 200 and '"error"' in response.text and not spare.requests
    # a whole response failing half-way was never sent: tried again elsewhere
    response = await client.post(CHAT, json=_chat())
    assert response.status_code == 200 and response.json()["model"] == "spare"


async def test_rate_limited_everywhere_answers_the_last_error(client: AsyncTestClient) -> None:
    for backend in _backends():
        backend.fail_with = RateLimitError("slow down", retry_after=3)
    response = await client.post(CHAT, json=_chat())
    assert response.status_code == 429 and response.headers["retry-after"] == "3"
    assert all(len(b.requests) == 1 for b in _backends())  # each candidate once, the cycle included
    assert "x-taxiway-model" not in response.headers


async def test_a_fallback_without_the_capability_is_skipped(client: AsyncTestClient) -> None:
    g1, g2, spare = _backends()
    # spare's embeddings fail; g lacks embeddings: the request stays on spare's error
    original = spare.embed

    async def failing(request: object) -> object:
        raise UpstreamError("down")

    spare.embed = failing  # type: ignore[method-assign]
    response = await client.post("/v1/embeddings", json={"model": "spare", "input": ["a"]})
    assert response.status_code == 502
    spare.embed = original  # type: ignore[method-assign]
    response = await client.post("/v1/embeddings", json={"model": "spare", "input": ["a"]})
    assert response.status_code == 200 and response.headers["x-taxiway-model"] == "spare"


async def test_unloaded_deployment_is_skipped(client: AsyncTestClient) -> None:
    g1, g2, _ = _backends()
    fleet_route = (await client.post("/admin/models/g/unload")).json()
    assert fleet_route["state"] == "unloaded"  # the group's first deployment
    for _ in range(3):
        assert (await client.post(CHAT, json=_chat())).status_code == 200
    assert not g1.requests and len(g2.requests) == 3


def test_config_keys() -> None:
    parsed = parse_settings(CONFIG, env={})
    assert [m.cooldown_s for m in parsed.models] == [30.0, 60.0, 30.0]
    assert parsed.models[0].fallbacks == ("spare",)

    def error(text: str) -> ConfigError:
        with pytest.raises(ConfigError) as info:
            parse_settings(text, env={})
        return info.value

    entry = '[[models]]\nname = "{}"\nbackend = "fake"\n'
    assert error(entry.format("a") + 'fallbacks = ["a", "nope"]\n').path == "models[0].fallbacks[1]"
    assert error(entry.format("a") + "cooldown_s = -1\n").path == "models[0].cooldown_s"
    assert error(entry.format("a") + 'aliases = ["x"]\n' + entry.format("b") + 'aliases = ["x"]\n').path == (
        "models[1].aliases[0]"
    )
    assert error(entry.format("a") + entry.format("b") + 'aliases = ["a"]\n').path == "models[1].aliases[0]"
    assert error(entry.format("a") + 'aliases = ["b"]\n' + entry.format("b")).path == "models[1].name"
    assert error(entry.format("a") + 'aliases = ["a"]\n').path == "models[0].aliases[0]"


async def test_a_parameter_the_requested_model_lacks_is_its_answer() -> None:
    FakeBackend.instances.clear()
    config = CONFIG.replace('backend = "fake"\nfallbacks = ["spare"]', 'backend = "fake"\nfallbacks = ["spare"]\noptions = { max_n = 1 }')
    config = config.replace('cooldown_s = 60', 'cooldown_s = 60\noptions = { max_n = 1 }')
    app = create_app(settings(config), plugins=fake_plugins())
    async with AsyncTestClient(app) as client:
        response = await client.post(CHAT, json=_chat(n=2))
        assert response.status_code == 400 and response.json()["error"]["param"] == "n"
        assert not any(b.requests for b in FakeBackend.instances)  # not sent to the fallback


def test_check_config_names_the_fallback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[[models]]\nname = "a"\nbackend = "openai"\noptions = { base_url = "http://x/v1" }\n'
                    'fallbacks = ["a", "missing"]\n')  # fmt: skip
    assert main(["check-config", str(path)]) != 0
    assert "models[0].fallbacks[1]: unknown model 'missing'" in capsys.readouterr().err
    path.write_text(path.read_text().replace('"missing"', '"a"') * 2)  # a group of two, a self cycle
    assert main(["check-config", str(path)]) == 0


async def test_a_reload_keeps_health_and_takes_new_fallbacks(tmp_path: Path) -> None:
    FakeBackend.instances.clear()
    path = tmp_path / "config.toml"
    path.write_text(CONFIG)
    plugins = fake_plugins()
    settings_, router = read_config(path, plugins)
    fleet = Fleet(router, lambda: read_config(path, plugins), ready_timeout_s=5)
    await fleet.start()
    g1 = fleet.router.routes[0]
    g1.health.failed(0.0, 30, "down")
    path.write_text(CONFIG.replace('fallbacks = ["spare"]', "fallbacks = []").replace("cooldown_s = 60", "cooldown_s = 5"))
    result = await fleet.reload()
    assert result.unchanged == ["g", "g", "spare"] and not result.added
    assert fleet.router.routes[0] is g1 and g1.health.reason == "down"
    assert [g.name for g in fleet.router.chain("g")] == ["g"] and fleet.router.routes[1].cooldown_s == 5
    await fleet.stop()
