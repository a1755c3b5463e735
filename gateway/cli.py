"""The ``taxiway`` command line.

Every subcommand, built-in or from a plugin, is registered through the ``register_commands``
hook with a path tuple: ``("serve",)``, ``("bench", "gateway")``. Commands sharing a first word
become one group (``taxiway bench gateway``, ``taxiway bench engine``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from gateway.config import ModelEntry, Settings, convert_table, load_settings
from gateway.errors import ConfigError
from gateway.hookspecs import hookimpl
from gateway.plugins import Command, Plugins, load_plugins
from gateway.fleet import read_config
from gateway.router import Route


def main(argv: Sequence[str] | None = None) -> int:
    try:
        plugins = load_plugins(extra=[("gateway.cli", _Builtins())])
        parser = build_parser(plugins.commands())
    except (ConfigError, ValueError) as exc:
        print(f"taxiway: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    run: Callable[[Any], int] | None = getattr(args, "_run", None)
    if run is None:
        parser.print_help()
        return 2
    args.plugins = plugins
    try:
        return int(run(args) or 0)
    except ConfigError as exc:
        print(f"taxiway: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


#: the help line of a command group (otherwise "NAME commands")
GROUP_HELP = {("bench",): "measure the gateway, the engine, batching, any OpenAI server… (taxiway bench --help)"}


def build_parser(commands: list[Command]) -> argparse.ArgumentParser:
    """An argparse tree from command paths; ``ValueError`` when two commands claim one path."""
    parser = argparse.ArgumentParser(prog="taxiway", description="Taxiway: an OpenAI-compatible LLM gateway")
    parser.add_argument("--version", action="version", version=f"taxiway {_version()}")
    groups: dict[tuple[str, ...], Any] = {(): parser.add_subparsers(title="commands", metavar="COMMAND")}
    leaves: dict[tuple[str, ...], str] = {}
    for command in sorted(commands, key=lambda c: c.path):
        if not command.path:
            raise ValueError(f"plugin {command.plugin!r} registered a command with an empty path")
        if command.path in leaves or command.path in groups:
            raise ValueError(f"command {' '.join(command.path)!r} is registered twice ({command.plugin!r})")
        for depth in range(1, len(command.path)):
            prefix = command.path[:depth]
            if prefix in leaves:
                raise ValueError(f"command {' '.join(prefix)!r} cannot also be a group ({command.plugin!r})")
            if prefix not in groups:
                group_help = GROUP_HELP.get(prefix, f"{' '.join(prefix)} commands (taxiway {' '.join(prefix)} --help)")
                group_parser = groups[prefix[:-1]].add_parser(prefix[-1], help=group_help)
                groups[prefix] = group_parser.add_subparsers(title="commands", metavar="COMMAND")
        doc = (command.run.__doc__ or "").strip().splitlines()
        sub = groups[command.path[:-1]].add_parser(command.path[-1], help=doc[0] if doc else None)
        command.configure(sub)
        sub.set_defaults(_run=command.run)
        leaves[command.path] = command.plugin
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("taxiway")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


# ---------------------------------------------------------------------------------------------
# built-in commands


def _configure_serve(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Serve the OpenAI-compatible API (and the playground page at /). With MODEL, serve that one model "
        "with no config; with --config, the models the file lists; with neither, the default chat model and "
        "the default embedding model. A catalogue model is downloaded on first use, with progress shown."
    )
    parser.add_argument(
        "model", nargs="?", metavar="MODEL",
        help="a catalogue name (see `taxiway pull --list`), a .gguf file or a Hugging Face model directory",
    )  # fmt: skip
    parser.add_argument(
        "--config", metavar="FILE",
        help="TOML config (default: the built-in default model), read again on SIGHUP and POST /admin/reload",
    )  # fmt: skip
    parser.add_argument(
        "--api-key", action="append", metavar="KEY",
        help="require this API key (Authorization: Bearer KEY); repeat for several. Adds to the config's keys",
    )  # fmt: skip
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="default: log.level (info)")
    parser.add_argument("--host", help="bind address (default 127.0.0.1 or server.host)")
    parser.add_argument("--port", type=int, help="port (default 8000 or server.port)")
    parser.add_argument("--log-format", choices=("auto", "json", "console"), help="default: log.format")
    parser.add_argument(
        "--watch", nargs="?", type=float, const=1.0, metavar="SECONDS",
        help="reload the config when the file changes, checked every SECONDS (default 1); needs --config",
    )  # fmt: skip


def _serve(args: argparse.Namespace) -> int:
    """Serve a model, or a config's models: the OpenAI-compatible API and the playground at /."""
    from gateway.app import create_app
    from gateway.logs import configure_logging
    from gateway.server import serve

    if args.watch is not None and (args.config is None or args.watch <= 0):
        raise ConfigError("--watch needs --config and a positive interval")
    if args.model is not None and args.config is not None:
        raise ConfigError("give a MODEL or --config, not both")
    settings = load_settings(args.config)
    if args.log_level is not None:
        settings = msgspec.structs.replace(settings, log=msgspec.structs.replace(settings.log, level=args.log_level))
    configure_logging(settings.log.level, args.log_format or settings.log.format)
    if args.model is not None:
        settings = _settings_for_model(settings, args.model, args.plugins)
    elif args.config is None:
        # the built-in default models come from the catalogue: fetched here, with progress, on the
        # first serve (a missing backend is create_app's error, naming the config key)
        for entry in settings.models:
            args.plugins.pm.hook.model_entry(model=entry.options["model"], home=settings.server.home, progress=True)
    if args.api_key:
        auth = settings.plugins.get("auth", {})
        keys = [*auth.get("keys", []), *args.api_key]
        settings = msgspec.structs.replace(settings, plugins={**settings.plugins, "auth": {**auth, "keys": keys}})
    server = settings.server
    server = msgspec.structs.replace(
        server,
        host=args.host if args.host is not None else server.host,
        port=args.port if args.port is not None else server.port,
    )
    settings = msgspec.structs.replace(settings, server=server)
    app = create_app(settings, plugins=args.plugins, config_path=args.config, watch_s=args.watch)
    serve(app, server)  # uvicorn (uvloop, httptools) behind the edge's limits; drains on SIGTERM
    return 0


