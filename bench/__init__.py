"""Taxiway's benchmarks: a package beside the product, registered like any third-party plugin.

``taxiway bench gateway|serving|engine|batching|tp|swap|gpu|lora|soak|edge|plan`` come from here (entry point ``bench`` in the
``taxiway`` group). The product (``gateway/``, ``backends/``, ``plugins/``) never imports this
package; the tests and the benchmarks import the product.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.hookspecs import hookimpl


@hookimpl
def register_commands(register: Callable[..., Any]) -> None:
    from bench import batching, edge, embeddings, engine, gpu, loadgen, lora, overhead, plan, soak, structured, swap, tp

    register(("bench", "gateway"), overhead.configure, overhead.run)
    register(("bench", "serving"), loadgen.configure, loadgen.run)
    register(("bench", "engine"), engine.configure, engine.run)
    register(("bench", "batching"), batching.configure, batching.run)
    register(("bench", "tp"), tp.configure, tp.run)
    register(("bench", "swap"), swap.configure, swap.run)
    register(("bench", "embeddings"), embeddings.configure, embeddings.run)
    register(("bench", "gpu"), gpu.configure, gpu.run)
    register(("bench", "structured"), structured.configure, structured.run)
    register(("bench", "lora"), lora.configure, lora.run)
    register(("bench", "soak"), soak.configure, soak.run)
    register(("bench", "edge"), edge.configure, edge.run)
    register(("bench", "plan"), plan.configure, plan.run)
