"""``fuse(model, kernels)``: the native CPU fast path placed on a built model, in one step.

Called by the model builder after loading (and, under tensor parallelism, after
``shard_model``), as sharding is: the plain ``llama`` forward knows nothing of native code, and
everything the kernels change is swapped in here:

- every layer's attention takes the native decode and prefill kernels (``PagedAttention``);
- each decoder layer whose pieces all suit the kernels (``FusedLayer.applies``: bfloat16 on CPU,
  native-layout int4, int5 or int8 projections) becomes a ``FusedLayer``, seven native calls;
- the layer stack becomes a ``FusedStack``, which runs a decode-only step in one native call
  when every layer is fused.

The quantized weights got their native layouts earlier, when the loader was given the same
kernels (``load_model(..., kernels=...)``): a layout is a storage format, chosen once at packing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from backends.engine.model.attention import PagedAttention
from backends.engine.native.fused import FusedLayer
from backends.engine.native.stack import FusedStack

if TYPE_CHECKING:
    from backends.engine.model.llama import CausalLM
    from backends.engine.native.ckernels import Kernels


def fuse(model: CausalLM, kernels: Kernels | None) -> CausalLM:
    """``model`` with the native path swapped in, in place; unchanged when ``kernels`` is None
    (torch's path throughout). Weights must not move afterwards: the fused modules hold their
    addresses."""
    if kernels is None:
        return model
    for layer in model.layers:
        layer.self_attn.attend = PagedAttention(kernels)
    layers = [FusedLayer(layer, kernels) if FusedLayer.applies(layer, kernels) else layer for layer in model.layers]
    model.layers = FusedStack(layers)
    return model
