"""The engine on a GPU: fused Triton kernels (``kernels``), the forward built on them
(``model.GpuCausalLM``) and decode steps replayed from CUDA graphs (``graphs.DecodeGraphs``).

``prepare(model)`` is the explicit step, beside ``native.fuse`` for the CPU, that turns a loaded
``CausalLM`` on a CUDA device into the GPU forward. Nothing here is imported on the CPU path.
"""

from __future__ import annotations

from backends.engine.cuda.kernels import HAVE_TRITON, GpuKernels


def prepare(  # type: ignore[no-untyped-def]
    model, *, use_triton: bool | None = None, max_positions: int | None = None, int4_kernel: str = "torch"
):
    """The GPU forward over ``model``'s weights (``use_triton``: default where Triton is installed;
    ``int4_kernel``: ``"torch"`` or ``"triton"``, see ``model.GpuCausalLM``)."""
    from backends.engine.cuda.model import GpuCausalLM
    from backends.engine.model.config import GEMMA, UnsupportedModelError

    if model.config.architecture in GEMMA:  # its forward is llama's: no GeGLU, windows, soft-capping
        raise UnsupportedModelError(f"{model.config.architecture} runs on the CPU only (the GPU forward is llama's)")
    if model.config.is_moe:  # GpuCausalLM runs each layer's dense gate_up / down
        raise UnsupportedModelError(f"a mixture of experts ({model.config.architecture}) does not run on CUDA yet")
    kernels = GpuKernels(HAVE_TRITON if use_triton is None else use_triton)
    return GpuCausalLM(model, kernels, max_positions=max_positions, int4_kernel=int4_kernel)
