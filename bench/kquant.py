"""A small quantizer for the formats the ``gguf`` package can only decode (Q2_K, Q4_K, Q5_K, Q6_K,
IQ4_NL, IQ4_XS), for test fixtures and ``taxiway bench engine --compare-quant``: its blocks are
checked against ``gguf.quants.dequantize`` by the tests that use them (the values it means are
what the package decodes), not against llama.cpp's choice of codes."""

from __future__ import annotations

import numpy as np

SUPER = 256


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """``[rows, cols]`` float32 (cols a multiple of 256) -> uint8 blocks ``[rows, cols / 256 * 210]``."""
    rows = w.shape[0]
    x = w.reshape(-1, 16, 16).astype(np.float32)  # [blocks, sub-block, 16]
    s = np.abs(x).max(-1) / 31  # [B, 16]
    d = _f16(s.max(-1) / 127)  # [B]
    df = d.astype(np.float32)
    sc = np.where(df[:, None] > 0, np.round(s / np.where(df[:, None] > 0, df[:, None], 1)), 0).clip(-128, 127)
    scale = df[:, None] * sc
    q = np.where(scale[..., None] != 0, np.round(x / np.where(scale[..., None] != 0, scale[..., None], 1)), 0)
    q = (q.clip(-32, 31) + 32).astype(np.uint8).reshape(-1, 2, 128)  # [B, half, 128]
    ql = (q[..., :64] & 15) | ((q[..., 64:] & 15) << 4)  # [B, 2, 64]
    hi = (q >> 4) & 3  # [B, 2, 128]: r = s * 32 + i -> bits 2s of byte i
    qh = sum(hi[..., k * 32 : (k + 1) * 32] << (2 * k) for k in range(4)).astype(np.uint8)  # [B, 2, 32]
    blocks = np.concatenate(
        [ql.reshape(-1, 128), qh.reshape(-1, 64), sc.astype(np.int8).view(np.uint8), d.reshape(-1, 1).view(np.uint8)],
        axis=-1,
    )
    return blocks.reshape(rows, -1)


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """``[rows, cols]`` float32 (cols a multiple of 256) -> uint8 blocks ``[rows, cols / 256 * 144]``."""
    rows = w.shape[0]
    x = w.reshape(-1, 8, 32).astype(np.float32)
    lo = np.minimum(x.min(-1), 0)
    hi = x.max(-1)
    s = (hi - lo) / 15
    m = -lo
    d, dmin = _f16(s.max(-1) / 63), _f16(m.max(-1) / 63)
    df, dmf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.where(df > 0, np.round(s / np.where(df > 0, df, 1)), 0).clip(0, 63).astype(np.uint8)
    mq = np.where(dmf > 0, np.round(m / np.where(dmf > 0, dmf, 1)), 0).clip(0, 63).astype(np.uint8)
    scale, offset = df * sc, dmf * mq
    q = np.where(scale[..., None] > 0, np.round((x + offset[..., None]) / np.where(scale[..., None] > 0, scale[..., None], 1)), 0)
    q = q.clip(0, 15).astype(np.uint8).reshape(-1, 4, 2, 32)
    qs = q[:, :, 0] | (q[:, :, 1] << 4)  # chunk c: sub-blocks 2c (low nibbles), 2c + 1 (high)
    packed = np.concatenate(
        [
            (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6),
            (mq[:, :4] & 63) | ((mq[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 15) | ((mq[:, 4:] & 15) << 4),
        ],
        axis=-1,
    ).astype(np.uint8)
    blocks = np.concatenate(
        [d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8), packed, qs.reshape(-1, 128)], axis=-1
    )
    return blocks.reshape(rows, -1)


def _scale_min_codes(x: np.ndarray, levels: int, field_max: int) -> tuple[np.ndarray, ...]:
    """Per sub-block (last axis) an asymmetric range over ``levels`` codes: the super-block's
    float16 ``d``/``dmin``, the sub-blocks' integer scale and min fields (0..``field_max``), the codes."""
    lo = np.minimum(x.min(-1), 0)
    s = (x.max(-1) - lo) / (levels - 1)
    m = -lo
    d, dmin = _f16(s.max(-1) / field_max), _f16(m.max(-1) / field_max)
    df, dmf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.where(df > 0, np.round(s / np.where(df > 0, df, 1)), 0).clip(0, field_max).astype(np.uint8)
    mq = np.where(dmf > 0, np.round(m / np.where(dmf > 0, dmf, 1)), 0).clip(0, field_max).astype(np.uint8)
    scale, offset = df * sc, dmf * mq
    q = np.where(scale[..., None] > 0, np.round((x + offset[..., None]) / np.where(scale[..., None] > 0, scale[..., None], 1)), 0)
    return d, dmin, sc, mq, q.clip(0, levels - 1).astype(np.uint8)


def quantize_q5_k(w: np.ndarray) -> np.ndarray:
    """``[rows, cols]`` float32 (cols a multiple of 256) -> uint8 blocks ``[rows, cols / 256 * 176]``:
    Q4_K's fields, a fifth bit per weight in ``qh``."""
    rows = w.shape[0]
    d, dmin, sc, mq, q = _scale_min_codes(w.reshape(-1, 8, 32).astype(np.float32), 32, 63)
    low = (q & 15).reshape(-1, 4, 2, 32)
    qs = low[:, :, 0] | (low[:, :, 1] << 4)  # chunk c: sub-blocks 2c (low nibbles), 2c + 1 (high)
    high = (q >> 4).reshape(-1, 8, 32)  # sub-block b's fifth bits: bit b of qh[l]
    qh = sum(high[:, b] << b for b in range(8)).astype(np.uint8)  # [B, 32]
    packed = np.concatenate(
        [(sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6), (mq[:, :4] & 63) | ((mq[:, 4:] >> 4) << 6),
         (sc[:, 4:] & 15) | ((mq[:, 4:] & 15) << 4)], axis=-1,
    ).astype(np.uint8)  # fmt: skip
    blocks = np.concatenate(
        [d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8), packed, qh, qs.reshape(-1, 128)], axis=-1
    )
    return blocks.reshape(rows, -1)


