"""Pre-quantized safetensors checkpoints (AWQ, GPTQ): their ``quantization_config`` and where their
packed tensors sit, read without torch (``memory`` sizes such a model from its headers alone).
``quant/prequant.py`` unpacks the tensors into the engine's int4 form.

A quantized linear ``model.layers.{i}.self_attn.q_proj`` stores, instead of ``.weight``, the parts
``.qweight`` / ``.qzeros`` / ``.scales`` (and GPTQ's ``.g_idx``); its canonical name is the one its
``.weight`` would have had (``layers.{i}.q``). What is accepted:

- ``quant_method: awq``: ``bits: 4`` (or AutoAWQ's ``w_bit``), ``version: gemm`` (AutoAWQ's GEMM
  packing; GEMV, Marlin, ExLlama packings are refused), ``zero_point: true``;
- ``quant_method: gptq``: ``bits: 4``, ``checkpoint_format`` (or ``format``) ``gptq`` (v1: the zero
  points are stored minus one, the default) or ``gptq_v2`` (stored as they are); ``desc_act`` either
  way (the loader reads ``g_idx``); no per-module ``dynamic`` overrides;
- for both, a ``group_size`` that is a multiple of 32, or -1 (one group per row). The engine's int4
  groups hold 32, 64 or 128 input channels (what torch's int4 CPU packing and the native kernels take),
  so a larger checkpoint group is held as several engine groups sharing its scale and zero: exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from backends.engine.model.config import UnsupportedModelError
from backends.engine.model.tensor_names import HF_NAMES

PACKED_PARTS = ("qweight", "qzeros", "scales", "g_idx")
ENGINE_GROUP_SIZES = (128, 64, 32)  # largest first: fewest scales
_FORMATS = {"gptq": 1, "gptq_v2": 0}  # GPTQ checkpoint format -> what is added to a stored zero point


class PrequantConfig(msgspec.Struct, frozen=True, kw_only=True):
    """One checkpoint's ``quantization_config``, checked. ``group_size``: -1 for one group per row;
    ``zero_offset``: added to each stored zero point (1 for GPTQ's v1 format)."""

    method: str  # "awq" | "gptq"
    group_size: int
    zero_offset: int = 0

    @classmethod
    def from_hf(cls, metadata: Mapping[str, Any]) -> PrequantConfig | None:
        """From a parsed ``config.json``; None when the checkpoint is not pre-quantized.
        ``UnsupportedModelError`` naming the field for what the engine cannot hold."""
        qc = metadata.get("quantization_config")
        if qc is None:
            return None
        if not isinstance(qc, Mapping):
            raise UnsupportedModelError("config.json: quantization_config is not an object")
        method = str(qc.get("quant_method", "")).lower()
        if method not in ("awq", "gptq"):
            raise UnsupportedModelError(
                f"config.json: quantization_config.quant_method '{qc.get('quant_method')}' is not supported (awq, gptq)"
            )

        def field(*names: str, default: Any = None) -> tuple[str, Any]:
            for name in names:
                if name in qc:
                    return name, qc[name]
            return names[0], default

        key, bits = field("bits", "w_bit", default=4)
        if bits != 4:
            raise UnsupportedModelError(f"config.json: quantization_config.{key} = {bits}: only 4-bit {method} is supported")
        key, group_size = field("group_size", "q_group_size", default=128)
        if not isinstance(group_size, int) or (group_size != -1 and (group_size <= 0 or group_size % min(ENGINE_GROUP_SIZES))):
            raise UnsupportedModelError(
                f"config.json: quantization_config.{key} = {group_size}: the engine's int4 groups need a multiple of 32 (or -1)"
            )
        if method == "awq":
            key, version = field("version", "format", default="gemm")
            if str(version).lower() != "gemm":
                raise UnsupportedModelError(
                    f"config.json: quantization_config.{key} = '{version}': only AWQ's GEMM packing is supported"
                )
            if not qc.get("zero_point", True):
                raise UnsupportedModelError("config.json: quantization_config.zero_point = false: AWQ without zero points is not supported")
            return cls(method=method, group_size=group_size)
        key, fmt = field("checkpoint_format", "format", default="gptq")
        if str(fmt).lower() not in _FORMATS:
            raise UnsupportedModelError(
                f"config.json: quantization_config.{key} = '{fmt}': supported GPTQ formats are {', '.join(_FORMATS)}"
            )
        if qc.get("dynamic"):
            raise UnsupportedModelError("config.json: quantization_config.dynamic: per-module GPTQ overrides are not supported")
        return cls(method=method, group_size=group_size, zero_offset=_FORMATS[str(fmt).lower()])

    def weight_shape(self, qweight_shape: list[int] | tuple[int, ...]) -> tuple[int, int]:
        """``(out_features, in_features)`` of the weight a 4-bit ``qweight`` of this shape packs:
        AWQ ``[in, out / 8]`` (packed along the output), GPTQ ``[in / 8, out]`` (along the input)."""
        rows, cols = int(qweight_shape[0]), int(qweight_shape[1])
        return (cols * 8, rows) if self.method == "awq" else (cols, rows * 8)

    def engine_group_size(self, layer: str, in_features: int) -> int:
        """The int4 group size the engine holds ``layer``'s weight in: the largest of
        ``ENGINE_GROUP_SIZES`` dividing the checkpoint's group (a row, for -1)."""
        group = in_features if self.group_size == -1 else self.group_size
        if in_features % group:
            raise UnsupportedModelError(
                f"{layer}: in_features {in_features} is not a multiple of quantization_config.group_size {group}"
            )
        for size in ENGINE_GROUP_SIZES:
            if group % size == 0:
                return size
        raise UnsupportedModelError(
            f"{layer}: quantization_config.group_size -1 gives groups of {group} input channels, "
            "which the engine's int4 groups (32, 64, 128) do not divide"
        )


def packed_name(key: str) -> tuple[str, str] | None:
    """``(canonical name, part)`` of a packed tensor (``model.layers.0.mlp.up_proj.qweight`` ->
    ``("layers.0.up", "qweight")``); None for any other tensor."""
    stem, _, part = key.rpartition(".")
    if part not in PACKED_PARTS:
        return None
    name = HF_NAMES.canonical(f"{stem}.weight")
    return None if name is None else (name, part)
