"""Model name or alias → the backend instance serving it."""

from __future__ import annotations

from gateway.config import Settings, convert_table, join_path
from gateway.errors import ConfigError, ModelNotFoundError
from gateway.interface import Backend
from gateway.plugins import Plugins


class Route:
    """One configured model: its public name, aliases and backend instance."""

    __slots__ = ("aliases", "backend", "backend_name", "name")

    def __init__(self, name: str, aliases: tuple[str, ...], backend_name: str, backend: Backend) -> None:
        self.name = name
        self.aliases = aliases
        self.backend_name = backend_name
        self.backend = backend


class Router:
    def __init__(self, routes: list[Route]) -> None:
        self.routes = tuple(routes)
        self._by_name: dict[str, Route] = {}
        for route in routes:
            for name in (route.name, *route.aliases):
                assert name not in self._by_name, "config validation guarantees unique names"
                self._by_name[name] = route

    def resolve(self, model: str) -> Route:
        """The route for a model name or alias; ``ModelNotFoundError`` (404) naming it otherwise."""
        route = self._by_name.get(model)
        if route is None:
            raise ModelNotFoundError(f"The model '{model}' does not exist", param="model")
        return route

    def get(self, model: str) -> Route | None:
        return self._by_name.get(model)


def build_router(settings: Settings, plugins: Plugins) -> Router:
    """Instantiate one backend per model entry. Cheap: backends do heavy work in ``start``.

    Raises ``ConfigError`` naming ``models[i].backend`` for an unknown backend and
    ``models[i].options.…`` for options the backend rejects.
    """
    routes = []
    for i, entry in enumerate(settings.models):
        backend_cls = plugins.backend_class(entry.backend, path=f"models[{i}].backend")
        options_path = f"models[{i}].options"
        options = convert_table(entry.options, backend_cls.Options, options_path)
        try:
            backend = backend_cls(entry.name, options)
        except ConfigError as exc:
            # A backend names the option relative to its own table ("base_url").
            path = exc.path or ""
            full = path if path.startswith("models[") else join_path(options_path, path)
            message = str(exc)[len(f"{exc.path}: ") :] if exc.path else str(exc)
            raise ConfigError(message, path=full) from exc
        routes.append(Route(entry.name, entry.aliases, entry.backend, backend))
    return Router(routes)
