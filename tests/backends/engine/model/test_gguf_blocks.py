"""GGUF block decoding (``model/gguf_blocks.py``) against the ``gguf`` package, bit for bit.

Random bytes are valid blocks of every format once their float16 scales are finite, so each
format's every code, scale and (for the K-quants) packed 6-bit sub-block field is exercised on
thousands of blocks, with no quantizer involved."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from backends.engine.model.gguf_blocks import BLOCKS, decode, decode_reference
from backends.engine.model.quant import Int4Data

#: byte offsets of each format's float16 fields within a block
F16_FIELDS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82], "Q3_K": [108],
    "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_NL": [0], "IQ4_XS": [0],
}  # fmt: skip


def random_blocks(name: str, rows: int, blocks_per_row: int, seed: int) -> np.ndarray:
    nbytes, _ = BLOCKS[name]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, blocks_per_row, nbytes), dtype=np.uint8)
    for off in F16_FIELDS[name]:
        scales = (rng.standard_normal((rows, blocks_per_row)) * 0.05).astype(np.float16)
        raw[..., off : off + 2] = scales.view(np.uint8).reshape(rows, blocks_per_row, 2)
    return raw.reshape(rows, -1)


def test_every_format_is_listed_with_its_float16_fields() -> None:
    assert set(F16_FIELDS) == set(BLOCKS)
    for name, (nbytes, elements) in BLOCKS.items():
        assert (elements, nbytes) == gguf.GGML_QUANT_SIZES[QT[name]]


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_decode_equals_the_gguf_package_bit_for_bit(name: str) -> None:
    raw = random_blocks(name, rows=64, blocks_per_row=8, seed=len(name) + BLOCKS[name][0])
    expected = gguf.quants.dequantize(raw, QT[name]).reshape(raw.shape[0], -1).astype(np.float32)
    ours = decode_reference(name, torch.from_numpy(raw.copy())).numpy()
    assert ours.shape == expected.shape
    assert np.array_equal(ours.view(np.uint32), expected.view(np.uint32))
    # the exchange form the layers pack: the same values (Q4_1 / Q4_K: (q - 8) * scale + zero,
    # Q5_1 / Q5_K: (q - 16) * scale + zero, equal up to float32 rounding of the zero; every other
    # format exactly)
    data = decode(name, torch.from_numpy(raw.copy()))
    values = data.dequantize().numpy()
    if name in ("Q4_1", "Q4_K", "Q5_1", "Q5_K"):
        np.testing.assert_allclose(values, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())
    else:  # equal as numbers (Q4_0's "+ zero" turns -0.0 into 0.0)
        assert np.array_equal(values, expected)
    assert data.group_size == (16 if name in ("Q2_K", "Q3_K", "Q6_K") else 32)
