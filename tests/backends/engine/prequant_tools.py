"""AWQ and GPTQ checkpoints of a tiny HF model, packed the way AutoAWQ (``WQLinear_GEMM``) and
AutoGPTQ / GPTQModel (``QuantLinear.pack``) pack them, for the loader's tests.

The quantizers are the tools' round-to-nearest min/max ones (GPTQ's error feedback changes which
codes are chosen, not how they are stored). The packers are written the tools' way, a column or a
row of int32 words at a time with shifts and ORs, so they share no code with the engine's
vectorised unpacking (``backends/engine/model/quant/prequant.py``); where AutoAWQ and AutoGPTQ
import, ``test_prequant_tools.py`` checks these bytes against theirs.

``write_awq`` / ``write_gptq`` return the checkpoint directory and an HF model holding exactly the
weights it means: ``(q - z) * s`` in float32, the float tensors rounded to float16 as stored.
"""

from __future__ import annotations

import copy
import json
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

AWQ_ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: word nibble i holds column 8 c + AWQ_ORDER_MAP[i]


class Quantized:
    """One linear's codes: ``q`` [N, K], ``z`` [N, G], ``s`` float16 [N, G], ``g_idx`` [K]."""

    def __init__(self, q: Tensor, z: Tensor, s: Tensor, g_idx: Tensor) -> None:
        self.q, self.z, self.s, self.g_idx = q, z, s, g_idx

    def dequantize(self) -> Tensor:
        """``(q - z) * s`` per input channel's group, float32 [N, K]."""
        z = self.z[:, self.g_idx].to(torch.float32)
        s = self.s[:, self.g_idx].to(torch.float32)
        return (self.q.to(torch.float32) - z) * s


# -- quantizers -----------------------------------------------------------------------------


