"""Configuration: one TOML file, `${ENV}` interpolation, validated into frozen Structs.

This is the only module that reads the environment. Errors are ``ConfigError`` naming the key
path (``models[0].options.base_url``). Backend and plugin tables stay plain TOML tables here; each
owner converts its own table with ``convert_table`` so its errors name the full path too.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from gateway.budget import parse_seconds, parse_size
from gateway.errors import ConfigError
from gateway.keys import key_digests

T = TypeVar("T")

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024

# Served by `taxiway serve` without --config: the default chat model on the in-repo engine, and
# beside it the default embedding model (`embed`), so a retrieval demo needs no config.
# API keys come from TAXIWAY_API_KEYS (comma-separated); unset means an open gateway.
DEFAULT_CONFIG_TOML = """
[[models]]
name = "smollm2-135m-instruct"
aliases = ["default"]
backend = "engine"
options = { model = "smollm2-135m-instruct" }

[[models]]
name = "all-minilm-l6-v2"
aliases = ["embed"]
backend = "encoder"
options = { model = "all-minilm-l6-v2" }

[plugins.auth]
keys = ["${TAXIWAY_API_KEYS:-}"]
"""


class ServerSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    ready_timeout_s: float = 600.0  # a reload waits this long for its new models to be ready
    memory_budget: int | str | None = None  # "8GiB", "512MiB" or bytes; None: unlimited (gateway.budget)
    load_timeout_s: float = 120.0  # a request waits this long for its model to load
    stall_timeout_s: float = 60.0  # /ready is 503 for a model with requests in flight and no token this long; 0 off
    home: str = ""  # the Taxiway home (usage ledger, virtual keys); default $TAXIWAY_HOME or ~/.cache/taxiway
    # the edge (gateway.edge): what a reverse proxy would otherwise enforce
    max_header_bytes: int = 32768  # request line and headers together; more gets 431
    max_headers: int = 100  # header fields; more gets 431
    max_url_bytes: int = 8192  # the request target; longer gets 414
    header_timeout_s: float = 10.0  # from a request's first byte to the end of its headers; then 408
    body_timeout_s: float = 60.0  # from the end of the headers to the end of the body; then 408
    idle_timeout_s: float = 5.0  # a connection with no request in progress is closed after this
    max_request_time_s: float = 600.0  # admission to last byte; then 504, or an error event ending a stream; 0 off
    max_connections: int = 1024  # open connections; a request on one more gets 503
    drain_timeout_s: float = 30.0  # after SIGTERM, running requests may finish this long (gateway.server)


class AdminSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[admin]``: keys for the ``/admin`` routes, like ``[plugins.auth]``'s (plain or hashed)."""

    keys: tuple[str, ...] = ()
    key_hashes: tuple[str, ...] = ()


class LogSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    level: str = "info"
    format: str = "auto"  # "auto": console on a terminal, JSON lines otherwise; or "json", "console"


class ModelEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One deployment. Entries sharing a ``name`` form a group: one public model, balanced."""

    name: str
    backend: str
    aliases: tuple[str, ...] = ()
    options: dict[str, Any] = msgspec.field(default_factory=dict)
    fallbacks: tuple[str, ...] = ()  # names or aliases tried, in order, when this group fails
    cooldown_s: float = 30.0  # after a failure this deployment is tried last, then probed back
    load: str = "eager"  # or "on_demand": loaded by its first request (gateway.budget)
    keep_alive: float | str = -1  # idle seconds (or "5m") before it is unloaded; -1 never
    pin: bool = False  # never evicted for room


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    models: tuple[ModelEntry, ...]
    server: ServerSettings = ServerSettings()
    log: LogSettings = LogSettings()
    admin: AdminSettings = AdminSettings()
    plugins: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    limits: dict[str, Any] = msgspec.field(default_factory=dict)  # [limits]: plugins/limits
    usage: dict[str, Any] = msgspec.field(default_factory=dict)  # [usage]: plugins/usage


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\$")
_AT_PATH = re.compile(r" - at `\$(.*)`$")
_MISSING_FIELD = re.compile(r"missing required field `([^`]+)`")
_LOG_LEVELS = ("debug", "info", "warning", "error")
_LOG_FORMATS = ("auto", "json", "console")


def load_settings(path: str | os.PathLike[str] | None, *, env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate ``path``, or the built-in default config when ``path`` is None."""
    if path is None:
        return parse_settings(DEFAULT_CONFIG_TOML, env=env)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror or exc}") from exc
    return parse_settings(text, env=env)


def parse_settings(text: str, *, env: Mapping[str, str] | None = None) -> Settings:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}") from exc
    raw = _interpolate(raw, os.environ if env is None else env, "")
    if "models" not in raw:
        raise ConfigError("at least one [[models]] entry is required", path="models")
    settings = convert_table(raw, Settings, "")
    _check(settings)
    if not settings.server.home:
        environ = os.environ if env is None else env
        home = environ.get("TAXIWAY_HOME") or str(Path.home() / ".cache" / "taxiway")
        settings = msgspec.structs.replace(settings, server=msgspec.structs.replace(settings.server, home=home))
    return settings


