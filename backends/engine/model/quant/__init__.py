"""Weight-only quantized linear layers, and the plain-torch reference that defines them.

- ``data``: the exchange forms (``Int4Data``, ``Int8Data``) and the quantizers;
- ``layouts``: the packed layouts, and where the native kernels run them;
- ``int4`` / ``int5`` / ``int8`` / ``dense``: the modules (``Int4Linear``; ``Int5Linear``; ``Int8Linear``,
  ``Int8GroupLinear``, ``Int8NativeLinear``; ``DenseLinear``, ``ConcatLinear``).

Every module keeps ``forward(x[M, in]) -> [M, out]``, a ``dequantize(dtype)`` reference and an
``embed(ids, dtype)`` row gather. Float32 activations take the dequantise path (the reference);
bfloat16 ones the packed kernels. ``make_linear`` picks the module and its layout; the native
layouts need the loaded native kernels passed in (``kernels``), which the module keeps.

For tensor parallelism the quantized tensors shard along whole rows (column parallel) and whole
groups (row parallel): ``to_data()`` unpacks to the exchange form, which can be sliced and packed
again with ``make_linear``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from backends.engine.model.quant.data import (
    DEFAULT_GROUP_SIZE,
    Int4Data,
    Int8Data,
    WeightData,
    cat_rows,
    int8_per_channel,
    quantize_int4,
    quantize_int8,
    same_kind,
)
from backends.engine.model.quant.dense import ConcatLinear, DenseLinear, Linear
from backends.engine.model.quant.int4 import Int4Linear
from backends.engine.model.quant.int5 import Int5Linear, Int6Linear, narrow_class
from backends.engine.model.quant.int8 import Int8GroupLinear, Int8Linear, Int8NativeLinear, Int8OffsetLinear
from backends.engine.model.quant.layouts import runs_native

if TYPE_CHECKING:
    from backends.engine.native.ckernels import Kernels


def make_linear(
    data: WeightData, *, bias: Tensor | None = None, dtype: torch.dtype, device: torch.device | str = "cpu",
    kernels: Kernels | None = None,
) -> nn.Module:  # fmt: skip
    """The module for ``data``: ``Int4Data`` -> ``Int4Linear``; ``Int8Data`` -> ``Int5Linear`` where
    its codes fit five bits and ``kernels`` run it, ``Int6Linear`` where six without zeros, else ``Int8Linear`` per channel, per group
    ``Int8NativeLinear`` (where ``kernels`` run it) or ``Int8GroupLinear`` (with offsets: inside an ``Int8OffsetLinear``);
    a float tensor -> ``DenseLinear``. ``kernels``: the loaded native kernels, or None for
    torch's layouts only."""
    if isinstance(data, Int4Data):
        return Int4Linear.from_data(data, bias=bias, dtype=dtype, device=device, kernels=kernels)
    if isinstance(data, Int8Data):
        k = data.q.shape[1]
        if kernels is not None and runs_native(kernels.has_int5_matmul, torch.device(device), dtype, k, data.group_size, 8):
            narrow = narrow_class(data)
            if narrow is not None:
                return narrow.from_data(data, kernels=kernels, bias=bias, dtype=dtype)
        if data.zeros is not None:
            inner = make_linear(data.symmetric(), bias=bias, dtype=dtype, device=device, kernels=kernels)
            return Int8OffsetLinear(inner, data.zeros, data.group_size)
        if data.group_size == data.q.shape[1]:
            return Int8Linear.from_data(data, bias=bias, dtype=dtype, device=device)
        if kernels is not None and runs_native(kernels.has_int8_matmul, torch.device(device), dtype, k, data.group_size, 2):
            return Int8NativeLinear.from_data(data, kernels=kernels, bias=bias, dtype=dtype)
        return Int8GroupLinear.from_data(data, bias=bias, dtype=dtype, device=device, kernels=kernels)
    return DenseLinear.from_data(data, bias=bias, dtype=dtype, device=device)


__all__ = [
    "DEFAULT_GROUP_SIZE", "ConcatLinear", "DenseLinear", "Int4Data", "Int4Linear", "Int5Linear", "Int6Linear", "Int8Data", "Int8GroupLinear",
    "Int8Linear", "Int8NativeLinear", "Int8OffsetLinear", "Linear", "WeightData", "cat_rows", "int8_per_channel", "make_linear",
    "quantize_int4", "quantize_int8", "same_kind",
]  # fmt: skip
