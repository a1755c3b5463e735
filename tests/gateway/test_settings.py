"""Config: TOML → frozen Structs, ${ENV} interpolation, errors naming the key path."""

from __future__ import annotations

from pathlib import Path

import pytest
from gateway_fakes import fake_plugins

from gateway.config import DEFAULT_CONFIG_TOML, load_settings, parse_settings
from gateway.errors import ConfigError
from gateway.plugins import load_plugins
from gateway.router import build_router

OPENAI_MODEL = """
[[models]]
name = "assistant"
aliases = ["default"]
backend = "openai"
options = { base_url = "http://127.0.0.1:8101/v1", api_key = "${UPSTREAM_KEY}", upstream_model = "smollm2" }
"""


def _error(text: str, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_settings(text, env=env or {})
    return info.value


def test_parses_and_interpolates() -> None:
    settings = parse_settings(OPENAI_MODEL, env={"UPSTREAM_KEY": "s3cret"})
    (model,) = settings.models
    assert model.name == "assistant" and model.aliases == ("default",) and model.backend == "openai"
    assert model.options["api_key"] == "s3cret"
    assert settings.server.port == 8000 and settings.server.max_body_bytes == 4 * 1024 * 1024
    with pytest.raises(AttributeError):
        settings.server.port = 1  # type: ignore[misc]  # frozen


def test_missing_env_var_names_the_key() -> None:
    error = _error(OPENAI_MODEL)
    assert error.path == "models[0].options.api_key"
    assert "UPSTREAM_KEY" in str(error)


def test_env_default_and_dollar_escape() -> None:
    text = '[[models]]\nname = "a"\nbackend = "x"\noptions = { a = "${NOPE:-fallback}", b = "$${LITERAL}" }\n'
    options = parse_settings(text, env={}).models[0].options
    assert options == {"a": "fallback", "b": "${LITERAL}"}


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ('[[models]]\nname = "a"\n', "models[0].backend"),
        ('[[models]]\nname = 3\nbackend = "x"\n', "models[0].name"),
        ('[[models]]\nname = "a"\nbackend = "x"\ncolour = "red"\n', "models[0].colour"),
        ('[server]\nport = "80"\n[[models]]\nname = "a"\nbackend = "x"\n', "server.port"),
        ('[server]\nport = 70000\n[[models]]\nname = "a"\nbackend = "x"\n', "server.port"),
        ('[[models]]\nname = "a"\nbackend = "x"\n[[models]]\nname = "b"\naliases = ["a"]\nbackend = "x"\n',
         "models[1].aliases[0]"),
        ('[log]\nlevel = "loud"\n[[models]]\nname = "a"\nbackend = "x"\n', "log.level"),
        ('[server]\nheader_timeout_s = 0\n[[models]]\nname = "a"\nbackend = "x"\n', "server.header_timeout_s"),
        ('[server]\nmax_headers = 0\n[[models]]\nname = "a"\nbackend = "x"\n', "server.max_headers"),
        ('[server]\ndrain_timeout_s = -1\n[[models]]\nname = "a"\nbackend = "x"\n', "server.drain_timeout_s"),
        ('[server]\nmax_request_time_s = -1\n[[models]]\nname = "a"\nbackend = "x"\n', "server.max_request_time_s"),
        ("", "models"),
    ],
)
def test_errors_name_the_key_path(text: str, path: str) -> None:
    error = _error(text)
    assert error.path == path
    assert str(error).startswith(f"{path}: ")


def test_not_toml() -> None:
    assert "TOML" in str(_error("[[models]\n"))


def test_backend_options_are_validated_by_the_backend() -> None:
    plugins = load_plugins()
    text = OPENAI_MODEL.replace('"http://127.0.0.1:8101/v1"', "8101")
    with pytest.raises(ConfigError) as info:
        build_router(parse_settings(text, env={"UPSTREAM_KEY": "k"}), plugins)
    assert info.value.path == "models[0].options.base_url"
    text = OPENAI_MODEL.replace('"http://127.0.0.1:8101/v1"', '"ftp://x"')
    with pytest.raises(ConfigError) as info:
        build_router(parse_settings(text, env={"UPSTREAM_KEY": "k"}), plugins)
    assert info.value.path == "models[0].options.base_url" and "http" in str(info.value)
    text = OPENAI_MODEL.replace("upstream_model", "upstream_modle")
    with pytest.raises(ConfigError) as info:
        build_router(parse_settings(text, env={"UPSTREAM_KEY": "k"}), plugins)
    assert info.value.path == "models[0].options.upstream_modle"


def test_unknown_backend_names_the_key_and_lists_registered() -> None:
    text = '[[models]]\nname = "a"\nbackend = "fake"\n[[models]]\nname = "b"\nbackend = "warp-drive"\n'
    with pytest.raises(ConfigError) as info:
        build_router(parse_settings(text, env={}), fake_plugins())
    assert info.value.path == "models[1].backend"
    assert "warp-drive" in str(info.value) and "fake" in str(info.value) and "openai" in str(info.value)


def test_default_config_serves_the_default_model_on_the_engine() -> None:
    settings = load_settings(None, env={})
    model, encoder = settings.models
    assert (model.name, model.aliases, model.backend) == ("smollm2-135m-instruct", ("default",), "engine")
    assert model.options == {"model": "smollm2-135m-instruct"}
    assert (encoder.name, encoder.aliases, encoder.backend) == ("all-minilm-l6-v2", ("embed",), "encoder")
    assert encoder.options == {"model": "all-minilm-l6-v2"}
    assert settings.plugins["auth"]["keys"] == [""]
    assert load_settings(None, env={"TAXIWAY_API_KEYS": "a,b"}).plugins["auth"]["keys"] == ["a,b"]
    assert "engine" in DEFAULT_CONFIG_TOML


def test_load_from_file(tmp_path: Path) -> None:
    path = tmp_path / "taxiway.toml"
    path.write_text(OPENAI_MODEL)
    assert load_settings(path, env={"UPSTREAM_KEY": "k"}).models[0].name == "assistant"
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.toml")