def _settings_for_model(defaults: Settings, model: str, plugins: Plugins) -> Settings:
    """The default settings serving ``model`` alone, its entry from the plugins' ``model_entry``
    (the engine's: a catalogue name, a .gguf file, a model directory), which may download it."""
    entry = plugins.pm.hook.model_entry(model=model, home=defaults.server.home, progress=True)
    if entry is None:
        raise ConfigError(
            f"no backend serves {model!r}: name a catalogue model (taxiway pull --list), a .gguf file or a model "
            "directory, or write a config (--config)"
        )
    return msgspec.structs.replace(defaults, models=(convert_table(entry, ModelEntry, "models[0]"),))


def _configure_models(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML config (default: the built-in default model)")


def _configure_check(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="TOML config to validate")


def _routes(config: str | None, plugins: Plugins) -> tuple[Route, ...]:
    """The models of a config validated as ``serve`` would: every plugin's and backend's options.

    Builds the backends but starts none (no model is loaded).
    """
    return read_config(config, plugins)[1].routes


def _models(args: argparse.Namespace) -> int:
    """List the configured models, their aliases and backends."""
    for route in _routes(args.config, args.plugins):
        aliases = f"  (aliases: {', '.join(route.aliases)})" if route.aliases else ""
        print(f"{route.name}\tbackend={route.backend_name}{aliases}")
    return 0


def _check_config(args: argparse.Namespace) -> int:
    """Validate a config file, including every backend's options."""
    routes = _routes(args.file, args.plugins)
    names = ", ".join(r.name for r in routes)
    print(f"{args.file}: ok ({len(routes)} model{'s' if len(routes) != 1 else ''}: {names})")
    return 0


def _configure_ps(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)")
    parser.add_argument("--admin-key", metavar="KEY", help="one of the server's [admin] keys")


def _ps(args: argparse.Namespace) -> int:
    """List the models a running server holds: state, memory, requests in flight (GET /admin/models)."""
    import httpx

    headers = {"authorization": f"Bearer {args.admin_key}"} if args.admin_key else {}
    try:
        response = httpx.get(f"{args.url.rstrip('/')}/admin/models", headers=headers, timeout=10)
    except httpx.TransportError as exc:
        print(f"taxiway: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    if response.status_code != 200:
        print(f"taxiway: {response.status_code}: {response.text}", file=sys.stderr)
        return 1
    print(format_ps(response.json()["data"], now=time.time()), end="")
    return 0


def format_ps(models: list[dict[str, Any]], *, now: float) -> str:
    """``GET /admin/models``'s entries as ``ollama ps``-style columns."""
    rows = [("NAME", "ALIASES", "BACKEND", "STATE", "MEMORY", "IN FLIGHT", "LAST USED")]
    for m in models:
        memory = m.get("memory_bytes")
        last = m.get("last_used")
        rows.append((
            m["name"], ",".join(m["aliases"]) or "-", m["backend"], m["state"],
            "-" if memory is None else f"{memory / 2**20:.0f} MiB", str(m["in_flight"]),
            "never" if last is None else f"{max(0, now - last):.0f}s ago",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ("   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)
    return "".join(line + "\n" for line in lines)


class _Builtins:
    @hookimpl
    def register_commands(self, register: Callable[..., None]) -> None:
        register(("serve",), _configure_serve, _serve)
        register(("models",), _configure_models, _models)
        register(("check-config",), _configure_check, _check_config)
        register(("ps",), _configure_ps, _ps)

        from gateway import chat

        register(("chat",), chat.configure, chat.run)