def quantize_q2_k(w: np.ndarray) -> np.ndarray:
    """``[rows, cols]`` float32 (cols a multiple of 256) -> uint8 blocks ``[rows, cols / 256 * 84]``:
    16 sub-blocks of 16, 4-bit scale and min each, 2-bit codes."""
    rows = w.shape[0]
    d, dmin, sc, mq, q = _scale_min_codes(w.reshape(-1, 16, 16).astype(np.float32), 4, 15)
    scales = (sc | (mq << 4)).astype(np.uint8)  # [B, 16]
    q = q.reshape(-1, 2, 4, 32)  # element 128 h + 32 j + l: bits 2j of qs[32 h + l]
    qs = sum(q[:, :, j] << (2 * j) for j in range(4)).astype(np.uint8).reshape(-1, 64)
    blocks = np.concatenate([scales, qs, d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8)], axis=-1)
    return blocks.reshape(rows, -1)


#: IQ4_NL / IQ4_XS's table (llama.cpp's ``kvalues_iq4nl``)
IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)


def _iq4_codes(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The table index nearest ``x / scale`` (scale 0: the code of 1, the value nearest 0)."""
    safe = np.where(scale != 0, scale, 1)[..., None]
    t = np.where(scale[..., None] != 0, x / safe, 0)
    return np.abs(t[..., None] - IQ4_VALUES).argmin(-1).astype(np.uint8)


def _iq4_pack(q: np.ndarray) -> np.ndarray:
    """``[..., 32]`` codes -> ``[..., 16]`` bytes: element i in the low nibble of byte i, 16 + i in the high."""
    return q[..., :16] | (q[..., 16:] << 4)


def _signed_amax(x: np.ndarray) -> np.ndarray:
    """Per last axis the value of largest magnitude, with its sign."""
    return np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)[..., 0]


def quantize_iq4_nl(w: np.ndarray) -> np.ndarray:
    """``[rows, cols]`` float32 (cols a multiple of 32) -> uint8 blocks ``[rows, cols / 32 * 18]``:
    per block of 32 a float16 ``d`` (the largest weight on the table's -127) and 16 bytes of codes."""
    rows = w.shape[0]
    x = w.reshape(-1, 32).astype(np.float32)
    d = _f16(_signed_amax(x) / -127)
    q = _iq4_codes(x, d.astype(np.float32))
    return np.concatenate([d.reshape(-1, 1).view(np.uint8), _iq4_pack(q)], axis=-1).reshape(rows, -1)


def quantize_iq4_xs(w: np.ndarray) -> np.ndarray:
    """``[rows, cols]`` float32 (cols a multiple of 256) -> uint8 blocks ``[rows, cols / 256 * 136]``:
    float16 ``d``, 8 six-bit sub-block scales (``sc - 32``: high 2 bits in ``scales_h``, low 4 in
    ``scales_l``), 8 x 16 bytes of codes laid out as IQ4_NL's."""
    rows = w.shape[0]
    x = w.reshape(-1, 8, 32).astype(np.float32)
    s = _signed_amax(x) / -127  # [B, 8]: each sub-block's ideal scale
    d = _f16(np.abs(s).max(-1) / 31)
    df = d.astype(np.float32)[:, None]
    sc = (np.where(df > 0, np.round(s / np.where(df > 0, df, 1)), 0).clip(-32, 31) + 32).astype(np.uint8)  # [B, 8]
    q = _iq4_codes(x, df * (sc.astype(np.float32) - 32))
    scales_h = sum((sc[:, j].astype(np.uint16) >> 4) << (2 * j) for j in range(8)).astype(np.uint16)
    scales_l = (sc[:, 0::2] & 15) | ((sc[:, 1::2] & 15) << 4)  # [B, 4]
    blocks = np.concatenate(
        [d.reshape(-1, 1).view(np.uint8), scales_h.reshape(-1, 1).view(np.uint8), scales_l, _iq4_pack(q).reshape(-1, 128)],
        axis=-1,
    )
    return blocks.reshape(rows, -1)


QUANTIZERS = {
    "Q2_K": quantize_q2_k, "Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k,
    "IQ4_NL": quantize_iq4_nl, "IQ4_XS": quantize_iq4_xs,
}  # fmt: skip
