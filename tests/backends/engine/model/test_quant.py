"""Quantized linear modules: packed kernels vs the plain-torch dequantise reference, exact
round trips of the unpacked form (what tensor parallelism slices), embedding row gathers, and
GGUF block decoding vs the ``gguf`` package's own dequantiser."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT

from backends.engine.model import quant
from backends.engine.model.quant import dense, int4, layouts
from backends.engine.model.gguf_loader import _decode
from backends.engine.model.quant import (
    Int4Data,
    Int4Linear,
    Int8Linear,
    cat_rows,
    int8_per_channel,
    quantize_int4,
    quantize_int8,
)
from tests.backends.engine.engine_helpers import default_kernels


def weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("n, k", [(192, 576), (200, 64), (64, 1536)])
def test_int4_dequantize_is_exact_in_float32(n: int, k: int) -> None:
    data = quantize_int4(weights(n, k))
    mod = Int4Linear.from_data(data, dtype=torch.float32)
    torch.testing.assert_close(mod.dequantize(torch.float32), data.dequantize(), rtol=0, atol=1e-7)
    back = mod.to_data()
    assert torch.equal(back.q, data.q)
    assert torch.equal(back.scales, data.scales) and torch.equal(back.zeros, data.zeros)


def test_int4_quantization_error_is_within_half_a_step() -> None:
    w = weights(128, 256)
    data = quantize_int4(w)
    step = data.scales.repeat_interleave(data.group_size, dim=1)
    assert ((data.dequantize() - w).abs() <= 0.5 * step + 1e-6).all()


@pytest.fixture(params=["native", "torch_cpu"])
def int4_layout(request):  # type: ignore[no-untyped-def]
    """Both CPU bfloat16 int4 kernels: the native one (where this machine builds it) and torch's,
    as ``(layout, the kernels to build the layer with)``."""
    if request.param == "torch_cpu":
        return "torch_cpu", None
    kernels = default_kernels()
    if kernels is None or not kernels.has_int4_matmul:
        pytest.skip("this machine builds no native int4 kernel (needs a C compiler and AVX-512 BF16)")
    return "native", kernels


@pytest.mark.parametrize("rows", [1, 4, 64, 300])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_int4_packed_kernel_is_exact_weights_summed_in_float32(int4_layout, rows: int, seed: int) -> None:  # type: ignore[no-untyped-def]
    """Against the float64 product of the same (bfloat16-scaled) weights: the output is that value
    rounded once to bfloat16 (half an ulp, ``2**-8`` relative), give or take the float32
    accumulation, which is bounded by one float32 rounding of ``sum |w| |x|`` (a naive float32 sum
    may err by up to K of those). Comparing with a float32 ``F.linear`` instead would flake: on
    outputs that cancel to near zero either kernel lands over half an ulp from it on some seeds."""
    data = quantize_int4(weights(256, 576, seed))
    layout, kernels = int4_layout
    mod = Int4Linear.from_data(data, dtype=torch.bfloat16, kernels=kernels)
    assert mod.layout == layout
    x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(seed + 1)).bfloat16()
    w = mod.dequantize(torch.float32).double()  # the stored weights, exactly
    truth = F.linear(x.double(), w)
    accumulation = F.linear(x.double().abs(), w.abs()) * 2**-24
    out = mod(x).double()
    assert ((out - truth).abs() <= truth.abs() * 2**-8 + accumulation).all()


def test_int4_dense_tile_option_tracks_the_kernel(monkeypatch) -> None:
    monkeypatch.setattr(int4, "INT4_DENSE_TILE_MIN_ROWS", 16)
    data = quantize_int4(weights(256, 576))
    mod = Int4Linear.from_data(data, dtype=torch.bfloat16)
    x = torch.randn(40, 576).bfloat16()
    ref = F.linear(x.float(), mod.dequantize(torch.float32))
    torch.testing.assert_close(mod(x).float(), ref, atol=1e-2 * ref.abs().max().item(), rtol=0)


def test_int4_float32_activations_take_the_exact_path() -> None:
    data = quantize_int4(weights(128, 128))
    mod = Int4Linear.from_data(data, dtype=torch.float32, bias=torch.randn(128))
    x = torch.randn(3, 128)
    torch.testing.assert_close(mod(x), F.linear(x, data.dequantize(), mod.bias), rtol=1e-6, atol=1e-6)


def test_int4_padded_rows_and_embedding_gather() -> None:
    data = quantize_int4(weights(200, 64))  # 200 rows: padded to 256 for the CPU layout
    mod = Int4Linear.from_data(data, dtype=torch.float32)
    assert mod.padded_out == 256 and mod(torch.randn(2, 64)).shape == (2, 200)
    ids = torch.tensor([0, 31, 32, 63, 64, 199, 5, 5])
    torch.testing.assert_close(mod.embed(ids), data.dequantize()[ids], rtol=0, atol=1e-7)


def test_int4_shards_along_rows_and_groups_and_repacks_exactly() -> None:
    """What tensor parallelism does: unpack, take whole rows / whole groups, pack again."""
    data = quantize_int4(weights(256, 256))
    mod = Int4Linear.from_data(data, dtype=torch.float32)
    full = mod.dequantize(torch.float32)
    back = mod.to_data()
    top = Int4Linear.from_data(back.rows(slice(0, 128)), dtype=torch.float32)
    torch.testing.assert_close(top.dequantize(torch.float32), full[:128], rtol=0, atol=0)
    left = Int4Data(q=back.q[:, :64].contiguous(), scales=back.scales[:, :2], zeros=back.zeros[:, :2], group_size=32)
    torch.testing.assert_close(Int4Linear.from_data(left, dtype=torch.float32).dequantize(), full[:, :64], rtol=0, atol=0)
    both = cat_rows([back.rows(slice(128, 256)), back.rows(slice(0, 128))])
    torch.testing.assert_close(Int4Linear.from_data(both, dtype=torch.float32).dequantize(), full.roll(128, 0), rtol=0, atol=0)


def test_int4_row_chunked_dequantize() -> None:
    data = quantize_int4(weights(256, 64))
    mod = Int4Linear.from_data(data, dtype=torch.float32)
    torch.testing.assert_close(mod.dequantize(torch.float32, slice(64, 192)), data.dequantize()[64:192], rtol=0, atol=0)


@pytest.mark.parametrize("rows", [1, quant.int8.INT8_KERNEL_MAX_ROWS, quant.int8.INT8_KERNEL_MAX_ROWS + 1])
def test_int8_per_channel_kernel_matches_reference(rows: int) -> None:
    data = quantize_int8(weights(320, 192))
    mod = Int8Linear.from_data(data, dtype=torch.bfloat16)
    assert mod.per_channel
    x = torch.randn(rows, 192).bfloat16()
    ref = F.linear(x.float(), mod.dequantize(torch.float32))
    torch.testing.assert_close(mod(x).float(), ref, atol=1e-2 * ref.abs().max().item(), rtol=0)


def test_int8_per_group_is_exact_and_gathers_rows() -> None:
    data = quantize_int8(weights(96, 128), group_size=32)
    mod = Int8Linear.from_data(data, dtype=torch.float32)
    torch.testing.assert_close(mod.dequantize(), data.dequantize(), rtol=0, atol=0)
    x = torch.randn(5, 128)
    torch.testing.assert_close(mod(x), F.linear(x, data.dequantize()), rtol=1e-6, atol=1e-6)
    ids = torch.tensor([3, 0, 95])
    torch.testing.assert_close(mod.embed(ids), data.dequantize()[ids], rtol=0, atol=0)


def test_int8_per_channel_requantization_error_is_bounded() -> None:
    w = weights(64, 576)
    group = quantize_int8(w, group_size=32)
    channel = int8_per_channel(group)
    assert channel.group_size == 576
    err = (channel.dequantize() - group.dequantize()).abs()
    assert (err <= 0.5 * channel.scales + 1e-7).all()  # half a per-channel step


def test_large_vocab_dequantise_path_is_chunked(monkeypatch) -> None:
    monkeypatch.setattr(dense, "DEQUANT_CHUNK_ROWS", 64)
    data = quantize_int8(weights(200, 64))
    mod = Int8Linear.from_data(data, dtype=torch.float32)
    x = torch.randn(2, 64)
    torch.testing.assert_close(mod(x), F.linear(x, data.dequantize()), rtol=1e-6, atol=1e-6)
    data4 = quantize_int4(weights(256, 64))
    mod4 = Int4Linear.from_data(data4, dtype=torch.float32)
    torch.testing.assert_close(mod4(x), F.linear(x, data4.dequantize()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q8_0, QT.F16, QT.BF16, QT.F32])
def test_gguf_blocks_decode_like_the_gguf_package(qtype) -> None:
    w = weights(70, 96, seed=4).numpy()
    if qtype == QT.F16:
        raw = w.astype(np.float16)
    elif qtype == QT.F32:
        raw = w
    else:
        raw = gguf.quants.quantize(w, qtype)
    expected = torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(70, 96).astype(np.float32))
    decoded = _decode(raw.reshape(70, -1).view(np.uint8), qtype, 70, 96)
    ours = decoded.float() if isinstance(decoded, torch.Tensor) else decoded.dequantize()
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-7)


def test_int8_per_group_through_the_int4_kernel_is_exact() -> None:
    """Q8_0 as two nibbles per weight in the int4 kernel (``Int8GroupLinear``)."""
    data = quantize_int8(weights(200, 576, seed=5), group_size=32)
    data.q[0, :4] = torch.tensor([127, -127, -128 + 1, 0], dtype=torch.int8)  # the extremes
    exact = data.dequantize()
    ref32 = quant.make_linear(data, dtype=torch.float32)
    assert isinstance(ref32, quant.Int8GroupLinear) and isinstance(ref32, Int8Linear)
    torch.testing.assert_close(ref32.dequantize(), exact, rtol=0, atol=0)
    back = ref32.to_data()
    assert torch.equal(back.q, data.q) and torch.equal(back.scales, data.scales)
    ids = torch.tensor([0, 5, 63, 64, 199])
    torch.testing.assert_close(ref32.embed(ids), exact[ids], rtol=0, atol=0)
    x = torch.randn(3, 576)
    torch.testing.assert_close(ref32(x), F.linear(x, exact), rtol=1e-5, atol=1e-5)
    # bfloat16: the packed kernel, d rounded to bfloat16; vs float32 math on those weights
    fast = quant.make_linear(data, dtype=torch.bfloat16)
    xb = x.bfloat16()
    ref = F.linear(xb.float(), fast.dequantize(torch.float32))
    torch.testing.assert_close(fast(xb).float(), ref, atol=1e-2 * ref.abs().max().item(), rtol=0)
    torch.testing.assert_close(fast.embed(ids, torch.float32), fast.dequantize(torch.float32)[ids], rtol=0, atol=0)


def test_int4_packing_in_row_chunks_equals_packing_whole(monkeypatch) -> None:
    data = quantize_int4(weights(320, 128))
    whole = Int4Linear.from_data(data, dtype=torch.float32)
    monkeypatch.setattr(layouts, "PACK_CHUNK_ROWS", 128)
    chunked = Int4Linear.from_data(data, dtype=torch.float32)
    assert torch.equal(chunked.weight, whole.weight)


def test_int8_per_group_vocabulary_is_packed_in_row_chunks(monkeypatch) -> None:
    data = quantize_int8(weights(300, 64), group_size=32)  # 300 rows: the last chunk is padded
    whole = quant.make_linear(data, dtype=torch.float32)
    monkeypatch.setattr(layouts, "PACK_CHUNK_ROWS", 128)
    chunked = quant.make_linear(data, dtype=torch.float32)
    assert torch.equal(chunked.inner.weight, whole.inner.weight)
    assert torch.equal(chunked.inner.scales_and_zeros, whole.inner.scales_and_zeros)
    torch.testing.assert_close(chunked.dequantize(), data.dequantize(), rtol=0, atol=0)


@pytest.mark.parametrize("qtype", [QT.Q5_1, QT.Q5_K, QT.Q2_K])
@pytest.mark.parametrize("native", [False, True])
def test_int8_with_offsets_is_the_gguf_weight(qtype, native: bool) -> None:
    """Formats with a minimum (``d * q + m``) as per-group int8 plus an offset per group
    (``Int8OffsetLinear``): the gguf package's values, the matmul of them, rows gathered, the
    exchange form round-tripped and sliced as tensor parallelism slices it."""
    from backends.engine.tp.shard import _take_cols

    from tests.backends.engine.model.test_gguf_blocks import random_blocks

    n, k = 80, 512
    raw = random_blocks(qtype.name, rows=n, blocks_per_row=k // gguf.GGML_QUANT_SIZES[qtype][0], seed=6)  # any bytes are blocks
    expected = torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(n, k).astype(np.float32))
    data = _decode(raw, qtype, n, k)
    assert data.zeros is not None
    kernels = default_kernels() if native else None
    exact = quant.make_linear(data, dtype=torch.float32, kernels=kernels)
    assert isinstance(exact, quant.Int8OffsetLinear)
    torch.testing.assert_close(exact.dequantize(), expected, rtol=1e-6, atol=1e-6)
    x = torch.randn(6, k, generator=torch.Generator().manual_seed(7))
    ref32 = F.linear(x, expected)  # the offsets summed apart: float32 rounding of a 512-term sum
    torch.testing.assert_close(exact(x), ref32, rtol=0, atol=1e-5 * ref32.abs().max().item() * k**0.5)
    ids = torch.tensor([0, 17, 79])
    torch.testing.assert_close(exact.embed(ids), expected[ids], rtol=1e-6, atol=1e-6)
    back = exact.to_data()
    torch.testing.assert_close(back.dequantize(), expected, rtol=1e-6, atol=1e-6)
    half = _take_cols(back, 0, k // 2)
    torch.testing.assert_close(half.dequantize(), expected[:, : k // 2], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(back.rows(slice(10, 20)).dequantize(), expected[10:20], rtol=1e-6, atol=1e-6)
    # bfloat16 activations: the int8 kernel on the symmetric part (its output rounded to bfloat16),
    # the offsets in float32; random blocks' offsets cancel much of the symmetric part, so its
    # rounding counts against the larger of the two
    fast = quant.make_linear(data, dtype=torch.bfloat16, kernels=kernels)
    xb = x.bfloat16()
    ref = F.linear(xb.float(), expected)
    symmetric = F.linear(xb.float(), data.symmetric().dequantize())
    bound = 2**-8 * symmetric.abs().max().item() + 1e-2 * ref.abs().max().item()
    torch.testing.assert_close(fast(xb).float(), ref, atol=bound, rtol=0)


@pytest.mark.parametrize("qtype", [QT.IQ4_NL, QT.IQ4_XS])
@pytest.mark.parametrize("native", [False, True])
def test_iq4_is_the_gguf_weight_as_per_group_int8(qtype, native: bool) -> None:
    """IQ4_NL / IQ4_XS: 4-bit codes into a fixed table of int8 values times a per-group scale,
    held as per-group int8 (the table's values, exactly); blocks from the test quantizer, whose
    values are what the gguf package decodes. The bfloat16 matmul within the int4 (Q4_1) kernel's
    bound of ``test_int4_packed_kernel_is_exact_weights_summed_in_float32`` on the weights it holds."""
    from bench.kquant import QUANTIZERS

    n, k = 80, 512
    raw = QUANTIZERS[qtype.name](weights(n, k, seed=8).numpy())
    expected = torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(n, k).astype(np.float32))
    data = _decode(raw, qtype, n, k)
    assert isinstance(data, quant.Int8Data) and data.zeros is None and data.group_size == 32
    kernels = default_kernels() if native else None
    if native and (kernels is None or not kernels.has_int8_matmul):
        pytest.skip("this machine builds no native int8 kernel")
    exact = quant.make_linear(data, dtype=torch.float32, kernels=kernels)
    torch.testing.assert_close(exact.dequantize(), expected, rtol=0, atol=0)
    x = torch.randn(6, k, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(exact(x), F.linear(x, expected), rtol=1e-5, atol=1e-5)
    fast = quant.make_linear(data, dtype=torch.bfloat16, kernels=kernels)
    assert isinstance(fast, quant.Int8NativeLinear if native else quant.Int8GroupLinear)
    xb = x.bfloat16()
    w = fast.dequantize(torch.float32).double()  # native: the gguf weights exactly; else d in bfloat16
    if native:
        assert torch.equal(w.float(), expected)
    truth = F.linear(xb.double(), w)
    accumulation = F.linear(xb.double().abs(), w.abs()) * 2**-24
    if not native:  # the two-nibble form's zero 8 d / 17 is rounded to bfloat16 too
        accumulation = accumulation + F.linear(xb.double().abs(), w.abs()) * 2**-8
    out = fast(xb).double()
    assert ((out - truth).abs() <= truth.abs() * 2**-8 + accumulation).all()


@pytest.mark.parametrize("qtype", [QT.Q5_0, QT.Q5_1, QT.Q5_K, QT.Q3_K, QT.Q2_K])
def test_five_bit_codes_run_on_the_int5_kernel(qtype) -> None:
    """Per-group int8 whose codes fit five bits as ``Int5Linear`` (4-bit nibbles + a plane of
    fifth bits, float32 scales and zeros): the gguf package's values, the exchange form back,
    rows gathered, and the bfloat16 matmul within the int4 kernel's bound on those weights."""
    kernels = default_kernels()
    if kernels is None or not kernels.has_int5_matmul:
        pytest.skip("this machine builds no native int5 kernel")
    n, k = 80, 512  # 80 rows: padded to 96
    raw = random_blocks_of(qtype, n, k)
    expected = torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(n, k).astype(np.float32))
    data = _decode(raw, qtype, n, k)
    mod = quant.make_linear(data, dtype=torch.bfloat16, kernels=kernels)
    assert isinstance(mod, quant.Int5Linear) and mod.padded_out == 96
    torch.testing.assert_close(mod.dequantize(torch.float32), expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())
    back = mod.to_data()
    assert torch.equal(back.q, data.q) and torch.equal(back.scales, data.scales)
    assert (back.zeros is None) == (data.zeros is None)
    ids = torch.tensor([0, 17, 79])
    torch.testing.assert_close(mod.embed(ids, torch.float32), mod.dequantize(torch.float32)[ids], rtol=0, atol=0)
    w = mod.dequantize(torch.float32).double()
    for rows in (1, 5, 19):
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).bfloat16()
        truth = F.linear(x.double(), w)
        accumulation = F.linear(x.double().abs(), w.abs()) * 2**-24
        assert ((mod(x).double() - truth).abs() <= truth.abs() * 2**-8 + accumulation).all()


