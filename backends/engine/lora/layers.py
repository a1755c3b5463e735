"""``apply_lora(model, slots)``: the batched LoRA terms placed on a built model, in one step.

Called by the model builder after ``native.fuse`` (as ``fuse`` and ``shard_model`` are steps), so
the plain forward stays plain:

- a plain ``DecoderLayer`` (torch's ops: the float32 reference, or no native kernels) gets its four
  projections wrapped in ``LoRALinear``: ``base(x) + lora(x)``. Under tensor parallelism (after
  ``shard_model``) o and down are row parallel: the wrapper goes inside, on this rank's partial
  product, so that the one all-reduce sums the ranks' partial LoRA terms with the base's;
- a native ``FusedLayer`` gets ``layer.lora = LayerLoRA(...)``, which it calls after each native
  matmul (qkv and gate_up before their outputs are used, o and down into the residual): the native
  path applies the adapters too, never skips them, through the native kernel the one-call decode
  step uses (``LoRAProjection.add_native``: each row's term independent of the step's other rows);
- a ``FusedStack`` becomes a ``LoRAStack``: a decode-only step takes the one native call with the
  adapters' terms inside it (each row only its own adapter's columns); other steps run the fused
  layers one by one.

On plain layers each projection's term is ``y += (x @ A_i.T) @ Bt_i`` for each long run of one
adapter's rows (a prompt chunk), and ``y += ((x @ A.T) * mask) @ Bt`` over every resident adapter
for the other rows (``slots.LoRASlots``): three torch ops whatever the mix of adapters among
decode rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from backends.engine.lora.slots import LoRASlots
from backends.engine.model.llama import DecoderLayer, DecoderStack
from backends.engine.native import abi

if TYPE_CHECKING:
    from backends.engine.model.attention import AttentionPlan, KVCache
    from backends.engine.model.llama import CausalLM
    from backends.engine.native.ckernels import Kernels


class LoRAProjection:
    """The LoRA term of one fused projection (``kind``) of one layer."""

    __slots__ = ("kind", "layer", "slots")

    def __init__(self, slots: LoRASlots, layer: int, kind: str) -> None:
        self.slots = slots
        self.layer = layer
        self.kind = kind

    def add_to(self, x: Tensor, y: Tensor) -> None:
        """``y[T, out] += lora(x[T, in])`` for this step's rows (in place; ``y`` may be a view): the
        plain layers' path (``LoRALinear``); fused layers take ``add_native``."""
        terms = self.slots.batch.terms.get(self.kind)
        if terms is None:
            return
        a, bt = self.slots.stacks[self.layer][self.kind]
        # float32 whatever the activations: bfloat16 rounding of x @ A.T and of the term cost a
        # point of top-1 agreement with peft; the term is rounded once, where it lands
        x = x if x.dtype == a.dtype else x.to(a.dtype)
        for start, end, column, rank in terms.runs:  # one adapter's rows: its own columns only
            _add(y[start:end], torch.mm(x[start:end], a[column : column + rank].t()), bt[column : column + rank])
        if terms.mask is None:
            return
        if terms.rows is None:
            _add(y, torch.mm(x, a.t()).mul_(terms.mask), bt)  # [T, K]: own columns only
            return
        rows = terms.rows
        d = torch.mm(x.index_select(0, rows), a.t()).mul_(terms.mask)
        landed = y.index_select(0, rows).to(d.dtype).add_(torch.mm(d, bt))  # rounded once, as ``_add`` rounds
        y.index_copy_(0, rows, landed.to(y.dtype))

    def add_native(
        self, kernels: Kernels, x: Tensor, k: int, out: Tensor, n: int, *, residual: bool = False, gated: bool = False
    ) -> None:  # fmt: skip
        """``add_to`` by the native kernel (``lora_add_bf16``) for a ``FusedLayer``: ``x`` bfloat16
        rows (``gated``: gate | up rows, the input ``silu(gate) * up``), ``out`` the bfloat16 rows
        (rounded once) or, ``residual``, the float32 residual stream; ``n`` columns of it. Each
        row's term is summed in one fixed order whatever the step's other rows, as in the one-call
        decode step: a prompt's rows get the same term after a prefix-cache hit as before it."""
        columns = self.slots.batch.columns.get(self.kind)
        if columns is None:
            return
        a, bt = self.slots.stacks[self.layer][self.kind]
        start, count = columns
        status = kernels.lora_add_bf16(
            abi.LoraAddArgs(
                term=abi.LoraTerm(a=a.data_ptr(), bt=bt.data_ptr(), start=start.data_ptr(), count=count.data_ptr()),
                x=x.data_ptr(), x_stride=x.stride(0), t=x.shape[0], k=k, gated=int(gated),
                y=None if residual else out.data_ptr(), y_stride=out.stride(0),
                residual=out.data_ptr() if residual else None, residual_stride=out.stride(0), n=n,
                num_threads=torch.get_num_threads(),
            )
        )  # fmt: skip
        if status != 0:
            raise RuntimeError(f"native LoRA term refused: layer {self.layer} {self.kind}, {x.shape[0]} rows")


