"""The in-repo PyTorch engine backend. Importing this package must stay cheap (no torch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.hookspecs import hookimpl


@hookimpl
def register_backends(register: Callable[..., Any]) -> None:
    from backends.engine.backend import EngineBackend

    register("engine", EngineBackend)


@hookimpl
def register_commands(register: Callable[..., Any]) -> None:
    from backends.engine import cli

    register(("pull",), cli.configure_pull, cli.run_pull)