def test_six_bit_codes_run_on_the_int6_kernel() -> None:
    """GGUF Q6_K (six-bit codes, a float32 scale per 16, no zeros) as ``Int6Linear`` (4-bit nibbles
    + two masks per nibble position): the gguf package's values exactly, the exchange form back,
    rows gathered, and the bfloat16 matmul within the int4 kernel's bound on those weights at
    1, 5 and 19 rows; codes that need seven bits stay on the int8 kernel."""
    from bench.kquant import QUANTIZERS

    kernels = default_kernels()
    if kernels is None or not kernels.has_int5_matmul:
        pytest.skip("this machine builds no native int5/int6 kernel")
    n, k = 80, 512
    raw = QUANTIZERS["Q6_K"](weights(n, k, seed=12).numpy())
    expected = torch.from_numpy(gguf.quants.dequantize(raw, QT.Q6_K).reshape(n, k).astype(np.float32))
    data = _decode(raw, QT.Q6_K, n, k)
    assert int(data.q.min()) < -16 or int(data.q.max()) > 15  # really six bits
    mod = quant.make_linear(data, dtype=torch.bfloat16, kernels=kernels)
    assert isinstance(mod, quant.Int6Linear) and mod.padded_out == 96
    torch.testing.assert_close(mod.dequantize(torch.float32), expected, rtol=0, atol=0)
    back = mod.to_data()
    assert torch.equal(back.q, data.q) and torch.equal(back.scales, data.scales) and back.zeros is None
    ids = torch.tensor([0, 17, 79])
    torch.testing.assert_close(mod.embed(ids, torch.float32), expected[ids], rtol=0, atol=0)
    w = expected.double()
    for rows in (1, 5, 19):
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).bfloat16()
        truth = F.linear(x.double(), w)
        accumulation = F.linear(x.double().abs(), w.abs()) * 2**-24
        assert ((mod(x).double() - truth).abs() <= truth.abs() * 2**-8 + accumulation).all()
    wide = quant.Int8Data(q=data.q.clone(), scales=data.scales, group_size=data.group_size)
    wide.q[0, 0] = 40
    assert not isinstance(quant.make_linear(wide, dtype=torch.bfloat16, kernels=kernels), quant.Int5Linear)


def random_blocks_of(qtype, n: int, k: int) -> np.ndarray:
    from tests.backends.engine.model.test_gguf_blocks import random_blocks

    return random_blocks(qtype.name, rows=n, blocks_per_row=k // gguf.GGML_QUANT_SIZES[qtype][0], seed=11)
