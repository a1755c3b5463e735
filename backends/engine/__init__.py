"""The in-repo PyTorch engine backend. Importing this package must stay cheap (no torch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.hookspecs import hookimpl


@hookimpl
def register_backends(register: Callable[..., Any]) -> None:
    from backends.engine.backend import EngineBackend
    from backends.engine.encoder.backend import EncoderBackend

    register("engine", EngineBackend)
    register("encoder", EncoderBackend)


@hookimpl
def register_commands(register: Callable[..., Any]) -> None:
    from backends.engine import cli

    register(("pull",), cli.configure_pull, cli.run_pull)
    register(("generate",), cli.configure_generate, cli.run_generate)
    register(("show",), cli.configure_show, cli.run_show)
    register(("rm",), cli.configure_rm, cli.run_rm)

    from backends.engine import plan

    register(("plan",), plan.configure, plan.run)


@hookimpl
def model_entry(model: str, home: str, progress: bool) -> dict[str, Any] | None:
    from pathlib import Path

    from backends.engine import cli

    return cli.model_entry(model, Path(home), progress=progress)


@hookimpl
def plugin_configure(settings: Any) -> None:
    # Under `torchrun ... -m gateway serve`, ranks > 0 become tensor-parallel workers here, before
    # anything binds the port, and exit when rank 0 stops. torch is imported only for such configs.
    if any(m.backend == "engine" and m.options.get("tensor_parallel", 1) != 1 for m in settings.models):
        from backends.engine.tp.engine import serve_torchrun_worker

        serve_torchrun_worker(settings)
