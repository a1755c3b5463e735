"""The decoder layers with the native decode step: every layer of a decode-only step in one call.

``DecodeStep`` runs ``decode_layers_bf16``: the same kernels as ``FusedLayer`` in the same order,
without ~7 Python-side calls per layer (~2 ms a step on SmolLM2's 30 layers). ``FusedStack``
replaces the model's ``DecoderStack`` (``fuse.fuse``): a step of decodes alone, on caches the
kernels can read, takes the one call; any other step runs the layers one by one.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from backends.engine.model.attention import AttentionPlan, KVCache
from backends.engine.model.llama import DecoderStack
from backends.engine.native import abi
from backends.engine.native.fused import PROJECTIONS, FusedLayer, cache_ok


class DecodeStep:
    """Every layer of a decode-only step in one native call. Built when every layer is a
    ``FusedLayer`` of one shape (``build``); the weights stay alive in those layers."""

    def __init__(self, layers: Sequence[FusedLayer]) -> None:
        self.layers = list(layers)
        first = self.layers[0]
        self.kernels = first.kernels
        self.num_heads, self.num_kv_heads, self.head_dim = first.num_heads, first.num_kv_heads, first.head_dim
        self.hidden = first.hidden
        self.intermediate = first.mlp.intermediate_size
        self.eps = first.attn_norm.eps
        self.scale = first.self_attn.scale
        self.qkv_n = first.self_attn.qkv_proj.padded_out
        self.gu_n = first.mlp.gate_up_proj.padded_out
        self._table = (abi.LayerWeights * len(self.layers))()
        self._caches: KVCache | None = None  # the caches the table points into (held)
        self._cache_ok = False
        group = self.num_heads // self.num_kv_heads
        # decode_attention_bf16's limits: beyond them the per-layer path falls back to torch
        self.attention_ok = self.num_heads % self.num_kv_heads == 0 and group <= 16 and self.head_dim <= 256
        for entry, layer in zip(self._table, self.layers, strict=True):
            attn, mlp = layer.self_attn, layer.mlp
            if attn.qkv_proj.padded_out != self.qkv_n or mlp.gate_up_proj.padded_out != self.gu_n:
                raise ValueError("layers differ in shape")
            entry.attn_norm, entry.ffn_norm = layer.attn_norm.weight2.data_ptr(), layer.ffn_norm.weight2.data_ptr()
            for name in PROJECTIONS:
                setattr(entry, name, layer.projections[name])

    @classmethod
    def build(cls, layers: Sequence[nn.Module]) -> DecodeStep | None:
        """The one-call step over ``layers``, or None unless every one is a ``FusedLayer`` and
        all share a shape."""
        if not layers or not all(isinstance(layer, FusedLayer) for layer in layers):
            return None
        try:
            return cls(layers)  # type: ignore[arg-type]
        except ValueError:
            return None

    def set_lora(
        self, stacks: Sequence[dict[str, tuple[Tensor, Tensor]]] | None, columns: dict[str, tuple[Tensor, Tensor]] | None
    ) -> None:
        """The LoRA terms of the next call (``lora.slots``: per layer and kind the stacked ``a`` and
        ``bt``, float32; per kind each row's columns), or none (``None``). The tensors must live
        until the call returns."""
        for i, entry in enumerate(self._table):
            for kind in ("qkv", "o", "gate_up", "down"):
                term = abi.LoraTerm()  # a NULL: no term
                if stacks is not None and columns is not None and kind in columns and kind in stacks[i]:
                    a, bt = stacks[i][kind]
                    start, count = columns[kind]
                    term = abi.LoraTerm(a=a.data_ptr(), bt=bt.data_ptr(), start=start.data_ptr(), count=count.data_ptr())
                setattr(entry, f"lora_{kind}", term)

    def applies(self, h: Tensor, plan: AttentionPlan, kv_caches: KVCache) -> bool:
        if not (
            self.attention_ok and not plan.prefills and plan.decode_rows is None and plan.decode_tables is not None
            and plan.decode_seq_lens is not None and h.is_contiguous()
        ):  # fmt: skip
            return False
        if kv_caches is not self._caches:  # one list per engine, allocated once; not known at build
            self._cache_ok = all(cache_ok(k, v) for k, v in kv_caches)
            for entry, (k_cache, v_cache) in zip(self._table, kv_caches, strict=True):
                entry.k_cache, entry.v_cache = k_cache.data_ptr(), v_cache.data_ptr()
            self._caches = kv_caches
        return self._cache_ok

    def __call__(self, h: Tensor, cos: Tensor, sin: Tensor, plan: AttentionPlan, kv_caches: KVCache) -> Tensor:
        """Call only after ``applies`` returned True for these ``kv_caches``."""
        rows = h.shape[0]
        bf16 = torch.bfloat16
        x = torch.empty(rows, self.hidden, dtype=bf16)
        qkv = torch.empty(rows, self.qkv_n, dtype=bf16)
        attn = torch.empty(rows, self.num_heads * self.head_dim, dtype=bf16)
        gate_up = torch.empty(rows, self.gu_n, dtype=bf16)
        k_cache = kv_caches[0][0]
        tables, lens = plan.decode_tables, plan.decode_seq_lens
        assert tables is not None and lens is not None
        status = self.kernels.decode_layers_bf16(
            abi.DecodeLayersArgs(
                layers=ctypes.addressof(self._table), num_layers=len(self.layers), h=h.data_ptr(), t=rows,
                hidden=self.hidden, heads=self.num_heads, kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                intermediate=self.intermediate, eps=self.eps, scale=self.scale, cos=cos.data_ptr(), sin=sin.data_ptr(),
                slots=plan.slot_mapping.data_ptr(), num_slots=k_cache.shape[0] * k_cache.shape[1],
                tables=tables.data_ptr(), table_stride=tables.stride(0), seq_lens=lens.data_ptr(),
                num_blocks=k_cache.shape[0], block_size=k_cache.shape[1], x=x.data_ptr(), qkv=qkv.data_ptr(),
                attn=attn.data_ptr(), gate_up=gate_up.data_ptr(), num_threads=torch.get_num_threads(),
            )
        )  # fmt: skip
        if status != 0:
            raise RuntimeError(f"native decode step refused at layer {status - 1} ({rows} rows)")
        return h


class FusedStack(DecoderStack):
    """The model's layers (fused or not) with the one-call ``DecodeStep`` where it applies."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__(layers)
        self.decode_step = DecodeStep.build(list(self))

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, plan: AttentionPlan, kv_caches: KVCache) -> Tensor:
        if self.decode_step is not None and self.decode_step.applies(h, plan, kv_caches):
            return self.decode_step(h, cos, sin, plan, kv_caches)
        return super().forward(h, cos, sin, plan, kv_caches)
