"""int8 weights for the encoder's linear layers: a memory saving, with float32 (or bfloat16) arithmetic.

``Int8Linear`` keeps each weight int8 in groups of ``group_size`` inputs per output row
(symmetric, scale = absmax / 127) and dequantises it to float32 for each call — the weight is a
few hundred thousand values against the call's ``T x in x out`` multiply-adds, so the dequantise
costs little, and the activations stay float32.

Why not int8 arithmetic: torch's dynamic-quantised matmul (fbgemm, activations quantised per
tensor on the fly) is 5x faster on this CPU's VNNI for MiniLM's FFN shape, but its vectors reach
only cosine 0.9876 against float32 on 64 mixed sentences (0.9944 with activations quantised per
token through ``torch._int_mm``): BERT's activations have outlier channels. A per-tensor scale
also makes an input's vector depend on its batch-mates. Weight-only per-channel int8 reaches
0.99914 on the same sentences, groups of 64 more (``tests/backends/engine/encoder``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_GROUP_SIZE = 64


def quantize_groups(w: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """``w[out, in]`` → (int8 ``q[out, in]``, float32 ``scale[out, in // group_size]``)."""
    out_features, in_features = w.shape
    groups = w.float().reshape(out_features, in_features // group_size, group_size)
    scale = (groups.abs().amax(dim=2) / 127.0).clamp(min=1e-12)
    q = torch.round(groups / scale.unsqueeze(2)).clamp(-127, 127).to(torch.int8)
    return q.reshape(out_features, in_features), scale


class Int8Linear(nn.Module):
    """``y = x @ dequantize(W).T + b`` with ``W`` int8 in groups of ``group_size`` inputs."""

    def __init__(
        self, linear: nn.Linear, group_size: int = DEFAULT_GROUP_SIZE, compute_dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        self.compute_dtype = compute_dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if self.in_features % group_size:
            group_size = self.in_features  # one group per row
        self.group_size = group_size
        q, scale = quantize_groups(linear.weight.detach(), group_size)
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def dequantize(self) -> Tensor:
        groups = self.q.view(self.out_features, -1, self.group_size).float() * self.scale.unsqueeze(2)
        return groups.view(self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return F.linear(x, self.dequantize().to(self.compute_dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 groups of {self.group_size}"


def quantize_linears(
    module: nn.Module, group_size: int = DEFAULT_GROUP_SIZE, compute_dtype: torch.dtype = torch.float32
) -> None:
    """Replace every ``nn.Linear`` below ``module`` with its ``Int8Linear``, in place."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear(child, group_size, compute_dtype))
        else:
            quantize_linears(child, group_size, compute_dtype)