def _add(y: Tensor, d: Tensor, bt: Tensor) -> None:
    if y.dtype == d.dtype:
        y.addmm_(d, bt)
    else:
        y.add_(torch.mm(d, bt))


class LayerLoRA:
    """A decoder layer's four LoRA projections, as a ``FusedLayer`` calls them."""

    def __init__(self, slots: LoRASlots, layer: int, intermediate_size: int) -> None:
        self.batch = slots.batch
        self.qkv, self.o, self.gate_up, self.down = (LoRAProjection(slots, layer, k) for k in ("qkv", "o", "gate_up", "down"))
        self.intermediate_size = intermediate_size

    @property
    def active(self) -> bool:
        return self.batch.active

    def add_down(self, kernels: Kernels, gate_up: Tensor, h: Tensor) -> None:
        """The down projection's term into the residual ``h``; its input ``silu(gate) * up`` (which
        the native down matmul forms internally) formed by the native kernel too, rounded as the
        torch path rounds it."""
        i = self.intermediate_size
        self.down.add_native(kernels, gate_up, i, h, h.shape[1], residual=True, gated=True)


class LoRALinear(nn.Module):
    """``base(x) + lora(x)``: a plain layer's projection with its LoRA term."""

    def __init__(self, base: nn.Module, lora: LoRAProjection) -> None:
        super().__init__()
        self.base = base
        self.lora = lora
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.lora.slots.batch.active:
            self.lora.add_to(x, y)
        return y

    def dequantize(self, dtype: torch.dtype | None = None, rows: slice | None = None) -> Tensor:
        return self.base.dequantize(dtype, rows)


class LoRAStack(DecoderStack):
    """A ``FusedStack`` whose one-call native decode step applies the step's adapters too: each
    layer's entry gets the resident stacks and each row's columns (``native/csrc/fused_ops.c``,
    ``lora_add``). Steps it does not take (prefills, mixed steps) run the fused layers one by one,
    each adding its ``LayerLoRA`` terms."""

    def __init__(self, stack: nn.Module, slots: LoRASlots) -> None:
        super().__init__(list(stack))
        self.inner = [stack]  # a list: not a submodule (its layers are already ours)
        self.slots = slots
        self.batch = slots.batch

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, plan: AttentionPlan, kv_caches: KVCache) -> Tensor:
        stack = self.inner[0]
        if not self.batch.active:
            return stack(h, cos, sin, plan, kv_caches)
        step = stack.decode_step
        if step is not None and step.applies(h, plan, kv_caches):
            step.set_lora(self.slots.stacks, self.batch.columns)
            try:
                return step(h, cos, sin, plan, kv_caches)
            finally:
                step.set_lora(None, None)
        return super().forward(h, cos, sin, plan, kv_caches)


def apply_lora(model: CausalLM, slots: LoRASlots) -> CausalLM:
    """``model`` with the LoRA terms of ``slots`` on every layer's projections, in place (module doc)."""
    from backends.engine.native.fused import FusedLayer
    from backends.engine.native.stack import FusedStack
    from backends.engine.tp.shard import RowParallelLinear

    for i, layer in enumerate(model.layers):
        if isinstance(layer, FusedLayer):
            layer.lora = LayerLoRA(slots, i, layer.mlp.intermediate_size)
        elif isinstance(layer, DecoderLayer):
            attn, mlp = layer.self_attn, layer.mlp
            attn.qkv_proj = LoRALinear(attn.qkv_proj, LoRAProjection(slots, i, "qkv"))
            mlp.gate_up_proj = LoRALinear(mlp.gate_up_proj, LoRAProjection(slots, i, "gate_up"))
            for owner, name, kind in ((attn, "o_proj", "o"), (mlp, "down_proj", "down")):
                proj = getattr(owner, name)
                if isinstance(proj, RowParallelLinear):  # this rank's partial product, before the sum
                    proj.inner = LoRALinear(proj.inner, LoRAProjection(slots, i, kind))
                else:
                    setattr(owner, name, LoRALinear(proj, LoRAProjection(slots, i, kind)))
        else:
            raise TypeError(f"layer {i} ({type(layer).__name__}) cannot take LoRA adapters")
    if isinstance(model.layers, FusedStack):
        model.layers = LoRAStack(model.layers, slots)
    return model
