"""AWQ and GPTQ packed 4-bit weights -> the engine's int4 form (``Int4Data``), once at load.

Both formats store ``W[n, k] = (q - z) * s`` per group of input channels, with ``q`` and ``z`` in
0..15 packed eight to an int32 (the first value in the low nibble) and ``s`` float16:

- AWQ (AutoAWQ's GEMM packing): ``qweight`` int32 ``[K, N / 8]``, packed along the output in the
  order (0, 2, 4, 6, 1, 3, 5, 7) (nibble ``j`` of word ``c`` is column ``8 c + AWQ_ORDER[j]``);
  ``qzeros`` int32 ``[K / g, N / 8]`` the same way; ``scales`` ``[K / g, N]``.
- GPTQ: ``qweight`` int32 ``[K / 8, N]`` packed along the input in order (nibble ``j`` of row ``r``
  is input channel ``8 r + j``); ``qzeros`` int32 ``[G, N / 8]`` along the output in order, stored
  minus one in the v1 format (``PrequantConfig.zero_offset``); ``scales`` ``[G, N]``; ``g_idx``
  int32 ``[K]``, the group of each input channel (``i // g`` unless ``desc_act``).

The engine's convention is ``W = (q - 8) * scale + zero``: the same ``q`` with ``scale = s`` and
``zero = (8 - z) * s``. In float32 this is exact: ``(8 - z) * s`` and ``(q - 8) * s`` are float16
values times integers below 17 (at most 15 significant bits), and so is their sum ``(q - z) * s``.
With bfloat16 activations the layers hold scale and zero in bfloat16, or, on the native kernels
where ``s`` and ``-z * s`` are float16 values, as float16 ``(d, m)`` pairs (as for GGUF's Q4_1).

GPTQ's ``desc_act`` groups are not contiguous: the columns are sorted by group here and the layer
gathers its input to match (``permuted.InputPermutedData``; the cost is stated there).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from backends.engine.model.config import UnsupportedModelError
from backends.engine.model.prequant_config import PrequantConfig
from backends.engine.model.quant.data import Int4Data
from backends.engine.model.quant.permuted import InputPermutedData

#: AutoAWQ's packing order: nibble j of a word holds output column AWQ_ORDER[j] of its eight
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_AWQ_UNDO = [AWQ_ORDER.index(c) for c in range(8)]  # column c is in nibble _AWQ_UNDO[c]


def unpack_layer(config: PrequantConfig, layer: str, get: Callable[[str], Tensor | None]) -> Int4Data | InputPermutedData:
    """The weight of the packed linear ``layer`` (named in errors), its parts read by ``get(part)``
    (None for a part the file lacks)."""
    parts = {part: get(part) for part in ("qweight", "qzeros", "scales")}
    for part, tensor in parts.items():
        if tensor is None:
            raise UnsupportedModelError(f"{layer}: the {config.method} checkpoint lacks '{layer}.{part}'")
    qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
    assert qweight is not None and qzeros is not None and scales is not None
    for part in ("qweight", "qzeros"):
        if parts[part].dtype != torch.int32 or parts[part].ndim != 2:  # type: ignore[union-attr]
            raise UnsupportedModelError(f"{layer}.{part}: expected a 2-D int32 tensor (4-bit packing), got {parts[part].dtype}")  # type: ignore[union-attr]
    n, k = config.weight_shape(qweight.shape)
    group = k if config.group_size == -1 else config.group_size
    engine_group = config.engine_group_size(layer, k)
    num_groups = k // group
    if tuple(scales.shape) != (num_groups, n) or tuple(qzeros.shape) != (num_groups, n // 8):
        raise UnsupportedModelError(
            f"{layer}: scales {tuple(scales.shape)} / qzeros {tuple(qzeros.shape)} do not match a 4-bit weight "
            f"[{n}, {k}] in groups of quantization_config.group_size {group} (expected {(num_groups, n)} / {(num_groups, n // 8)})"
        )
    if config.method == "awq":
        q = _nibbles(qweight)[..., _AWQ_UNDO].reshape(k, n).t()
        z = _nibbles(qzeros)[..., _AWQ_UNDO].reshape(num_groups, n).t()
    else:
        q = _nibbles(qweight.t()).reshape(n, k)
        z = _nibbles(qzeros).reshape(num_groups, n).t()
    s = scales.t().to(torch.float32)
    zeros = (8.0 - (z.to(torch.float32) + config.zero_offset)) * s
    if engine_group != group:  # one checkpoint group as several engine groups, same scale and zero
        s = s.repeat_interleave(group // engine_group, dim=1)
        zeros = zeros.repeat_interleave(group // engine_group, dim=1)
    order = _input_order(layer, get("g_idx") if config.method == "gptq" else None, k, group)
    if order is not None:
        q = q[:, order]
    data = Int4Data(q=q.contiguous(), scales=s.contiguous(), zeros=zeros.contiguous(), group_size=engine_group)
    return data if order is None else InputPermutedData(data=data, order=order)


def _nibbles(packed: Tensor) -> Tensor:
    """int32 ``[..., C]`` -> uint8 ``[..., C, 8]``, nibble ``j`` (bits ``4 j``) of each word at ``j``.
    Read through the little-endian bytes: one byte per value of temporaries, not four."""
    b = packed.contiguous().view(torch.uint8)  # [..., 4 C]: byte i holds nibbles 2i (low), 2i + 1
    return torch.stack([b & 15, b >> 4], dim=-1).view(*packed.shape, 8)


def _input_order(layer: str, g_idx: Tensor | None, k: int, group: int) -> Tensor | None:
    """The column order that makes GPTQ's groups contiguous (None: already are): input channels
    sorted by ``g_idx``, stable. Each group must then hold ``group`` channels."""
    if g_idx is None:
        return None
    if tuple(g_idx.shape) != (k,):
        raise UnsupportedModelError(f"{layer}.g_idx: shape {tuple(g_idx.shape)}, expected ({k},)")
    g_idx = g_idx.to(torch.int64)
    expected = torch.arange(k) // group
    if torch.equal(g_idx, expected):
        return None
    order = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[order], expected):
        raise UnsupportedModelError(
            f"{layer}.g_idx: its groups do not each hold quantization_config.group_size = {group} input channels"
        )
    return order
