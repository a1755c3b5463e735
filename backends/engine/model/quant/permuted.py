"""Weights stored with their input channels in another order (``InputPermutedData``), and the
layer that runs them (``InputPermutedLinear``: ``y = inner(x[:, order])``).

GPTQ with ``desc_act`` quantizes the input channels in order of decreasing activation size, so a
group's channels are scattered along the row (``g_idx``). The engine's int4 groups are contiguous:
the loader sorts the columns by group and each forward gathers the activation to match, one copy
of ``[M, in_features]`` per call, beside the ``M x in x out`` matmul. Such layers keep their packed
int4 weights and the native matmul, but not the native fused layer (``native.fused``, which wants
plain ``Int4Linear`` projections), and tensor parallelism refuses them: a row-parallel slice of the
original channels is not a whole number of groups of the sorted ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import msgspec
import torch
from torch import Tensor, nn

from backends.engine.model.quant.data import Int4Data, WeightData, cat_rows
from backends.engine.model.quant.dense import ConcatLinear


class InputPermutedData(msgspec.Struct, kw_only=True):
    """``data`` holds column ``j`` of the weight at input channel ``order[j]``: ``W[:, order] = data``."""

    data: Int4Data
    order: Tensor  # int64 [K], a permutation of 0..K-1

    def dequantize(self) -> Tensor:
        """The dense weight, columns back in input channel order."""
        return _unpermute(self.data.dequantize(), self.order)


class InputPermutedLinear(nn.Module):
    """``y = inner(x[:, order])``: ``inner`` any linear module over the permuted input channels."""

    def __init__(self, inner: nn.Module, order: Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.in_features = inner.in_features
        self.out_features = inner.out_features
        device = next(iter(inner.buffers())).device
        self.register_buffer("order", order.to(device=device, dtype=torch.int64))

    @property
    def bias(self) -> Tensor | None:
        return self.inner.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x.index_select(-1, self.order))

    def dequantize(self, dtype: torch.dtype | None = None, rows: slice | None = None) -> Tensor:
        return _unpermute(self.inner.dequantize(dtype, rows), self.order)


def _unpermute(w: Tensor, order: Tensor) -> Tensor:
    out = torch.empty_like(w)
    out[:, order] = w
    return out


def permuted_linear(
    parts: Sequence[WeightData | InputPermutedData], biases: Sequence[Tensor | None],
    make_linear: Callable[[WeightData, Tensor | None], nn.Module],
) -> nn.Module:  # fmt: skip
    """One module for row-concatenated ``parts`` of which some are ``InputPermutedData``: one matmul
    where all share one order (GPTQ quantizes q/k/v, and gate/up, on the same inputs, so their
    ``desc_act`` orders agree), else a ``ConcatLinear`` of one module each."""
    orders = [p.order if isinstance(p, InputPermutedData) else None for p in parts]
    first = orders[0]
    if first is not None and all(o is not None and torch.equal(o, first) for o in orders):
        inner = [p.data for p in parts if isinstance(p, InputPermutedData)]
        bias = None if biases[0] is None else torch.cat(list(biases))  # type: ignore[arg-type]
        return InputPermutedLinear(make_linear(cat_rows(inner), bias), first)
    modules = []
    for part, bias in zip(parts, biases, strict=True):
        if isinstance(part, InputPermutedData):
            modules.append(InputPermutedLinear(make_linear(part.data, bias), part.order))
        else:
            modules.append(make_linear(part, bias))
    return ConcatLinear(modules)