def quantize_awq(w: Tensor, group_size: int) -> Quantized:
    """AutoAWQ's ``pseudo_quantize_tensor`` with zero points: min/max per group, zero in 0..15."""
    n, k = w.shape
    g = w.reshape(n, k // group_size, group_size)
    hi, lo = g.amax(-1), g.amin(-1)
    s = ((hi - lo).clamp(min=1e-5) / 15).to(torch.float16)
    z = (-torch.round(lo / s.float())).clamp(0, 15)
    q = (torch.round(g / s.float().unsqueeze(-1)) + z.unsqueeze(-1)).clamp(0, 15)
    return Quantized(q.reshape(n, k).to(torch.int32), z.to(torch.int32), s, torch.arange(k) // group_size)


def quantize_gptq(w: Tensor, group_size: int, *, sym: bool, desc_act: bool, seed: int = 0) -> Quantized:
    """GPTQ's quantizer (``Quantizer.find_params``: the range stretched to include 0; ``sym``: zero
    at 8). ``desc_act``: the channels are grouped in a shuffled order (GPTQ's is by decreasing
    Hessian diagonal) and ``g_idx`` says each channel's group, as AutoGPTQ stores it."""
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    order = torch.randperm(k, generator=torch.Generator().manual_seed(seed)) if desc_act else torch.arange(k)
    g_idx = torch.empty(k, dtype=torch.int64)
    g_idx[order] = torch.arange(k) // gs
    groups = k // gs
    q = torch.empty(n, k, dtype=torch.int32)
    z = torch.empty(n, groups, dtype=torch.int32)
    s = torch.empty(n, groups, dtype=torch.float16)
    for grp in range(groups):
        cols = (g_idx == grp).nonzero().squeeze(1)
        x = w[:, cols]
        xmin = x.amin(1).clamp(max=0)
        xmax = x.amax(1).clamp(min=0)
        if sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = torch.where(xmin < 0, -xmax, xmin)
        scale = ((xmax - xmin) / 15).to(torch.float16)
        zero = torch.full_like(xmax, 8.0) if sym else torch.round(-xmin / scale.float())
        q[:, cols] = (torch.round(x / scale.float().unsqueeze(1)) + zero.unsqueeze(1)).clamp(0, 15).to(torch.int32)
        z[:, grp], s[:, grp] = zero.to(torch.int32), scale
    return Quantized(q, z, s, g_idx)


# -- packers (the tools' loops) -------------------------------------------------------------


def pack_awq(qt: Quantized) -> dict[str, Tensor]:
    """``WQLinear_GEMM.from_linear``'s packing: ``qweight`` [K, N / 8], ``qzeros`` [G, N / 8], both
    along the output in ``AWQ_ORDER_MAP``; ``scales`` [G, N] float16."""
    intweight = qt.q.t().numpy().astype(np.uint32)  # [K, N]
    zeros = qt.z.t().numpy().astype(np.uint32)  # [G, N]
    qweight = np.zeros((intweight.shape[0], intweight.shape[1] // 8), dtype=np.uint32)
    qzeros = np.zeros((zeros.shape[0], zeros.shape[1] // 8), dtype=np.uint32)
    for col in range(qweight.shape[1]):
        for i in range(8):
            qweight[:, col] |= intweight[:, col * 8 + AWQ_ORDER_MAP[i]] << (i * 4)
            qzeros[:, col] |= zeros[:, col * 8 + AWQ_ORDER_MAP[i]] << (i * 4)
    return {
        "qweight": torch.from_numpy(qweight.view(np.int32)),
        "qzeros": torch.from_numpy(qzeros.view(np.int32)),
        "scales": qt.s.t().contiguous(),
    }


def pack_gptq(qt: Quantized, *, v1: bool = True) -> dict[str, Tensor]:
    """``QuantLinear.pack``'s layout: ``qweight`` [K / 8, N] along the input in order, ``qzeros``
    [G, N / 8] along the output in order, minus one in the v1 format (``checkpoint_format: gptq``),
    ``scales`` [G, N] float16, ``g_idx`` int32 [K]."""
    intweight = qt.q.t().numpy().astype(np.uint32)  # [K, N]
    stored = qt.z - 1 if v1 else qt.z
    assert int(stored.min()) >= 0, "a zero point of 0 has no v1 encoding (AutoGPTQ wraps it to -1)"
    zeros = stored.t().numpy().astype(np.uint32)  # [G, N]
    qweight = np.zeros((intweight.shape[0] // 8, intweight.shape[1]), dtype=np.uint32)
    row = i = 0
    while row < qweight.shape[0]:
        for j in range(i, i + 8):
            qweight[row] |= intweight[j] << (4 * (j - i))
        i += 8
        row += 1
    qzeros = np.zeros((zeros.shape[0], zeros.shape[1] // 8), dtype=np.uint32)
    col = i = 0
    while col < qzeros.shape[1]:
        for j in range(i, i + 8):
            qzeros[:, col] |= zeros[:, j] << (4 * (j - i))
        i += 8
        col += 1
    return {
        "qweight": torch.from_numpy(qweight.view(np.int32)),
        "qzeros": torch.from_numpy(qzeros.view(np.int32)),
        "scales": qt.s.t().contiguous(),
        "g_idx": qt.g_idx.to(torch.int32),
    }


# -- checkpoints ----------------------------------------------------------------------------


def _quantized_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The decoder layers' linears (what both tools quantize; the embedding and lm_head stay float)."""
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and name.startswith("model.layers.")]


def _write(model: nn.Module, path: Path, qconfig: dict, quantize, pack) -> tuple[Path, nn.Module]:  # type: ignore[no-untyped-def]
    path.mkdir(parents=True, exist_ok=True)
    reference = copy.deepcopy(model)
    tensors: dict[str, Tensor] = {}
    linears = dict(_quantized_linears(model))
    with torch.no_grad():
        for name, p in reference.named_parameters():
            stem, _, leaf = name.rpartition(".")
            if stem in linears and leaf == "weight":
                qt = quantize(p.detach().clone(), stem)
                tensors.update({f"{stem}.{part}": t for part, t in pack(qt).items()})
                p.copy_(qt.dequantize())
            else:  # stored float16, as the tools save them
                tensors[name] = p.detach().to(torch.float16).contiguous()
                p.copy_(tensors[name].float())
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(path / "model.safetensors"))
    cfg = model.config.to_dict()
    cfg["quantization_config"] = qconfig
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path, reference.eval()


def write_awq(model: nn.Module, path: Path, *, group_size: int = 128) -> tuple[Path, nn.Module]:
    """An AutoAWQ GEMM checkpoint of ``model`` and the HF model holding what it means."""
    qconfig = {"quant_method": "awq", "bits": 4, "group_size": group_size, "version": "gemm", "zero_point": True}
    return _write(model, path, qconfig, lambda w, _: quantize_awq(w, group_size), pack_awq)


def write_gptq(
    model: nn.Module, path: Path, *, group_size: int = 128, sym: bool = True, desc_act: bool = False, v1: bool = True
) -> tuple[Path, nn.Module]:
    """A GPTQ checkpoint of ``model`` (``v1``: ``checkpoint_format: gptq``, else ``gptq_v2``) and the
    HF model holding what it means. With ``desc_act`` the linears that read the same input (q/k/v,
    gate/up) share one channel order, as GPTQ's Hessian of that input gives them."""
    qconfig = {
        "quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": desc_act, "sym": sym,
        "checkpoint_format": "gptq" if v1 else "gptq_v2", "static_groups": False, "true_sequential": True,
    }  # fmt: skip

    def quantize(w: Tensor, name: str) -> Quantized:
        layer, proj = name.rsplit(".", 1)
        same_input = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}.get(proj, proj)
        seed = zlib.crc32(f"{layer}.{same_input}".encode())
        return quantize_gptq(w, group_size, sym=sym, desc_act=desc_act, seed=seed)

    return _write(model, path, qconfig, quantize, lambda qt: pack_gptq(qt, v1=v1))
