"""GGUF's block formats decoded into the engine's quantized exchange forms, without loss.

Each decoder takes the raw bytes of ``rows`` rows (uint8 ``[rows, row_bytes]``) and returns the
integer codes with their per-group scales (and offsets), never float weights: the layers keep
them packed (``quant.make_linear``). Every format's dequantised value is, in float32,

- ``Q4_0`` ``d * (q - 8)``; ``Q4_1`` ``d * q + m``  (blocks of 32, q in 0..15) -> int4, group 32;
- ``Q8_0`` ``d * q`` (q in -127..127) and ``Q5_0`` ``d * (q - 16)`` (q in 0..31), blocks of 32
  -> per-group int8, group 32;
- ``Q4_K`` ``(d * sc) * q - dmin * m``: super-blocks of 256 in 8 sub-blocks of 32, 6-bit ``sc``
  and ``m`` per sub-block, q in 0..15 -> int4, group 32 (``scale = d * sc``, ``zero = 8 scale - dmin m``);
- ``Q6_K`` ``(d * sc) * (q - 32)``: 16 sub-blocks of 16, int8 ``sc``, q in 0..63 -> int8, group 16;
- ``Q3_K`` ``(d * (sc - 32)) * q``: 16 sub-blocks of 16, 6-bit ``sc``, q in -4..3 -> int8, group 16;
- with a minimum, per-group int8 with offsets (``Int8Data.zeros``, ``scale * q + zero``):
  ``Q5_1`` ``d * q + m`` (blocks of 32, q in 0..31; int8 ``q - 16``, ``zero = m + 16 d``);
  ``Q5_K`` ``(d * sc) * q - dmin * m`` (Q4_K's sub-blocks and 6-bit fields, a fifth bit per
  weight; ``zero = 16 scale - dmin m``); ``Q2_K`` ``(d * sc) * q - dmin * m`` (16 sub-blocks of
  16, 4-bit ``sc`` and ``m``, q in 0..3; ``zero = -dmin m``), group 16;
- ``IQ4_NL`` ``d * v[q]`` (blocks of 32) and ``IQ4_XS`` ``(d * (sc - 32)) * v[q]`` (super-blocks
  of 256 in 8 sub-blocks of 32, 6-bit ``sc`` split in ``scales_l``/``scales_h``): ``q`` in 0..15
  indexes the fixed non-linear table ``v`` (``IQ4_VALUES``, int8 -127..113) -> int8 ``v[q]``, group 32.

``decode_reference`` computes each format's float values in the order its definition does
(the test checks it against the ``gguf`` package bit for bit on random blocks); the forms above
reproduce those values exactly for every format but those with a minimum (``Q4_1``, ``Q4_K``,
``Q5_1``, ``Q5_K``; ``Q2_K``'s offset is not moved), whose re-centred form equals
``scale * q + offset`` up to float32 rounding of the offset.
"""

from __future__ import annotations

import torch
from torch import Tensor

from backends.engine.model.quant import Int4Data, Int8Data, WeightData

SUPER = 256  # elements per K-quant super-block

#: bytes per block and elements per block of each format decoded here
BLOCKS: dict[str, tuple[int, int]] = {
    "Q4_0": (18, 32), "Q4_1": (20, 32), "Q5_0": (22, 32), "Q8_0": (34, 32),
    "Q5_1": (24, 32), "Q2_K": (84, SUPER), "Q3_K": (110, SUPER), "Q4_K": (144, SUPER), "Q5_K": (176, SUPER),
    "Q6_K": (210, SUPER), "IQ4_NL": (18, 32), "IQ4_XS": (136, SUPER),
}  # fmt: skip

#: IQ4_NL / IQ4_XS: the 16 int8 values a 4-bit code indexes (llama.cpp's ``kvalues_iq4nl``)
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _f16(b: Tensor) -> Tensor:
    """float32 of little-endian float16 pairs ``[..., 2]`` -> ``[...]``."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(b: Tensor) -> Tensor:
    """``[..., n]`` bytes -> ``[..., 2n]``: the n low nibbles, then the n high ones."""
    return torch.cat([b & 15, b >> 4], dim=-1)


def _bits(b: Tensor, width: int, count: int) -> Tensor:
    """Fields of ``width`` bits, lowest first: ``[..., n]`` bytes -> ``[..., count, n]``."""
    shifts = torch.arange(0, width * count, width, dtype=torch.uint8).view(count, 1)
    return (b.unsqueeze(-2) >> shifts) & ((1 << width) - 1)


def _k_scale_min(s: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K's 12 bytes of 6-bit scales and mins per super-block -> ``[..., 8]`` each."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], dim=-1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], dim=-1)
    return sc, mn


def _q3_scales(s: Tensor) -> Tensor:
    """Q3_K's 12 bytes of 6-bit scales -> ``[..., 16]`` int (the stored value, 0..63)."""
    low = _nibbles(s[..., 0:8])  # the low 4 bits of scales 0..7 and 8..15
    high = _bits(s[..., 8:12], 2, 4).flatten(-2)  # the high 2 bits, scale j at (j // 4, j % 4)
    return low | (high << 4)


def _codes(name: str, blocks: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """``blocks`` ``[..., nbytes]`` -> ``(q, scale, offset)`` with value ``scale * q + offset``
    (``offset`` None: 0); ``q`` ``[..., elements]``, ``scale``/``offset`` ``[..., groups]``."""
    if name == "Q8_0":
        return blocks[..., 2:34].contiguous().view(torch.int8), _f16(blocks[..., 0:2]).unsqueeze(-1), None
    if name in ("Q4_0", "Q4_1"):
        d = _f16(blocks[..., 0:2]).unsqueeze(-1)
        if name == "Q4_0":
            return _nibbles(blocks[..., 2:18]).to(torch.int8) - 8, d, None
        return _nibbles(blocks[..., 4:20]), d, _f16(blocks[..., 2:4]).unsqueeze(-1)
    if name in ("Q5_0", "Q5_1"):
        at = 2 if name == "Q5_0" else 4  # Q5_1: d, then m
        high = _bits(blocks[..., at : at + 4], 1, 8).transpose(-1, -2).flatten(-2)  # bit i of the uint32 is element i
        q = _nibbles(blocks[..., at + 4 : at + 20]) | (high << 4)
        d = _f16(blocks[..., 0:2]).unsqueeze(-1)
        if name == "Q5_0":
            return q.to(torch.int8) - 16, d, None
        return q, d, _f16(blocks[..., 2:4]).unsqueeze(-1)
    if name == "Q5_K":
        d, dmin = _f16(blocks[..., 0:2]).unsqueeze(-1), _f16(blocks[..., 2:4]).unsqueeze(-1)
        sc, mn = _k_scale_min(blocks[..., 4:16])
        low = _nibbles(blocks[..., 48:176].unflatten(-1, (4, 32))).flatten(-2)  # as Q4_K's
        high = _bits(blocks[..., 16:48], 1, 8).flatten(-2)  # bit b of byte l is element 32 b + l
        return low | (high << 4), d * sc.float(), -(dmin * mn.float())
    if name == "Q2_K":
        scales = blocks[..., 0:16]  # per sub-block of 16: scale in the low nibble, min in the high
        q = _bits(blocks[..., 16:80].unflatten(-1, (2, 32)), 2, 4).flatten(-3)  # as Q3_K's low bits
        d, dmin = _f16(blocks[..., 80:82]).unsqueeze(-1), _f16(blocks[..., 82:84]).unsqueeze(-1)
        return q, d * (scales & 15).float(), -(dmin * (scales >> 4).float())
    if name == "Q4_K":
        d, dmin = _f16(blocks[..., 0:2]).unsqueeze(-1), _f16(blocks[..., 2:4]).unsqueeze(-1)
        sc, mn = _k_scale_min(blocks[..., 4:16])
        q = _nibbles(blocks[..., 16:144].unflatten(-1, (4, 32))).flatten(-2)  # chunk c: sub-blocks 2c, 2c + 1
        return q, d * sc.float(), -(dmin * mn.float())
    if name == "Q6_K":
        low = _nibbles(blocks[..., 0:128].unflatten(-1, (2, 64)))  # [..., 2, 128]
        high = _bits(blocks[..., 128:192].unflatten(-1, (2, 32)), 2, 4)  # [..., 2, 4, 32]
        q = (low | (high.flatten(-2) << 4)).flatten(-2).to(torch.int8) - 32
        scales = blocks[..., 192:208].contiguous().view(torch.int8).float()
        return q, _f16(blocks[..., 208:210]).unsqueeze(-1) * scales, None
    if name == "Q3_K":
        low = _bits(blocks[..., 32:96].unflatten(-1, (2, 32)), 2, 4).flatten(-3)  # [..., 256]
        hmask = _bits(blocks[..., 0:32], 1, 8)  # [..., 8, 32]: bit j of byte i is element 32 j + i
        high = hmask.flatten(-2)  # element 32 j + i, j over halves of 128: same order as ``low``
        q = low.to(torch.int8) - ((high ^ 1) << 2).to(torch.int8)
        scales = (_q3_scales(blocks[..., 96:108]).to(torch.int8) - 32).float()
        return q, _f16(blocks[..., 108:110]).unsqueeze(-1) * scales, None
    if name == "IQ4_NL":
        return _iq4(_nibbles(blocks[..., 2:18])), _f16(blocks[..., 0:2]).unsqueeze(-1), None
    if name == "IQ4_XS":
        high = _bits(blocks[..., 2:4], 2, 4).transpose(-1, -2).flatten(-2)  # sub-block j: bits 2j of the uint16
        low = torch.stack([blocks[..., 4:8] & 15, blocks[..., 4:8] >> 4], dim=-1).flatten(-2)  # j: nibble j % 2 of byte j // 2
        scales = ((low | (high << 4)).to(torch.int8) - 32).float()
        q = _iq4(_nibbles(blocks[..., 8:136].unflatten(-1, (8, 16))).flatten(-2))  # sub-block j: bytes 16 j.., as IQ4_NL's
        return q, _f16(blocks[..., 0:2]).unsqueeze(-1) * scales, None
    raise KeyError(name)


def _iq4(codes: Tensor) -> Tensor:
    """4-bit codes -> the int8 values of ``IQ4_VALUES`` they index."""
    return torch.tensor(IQ4_VALUES, dtype=torch.int8)[codes.long()]


def _groups(name: str) -> int:
    return {"Q6_K": 16, "Q3_K": 16, "Q2_K": 16}.get(name, 32)


def decode_reference(name: str, raw: Tensor) -> Tensor:
    """float32 values of ``raw`` blocks (uint8 ``[rows, row_bytes]``), each format's definition."""
    nbytes, per_block = BLOCKS[name]
    blocks = raw.view(raw.shape[0], -1, nbytes)
    q, scale, offset = _codes(name, blocks)
    gs = _groups(name)
    w = scale.unsqueeze(-1) * q.float().unflatten(-1, (-1, gs))
    if offset is not None:
        w = w + offset.unsqueeze(-1)
    return w.reshape(raw.shape[0], -1)


def decode(name: str, raw: Tensor) -> WeightData:
    """The exchange form of ``raw`` blocks (uint8 ``[rows, row_bytes]``), see the module docstring."""
    nbytes, _ = BLOCKS[name]
    rows = raw.shape[0]
    q, scale, offset = _codes(name, raw.view(rows, -1, nbytes))
    q, scale = q.reshape(rows, -1), scale.reshape(rows, -1)
    gs = _groups(name)
    if name in ("Q4_1", "Q4_K"):  # int4 convention: (q - 8) * scale + zero
        assert offset is not None
        return Int4Data(q=q.to(torch.uint8), scales=scale, zeros=offset.reshape(rows, -1) + 8.0 * scale, group_size=gs)
    if name == "Q4_0":
        return Int4Data(q=(q + 8).to(torch.uint8), scales=scale, zeros=torch.zeros_like(scale), group_size=gs)
    if offset is not None:  # Q5_1, Q5_K, Q2_K: codes from 0, centred for int8, the centre in the offset
        centre = 16 if name != "Q2_K" else 0
        zeros = offset.reshape(rows, -1) + centre * scale
        return Int8Data(q=(q.to(torch.int16) - centre).to(torch.int8), scales=scale, group_size=gs, zeros=zeros)
    return Int8Data(q=q.to(torch.int8), scales=scale, group_size=gs)
