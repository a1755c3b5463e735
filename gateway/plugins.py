"""Finding plugins and collecting what they register.

Every plugin, in-repo or third-party, is a module listed in the entry-point group ``taxiway``.
Loading them fills a ``Plugins``: the pluggy manager, the registered backend types and the CLI
commands.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterable
from typing import Any

import pluggy
import structlog

from gateway import hookspecs
from gateway.errors import ConfigError
from gateway.interface import Backend

log = structlog.get_logger("taxiway.plugins")

ENTRY_POINT_GROUP = "taxiway"

CommandPath = tuple[str, ...]


class Command:
    """A CLI subcommand registered through ``register_commands``."""

    __slots__ = ("configure", "path", "plugin", "run")

    def __init__(
        self, path: CommandPath, configure: Callable[[Any], None], run: Callable[[Any], int], plugin: str
    ) -> None:
        self.path = path
        self.configure = configure
        self.run = run
        self.plugin = plugin


class Plugins:
    """The loaded plugins and what they registered."""

    def __init__(self, pm: pluggy.PluginManager, load_errors: dict[str, str]) -> None:
        self.pm = pm
        #: entry-point names whose module failed to import, with the reason
        self.load_errors = load_errors
        self.backends: dict[str, type[Backend]] = {}
        self._backend_owner: dict[str, str] = {}
        self._commands: list[Command] | None = None
        self._collect_backends()

    def backend_class(self, name: str, *, path: str) -> type[Backend]:
        """The backend type registered as ``name``; ``ConfigError`` at ``path`` when there is none."""
        try:
            return self.backends[name]
        except KeyError:
            registered = ", ".join(sorted(self.backends)) or "none"
            message = f"unknown backend {name!r} (registered backends: {registered})"
            if name in self.load_errors:
                message += f"; the plugin {name!r} failed to load: {self.load_errors[name]}"
            raise ConfigError(message, path=path) from None

    def commands(self) -> list[Command]:
        """CLI commands from every plugin's ``register_commands``, collected once."""
        if self._commands is None:
            commands: list[Command] = []
            for impl in reversed(self.pm.hook.register_commands.get_hookimpls()):

                def register(
                    path: CommandPath,
                    configure: Callable[[Any], None],
                    run: Callable[[Any], int],
                    _plugin: str = impl.plugin_name,
                ) -> None:
                    commands.append(Command(tuple(path), configure, run, _plugin))

                impl.function(register=register)
            self._commands = commands
        return self._commands

    def _collect_backends(self) -> None:
        for impl in reversed(self.pm.hook.register_backends.get_hookimpls()):
            owner = impl.plugin_name

            def register(name: str, backend_cls: type[Backend], _owner: str = owner) -> None:
                if not (isinstance(backend_cls, type) and issubclass(backend_cls, Backend)):
                    raise ConfigError(f"plugin {_owner!r} registered {name!r} with a class that is not a Backend")
                if not isinstance(getattr(backend_cls, "Options", None), type):
                    raise ConfigError(f"backend {name!r} (plugin {_owner!r}) has no Options struct")
                if name in self.backends:
                    raise ConfigError(
                        f"backend {name!r} is registered twice: by {self._backend_owner[name]!r} and {_owner!r}"
                    )
                self.backends[name] = backend_cls
                self._backend_owner[name] = _owner

            impl.function(register=register)


def load_plugins(*, entry_points: bool = True, extra: Iterable[tuple[str, object]] = ()) -> Plugins:
    """Load the ``taxiway`` entry points (unless ``entry_points`` is false) and ``extra`` plugins.

    A plugin module that fails to import is logged and remembered, not fatal: a config naming one
    of its backends then fails with the reason. A plugin that imports but implements a hook wrongly
    (a name no spec has, an argument its spec lacks) is a ``ConfigError`` naming the plugin.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    load_errors: dict[str, str] = {}
    if entry_points:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if pm.has_plugin(ep.name) or ep.name in load_errors:
                continue  # the same distribution seen twice on sys.path
            try:
                plugin = ep.load()
            except Exception as exc:  # any import failure of a plugin is reported, not fatal
                load_errors[ep.name] = f"{type(exc).__name__}: {exc}"
                log.warning("plugin.load_failed", plugin=ep.name, target=ep.value, error=load_errors[ep.name])
                continue
            _register(pm, plugin, ep.name)
    for name, plugin in extra:
        _register(pm, plugin, name)
    _check_hook_names(pm)
    return Plugins(pm, load_errors)


def _register(pm: pluggy.PluginManager, plugin: object, name: str) -> None:
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:  # e.g. an argument its hook's spec does not have
        message = str(exc).replace("\n", "; ")
        raise ConfigError(f"plugin {name!r} has an invalid hook implementation: {message}") from exc


def _check_hook_names(pm: pluggy.PluginManager) -> None:
    """``ConfigError`` naming the plugin and the hook when an implementation matches no spec.

    pluggy never calls such an implementation: without this check a misspelt hook
    (``before_reqest``) would be silently ignored.
    """
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        callers = {name: caller for name, caller in vars(pm.hook).items() if not name.startswith("_")}
        unknown = sorted(
            name
            for name, caller in callers.items()
            if not caller.has_spec() and any(impl.plugin is exc.plugin for impl in caller.get_hookimpls())
        )
        known = ", ".join(sorted(name for name, caller in callers.items() if caller.has_spec()))
        raise ConfigError(
            f"plugin {pm.get_name(exc.plugin)!r} implements {', '.join(map(repr, unknown))}, which is no hook of"
            f" Taxiway (misspelt?); the hooks are: {known}"
        ) from exc
