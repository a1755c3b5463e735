"""Write a GGUF file's weights again as llama.cpp's ``Q4_K_M`` mix, for ``taxiway bench engine
--compare-quant``: the same model in the K-quant file users download, without llama.cpp.

Each tensor is dequantised by the ``gguf`` package and quantized again by the type llama.cpp's
``Q4_K_M`` picks for it (``llama_tensor_get_type``: Q6_K for the output and for ``attn_v`` /
``ffn_down`` in the layers ``_use_more_bits`` names, Q4_K elsewhere), with its fallback where a
row is not whole 256-blocks (Q4_K -> Q5_0, Q6_K -> Q8_0: SmolLM2's 576-wide rows, so the file is
mostly Q5_0). Q5_0 and Q8_0 are the ``gguf`` package's quantizers; Q4_K and Q6_K the test tools'
(``bench/kquant.py``, checked against the package's decoder): the codes
differ from llama.cpp's search, the types and the bytes per weight are the same.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

#: K-quant -> what llama.cpp uses where a row is not whole super-blocks of 256
FALLBACK = {QT.Q4_K: QT.Q5_0, QT.Q6_K: QT.Q8_0}


def _use_more_bits(layer: int, num_layers: int) -> bool:
    eighth = num_layers // 8
    return layer < eighth or layer >= 7 * num_layers // 8 or (layer - eighth) % 3 == 2


def q4_k_m_type(name: str, num_layers: int, tied: bool) -> QT:
    """The type ``Q4_K_M`` gives tensor ``name`` (before the fallback)."""
    if name == "output.weight" or (name == "token_embd.weight" and tied):
        return QT.Q6_K
    if name.endswith(("attn_v.weight", "ffn_down.weight")):
        layer = int(name.split(".")[1])
        return QT.Q6_K if _use_more_bits(layer, num_layers) else QT.Q4_K
    return QT.Q4_K


def _quantize(w: np.ndarray, qtype: QT) -> np.ndarray:
    if qtype in (QT.Q4_K, QT.Q6_K):
        from bench.kquant import QUANTIZERS

        return QUANTIZERS[qtype.name](w)
    return gguf.quants.quantize(w, qtype)


def write_q4_k_m(src: Path, dst: Path) -> dict[str, int]:
    """``src``'s model as ``Q4_K_M`` in ``dst``; returns how many tensors got each type."""
    reader = gguf.GGUFReader(src)
    arch = str(reader.fields["general.architecture"].contents())
    num_layers = int(reader.fields[f"{arch}.block_count"].contents())
    names = {t.name for t in reader.tensors}
    tied = "output.weight" not in names
    writer = gguf.GGUFWriter(dst, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        if field.name == gguf.Keys.General.FILE_TYPE:
            writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    counts: dict[str, int] = {}
    for t in reader.tensors:
        shape = [int(x) for x in reversed(t.shape)]  # rows first
        if len(shape) == 1 or t.tensor_type in (QT.F32,):  # norms and biases stay float32
            data, qtype = np.asarray(t.data), t.tensor_type
            writer.add_tensor(t.name, data, raw_dtype=qtype if qtype != QT.F32 else None)
        else:
            w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape).astype(np.float32)
            qtype = q4_k_m_type(t.name, num_layers, tied)
            if shape[-1] % 256:
                qtype = FALLBACK[qtype]
            writer.add_tensor(t.name, _quantize(w, qtype), raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts
