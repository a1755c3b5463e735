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


class SitePackages:
    """A folder on sys.path where tests install distributions as pip would (dist-info + module)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.modules: list[str] = []

    def install(self, dist: str, entry_point: str, module_source: str | None = None) -> None:
        """Install ``dist`` declaring ``entry_point`` ("name = module") in the taxiway group."""
        if module_source is not None:
            module = entry_point.partition("=")[2].strip()
            (self.root / f"{module}.py").write_text(module_source)
            self.modules.append(module)
        info = self.root / f"{dist.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[taxiway]\n{entry_point}\n")


@pytest.fixture
def site_packages(tmp_path: Path) -> Iterator[SitePackages]:
    site = SitePackages(tmp_path)
    sys.path.insert(0, str(tmp_path))
    yield site
    sys.path.remove(str(tmp_path))
    for module in site.modules:
        sys.modules.pop(module, None)


@pytest.fixture
def dist_on_path(site_packages: SitePackages) -> SitePackages:
    """A working third-party plugin and one whose module is missing, as installed distributions."""
    site_packages.install(
        "tp-plugin",
        "tp = tp_plugin",
        "from gateway.hookspecs import hookimpl\n"
        "from gateway_fakes import FakeBackend\n"
        "@hookimpl\n"
        "def register_backends(register):\n"
        "    register('tp-fake', FakeBackend)\n",
    )
    site_packages.install("broken", "warp = no_such_module_xyz")
    return site_packages


def test_third_party_entry_point_is_discovered(dist_on_path: SitePackages) -> None:
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
    site_packages: SitePackages, capsys: pytest.CaptureFixture[str]
) -> None:
    source = "from gateway.hookspecs import hookimpl\n@hookimpl\ndef on_eror(ctx, error):\n    pass\n"
    site_packages.install("typo-plugin", "typo = typo_plugin", source)
    assert main(["models"]) == 2
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
