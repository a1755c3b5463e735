"""Plugins: entry-point discovery, backend registration, hook calling order."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from gateway_fakes import FakeBackend

from gateway.cli import main
from gateway.context import RequestContext
from gateway.errors import ConfigError
from gateway.hooks import LifecycleHooks
from gateway.hookspecs import hookimpl
from gateway.plugins import load_plugins


def test_in_repo_plugins_come_from_entry_points() -> None:
    plugins = load_plugins()
    assert "openai" in plugins.backends
    for name in ("openai", "auth", "access_log"):
        assert plugins.pm.has_plugin(name)


@pytest.fixture
def dist_on_path(tmp_path: Path) -> Iterator[Path]:
    """A distribution (dist-info + module) on sys.path, as an installed third-party plugin would be."""
    (tmp_path / "tp_plugin.py").write_text(
        "from gateway.hookspecs import hookimpl\n"
        "from gateway_fakes import FakeBackend\n"
        "@hookimpl\n"
        "def register_backends(register):\n"
        "    register('tp-fake', FakeBackend)\n"
    )
    info = tmp_path / "tp_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tp-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[taxiway]\ntp = tp_plugin\n")
    (tmp_path / "broken_plugin-1.0.dist-info").mkdir()
    (tmp_path / "broken_plugin-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 1.0\n")
    (tmp_path / "broken_plugin-1.0.dist-info" / "entry_points.txt").write_text("[taxiway]\nwarp = no_such_module_xyz\n")
    sys.path.insert(0, str(tmp_path))
    yield tmp_path
    sys.path.remove(str(tmp_path))
    sys.modules.pop("tp_plugin", None)


def test_third_party_entry_point_is_discovered(dist_on_path: Path) -> None:
    plugins = load_plugins()
    assert plugins.backends["tp-fake"] is FakeBackend
    assert "warp" in plugins.load_errors  # a broken plugin is reported, not fatal
    with pytest.raises(ConfigError) as info:
        plugins.backend_class("warp", path="models[0].backend")
    assert "failed to load" in str(info.value) and "no_such_module_xyz" in str(info.value)


def test_a_misspelt_hook_fails_loading_naming_plugin_and_hook() -> None:
    class Misspelt:
        @hookimpl
        def before_reqest(self, ctx: RequestContext) -> None:
            pass

    with pytest.raises(ConfigError) as info:
        load_plugins(entry_points=False, extra=[("misspelt", Misspelt())])
    message = str(info.value)
    assert "'misspelt'" in message and "'before_reqest'" in message and "before_request" in message


def test_a_hook_with_an_unknown_argument_fails_loading_naming_the_plugin() -> None:
    class WrongArgs:
        @hookimpl
        def before_request(self, ctx: RequestContext, model: str) -> None:
            pass

    with pytest.raises(ConfigError, match="plugin 'wrong-args'.*before_request.*'model'"):
        load_plugins(entry_points=False, extra=[("wrong-args", WrongArgs())])


def test_an_installed_plugin_with_a_misspelt_hook_stops_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "typo_plugin.py").write_text(
        "from gateway.hookspecs import hookimpl\n"
        "@hookimpl\n"
        "def on_eror(ctx, error):\n"
        "    pass\n"
    )
    info = tmp_path / "typo_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: typo-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[taxiway]\ntypo = typo_plugin\n")
    sys.path.insert(0, str(tmp_path))
    try:
        assert main(["models"]) == 2
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("typo_plugin", None)
    err = capsys.readouterr().err
    assert "plugin 'typo'" in err and "'on_eror'" in err


def test_registering_a_backend_twice_is_an_error() -> None:
    class Twice:
        @hookimpl
        def register_backends(self, register: Callable[..., None]) -> None:
            register("openai", FakeBackend)

    with pytest.raises(ConfigError, match="registered twice"):
        load_plugins(extra=[("twice", Twice())])


def test_registering_a_non_backend_is_an_error() -> None:
    class Bad:
        @hookimpl
        def register_backends(self, register: Callable[..., None]) -> None:
            register("bad", dict)

    with pytest.raises(ConfigError, match="not a Backend"):
        load_plugins(entry_points=False, extra=[("bad", Bad())])


async def test_hooks_run_in_pluggy_order_and_failures_are_contained() -> None:
    order: list[str] = []

    class First:
        @hookimpl(tryfirst=True)
        async def before_request(self, ctx: RequestContext) -> None:
            order.append("first")

        @hookimpl
        def after_request(self, ctx: RequestContext) -> None:
            raise RuntimeError("a broken plugin")

    class Second:
        @hookimpl
        def before_request(self, ctx: RequestContext) -> None:
            order.append("second")

        @hookimpl
        async def after_request(self, ctx: RequestContext) -> None:
            order.append("after")

    plugins = load_plugins(entry_points=False, extra=[("first", First()), ("second", Second())])
    hooks = LifecycleHooks(plugins.pm)
    ctx = RequestContext(request_id="r", endpoint="chat.completions", started_at=0.0)
    await hooks.before_request(ctx)
    await hooks.after_request(ctx, None)  # the RuntimeError is logged, not raised
    assert order == ["first", "second", "after"]