def convert_table(table: Any, type_: type[T], path: str) -> T:
    """Validate a TOML table into ``type_``, with errors that name the key path below ``path``.

    Goes through JSON rather than ``msgspec.convert`` so that ``forbid_unknown_fields`` is honoured
    and types are strict (a string is never an int).
    """
    try:
        return msgspec.json.decode(msgspec.json.encode(table), type=type_)
    except msgspec.ValidationError as exc:
        message, key = split_validation_error(str(exc))
        full = join_path(path, key)
        raise ConfigError(message, path=full or None) from exc


def split_validation_error(text: str) -> tuple[str, str]:
    """Split msgspec's "Expected `int`, got `str` - at `$.a[0].b`" into (message, "a[0].b")."""
    key = ""
    match = _AT_PATH.search(text)
    if match:
        text = text[: match.start()]
        key = match.group(1).lstrip(".")
    missing = _MISSING_FIELD.search(text)
    if missing:
        key = join_path(key, missing.group(1))
        text = "required key is missing"
    elif text.startswith("Object contains unknown field"):
        field = text.split("`")[1]
        key = join_path(key, field)
        text = "unknown key"
    return text, key


def join_path(prefix: str, key: str) -> str:
    if not key:
        return prefix
    if not prefix:
        return key
    return f"{prefix}{key}" if key.startswith("[") else f"{prefix}.{key}"


def _interpolate(value: Any, env: Mapping[str, str], path: str) -> Any:
    if isinstance(value, str):
        return _substitute(value, env, path) if "$" in value else value
    if isinstance(value, dict):
        return {k: _interpolate(v, env, join_path(path, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def _substitute(text: str, env: Mapping[str, str], path: str) -> str:
    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name is None:  # "$$" escapes a literal "$"
            return "$"
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise ConfigError(f"environment variable {name} is not set", path=path)

    return _ENV_REF.sub(replace, text)


def _check(settings: Settings) -> None:
    if not settings.models:
        raise ConfigError("at least one [[models]] entry is required", path="models")
    _check_names(settings.models)
    for i, entry in enumerate(settings.models):
        if not entry.backend:
            raise ConfigError("a backend name is required", path=f"models[{i}].backend")
        if not entry.cooldown_s >= 0:
            raise ConfigError("must not be negative", path=f"models[{i}].cooldown_s")
        if entry.load not in ("eager", "on_demand"):
            raise ConfigError("must be one of eager, on_demand", path=f"models[{i}].load")
        parse_seconds(entry.keep_alive, f"models[{i}].keep_alive")
    server = settings.server
    if not 0 <= server.port <= 65535:
        raise ConfigError("must be between 0 and 65535", path="server.port")
    if server.max_body_bytes < 1024:
        raise ConfigError("must be at least 1024", path="server.max_body_bytes")
    if not server.ready_timeout_s > 0:
        raise ConfigError("must be greater than 0", path="server.ready_timeout_s")
    if not server.load_timeout_s > 0:
        raise ConfigError("must be greater than 0", path="server.load_timeout_s")
    if not server.stall_timeout_s >= 0:
        raise ConfigError("must not be negative (0: off)", path="server.stall_timeout_s")
    for key in ("max_header_bytes", "max_headers", "max_url_bytes", "max_connections"):
        if getattr(server, key) < 1:
            raise ConfigError("must be at least 1", path=f"server.{key}")
    for key in ("header_timeout_s", "body_timeout_s", "idle_timeout_s"):
        if not getattr(server, key) > 0:
            raise ConfigError("must be greater than 0", path=f"server.{key}")
    for key in ("max_request_time_s", "drain_timeout_s"):
        if not getattr(server, key) >= 0:
            raise ConfigError("must not be negative" + (" (0: off)" if key == "max_request_time_s" else ""), path=f"server.{key}")
    parse_size(server.memory_budget, "server.memory_budget")
    key_digests(settings.admin.keys, settings.admin.key_hashes, "admin")
    if settings.log.level not in _LOG_LEVELS:
        raise ConfigError(f"must be one of {', '.join(_LOG_LEVELS)}", path="log.level")
    if settings.log.format not in _LOG_FORMATS:
        raise ConfigError(f"must be one of {', '.join(_LOG_FORMATS)}", path="log.format")


def _check_names(models: tuple[ModelEntry, ...]) -> None:
    """Entries may share a name (a group of deployments) and repeat the group's aliases; a name
    or alias may not belong to two groups, nor be both a group's name and an alias. Fallbacks
    name a known model (cycles are fine: each candidate is tried once per request)."""
    owners: dict[str, tuple[str, bool, str]] = {}  # name or alias → (group, is_alias, where)
    for i, entry in enumerate(models):
        for key, name in [("name", entry.name)] + [(f"aliases[{j}]", a) for j, a in enumerate(entry.aliases)]:
            where = f"models[{i}].{key}"
            if not name or name != name.strip():
                raise ConfigError("model names must be non-empty without surrounding spaces", path=where)
            claim = (entry.name, key != "name")
            owner = owners.setdefault(name, (*claim, where))
            if owner[:2] != claim:
                raise ConfigError(f"model name {name!r} is already used by {owner[2]}", path=where)
    for i, entry in enumerate(models):
        for j, fallback in enumerate(entry.fallbacks):
            if fallback not in owners:
                raise ConfigError(f"unknown model {fallback!r}", path=f"models[{i}].fallbacks[{j}]")
