"""The CLI: built-in commands, plugin commands grouped by path, config checking."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import build_parser, main
from gateway.plugins import Command

GOOD = """
[[models]]
name = "assistant"
aliases = ["default"]
backend = "openai"
options = { base_url = "http://127.0.0.1:8101/v1", upstream_model = "smollm2" }
"""


def _noop(parser: object) -> None:
    pass


def test_commands_group_by_path() -> None:
    ran = []
    commands = [
        Command(("bench", "engine"), _noop, lambda args: ran.append("engine") or 0, "engine"),
        Command(("bench", "gateway"), _noop, lambda args: ran.append("gateway") or 0, "gateway"),
        Command(("pull",), lambda p: p.add_argument("name"), lambda args: ran.append(args.name) or 0, "engine"),
    ]
    parser = build_parser(commands)
    for argv in (["bench", "engine"], ["bench", "gateway"], ["pull", "smol"]):
        args = parser.parse_args(argv)
        args._run(args)
    assert ran == ["engine", "gateway", "smol"]


def test_conflicting_commands_are_refused() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        build_parser([Command(("pull",), _noop, _noop, "a"), Command(("pull",), _noop, _noop, "b")])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot also be a group"):
        build_parser([Command(("bench",), _noop, _noop, "a"), Command(("bench", "x"), _noop, _noop, "b")])  # type: ignore[arg-type]


def test_check_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.toml"
    good.write_text(GOOD)
    assert main(["check-config", str(good)]) == 0
    assert "ok (1 model: assistant)" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace('"http://127.0.0.1:8101/v1"', "1"))
    assert main(["check-config", str(bad)]) == 2
    assert "models[0].options.base_url" in capsys.readouterr().err


def test_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text(GOOD)
    assert main(["models", "--config", str(path)]) == 0
    assert capsys.readouterr().out.strip() == "assistant\tbackend=openai  (aliases: default)"


def test_serve_without_config_fails_clearly_without_the_engine(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The default config names backend "engine"; without it, serve stops with a message naming it."""
    import backends.openai
    from gateway import cli
    from gateway.plugins import load_plugins

    def without_engine(**kwargs: object) -> object:
        return load_plugins(entry_points=False, extra=[("openai", backends.openai), *kwargs.get("extra", [])])  # type: ignore[misc]

    monkeypatch.setattr(cli, "load_plugins", without_engine)
    monkeypatch.setattr("gateway.logs.configure_logging", lambda *args, **kwargs: None)  # keep pytest's stdout
    assert main(["serve", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "models[0].backend" in err and "'engine'" in err and "openai" in err


def test_python_dash_m_gateway_help() -> None:
    result = subprocess.run([sys.executable, "-m", "gateway", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in ("serve", "models", "check-config", "bench"):
        assert command in result.stdout
