"""Backend ``openai``: proxy to any OpenAI-compatible upstream (vLLM, llama.cpp, OpenAI…).

Registered through the ``taxiway`` entry point like any third-party backend.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.hookspecs import hookimpl

from backends.openai.backend import OpenAIBackend


@hookimpl
def register_backends(register: Callable[..., None]) -> None:
    register("openai", OpenAIBackend)


__all__ = ["OpenAIBackend"]
