"""The native per-group int8 matmul (``native/csrc/int8_matmul.c``, ``quant.Int8NativeLinear``): GGUF
Q8_0 weights kept exactly, against the float64 product of the stored weights; row gathers (the
tied embedding), unpacking for tensor parallelism, padding, batch invariance."""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F

from backends.engine.model.quant import Int8Data, Int8GroupLinear, Int8NativeLinear, make_linear, quantize_int8
from backends.engine.native import abi


@pytest.fixture
def native(native_matmuls):  # type: ignore[no-untyped-def]
    return native_matmuls


def q8(n: int, k: int, seed: int = 0) -> Int8Data:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    return quantize_int8(w, group_size=32)


@pytest.mark.parametrize("n, k", [(100, 64), (48, 576), (1000, 96)])
def test_matches_exact_products_at_every_batch_size(native, n: int, k: int) -> None:  # type: ignore[no-untyped-def]
    data = q8(n, k)
    mod = make_linear(data, dtype=torch.bfloat16, kernels=native)
    assert isinstance(mod, Int8NativeLinear) and mod.padded_out == n + (-n) % 16
    w = data.dequantize().double()  # d and q as stored: d stays float32
    for rows in [1, 2, 5, 8, 9, 16, 33]:
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).bfloat16()
        out = mod(x)
        assert out.shape == (rows, n) and out.dtype == torch.bfloat16
        truth = F.linear(x.double(), w)
        slack = F.linear(x.double().abs(), w.abs()) * 2**-24 + truth.abs() * 2**-8
        assert ((out.double() - truth).abs() <= slack).all(), rows
        assert torch.equal(mod(x[-1:]), out[-1:])  # a row's result does not depend on the batch


def test_one_row_is_the_batched_row_at_any_thread_count(native) -> None:  # type: ignore[no-untyped-def]
    mod = make_linear(q8(1000, 96, seed=1), dtype=torch.bfloat16, kernels=native)  # 63 blocks: quads and single blocks
    x = torch.randn(9, 96, generator=torch.Generator().manual_seed(2)).bfloat16()
    batched = mod(x)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):  # one row splits its blocks by thread
            torch.set_num_threads(threads)
            assert all(torch.equal(mod(x[i : i + 1]), batched[i : i + 1]) for i in range(9))
    finally:
        torch.set_num_threads(before)


def test_rows_unpack_and_gather_exactly(native) -> None:  # type: ignore[no-untyped-def]
    data = q8(200, 64, seed=1)  # 200 rows: padded to 208
    mod = make_linear(data, dtype=torch.bfloat16, kernels=native)
    back = mod.to_data()
    assert torch.equal(back.q, data.q) and torch.equal(back.scales, data.scales) and back.group_size == 32
    ids = torch.tensor([0, 15, 16, 199, 3, 3])
    assert torch.equal(mod.embed(ids, torch.float32), data.dequantize()[ids])
    assert mod.embed(ids).dtype == torch.bfloat16
    assert torch.equal(mod.dequantize(torch.float32), data.dequantize())
    assert torch.equal(mod.dequantize(torch.float32, slice(16, 48)), data.dequantize()[16:48])


def test_float16_scales_stay_exact(native) -> None:  # type: ignore[no-untyped-def]
    """GGUF Q8_0's d is a float16: kept as float16 (half the scale bytes a decode step reads), every
    weight exact, the products within bfloat16 of exact, rows independent of the batch."""
    data = q8(200, 576, seed=3)
    data = Int8Data(q=data.q, scales=data.scales.half().float(), group_size=32)
    mod = make_linear(data, dtype=torch.bfloat16, kernels=native)
    assert isinstance(mod, Int8NativeLinear) and mod.scale_format == abi.INT8_SCALES_F16
    assert mod.scales_t.dtype == torch.float16
    assert torch.equal(mod.dequantize(torch.float32), data.dequantize())
    assert torch.equal(mod.to_data().scales, data.scales)
    ids = torch.tensor([0, 15, 16, 199])
    assert torch.equal(mod.embed(ids, torch.float32), data.dequantize()[ids])
    w = data.dequantize().double()
    x = torch.randn(9, 576, generator=torch.Generator().manual_seed(9)).bfloat16()
    out = mod(x)
    truth = F.linear(x.double(), w)
    slack = F.linear(x.double().abs(), w.abs()) * 2**-24 + truth.abs() * 2**-8
    assert ((out.double() - truth).abs() <= slack).all()
    assert all(torch.equal(mod(x[i : i + 1]), out[i : i + 1]) for i in range(9))
    if native.has_int5_matmul:  # the fused layer's entry point (int8 projections: the AVX-512 build)
        projection = mod.projection(None)
        y = torch.empty(9, mod.padded_out, dtype=torch.bfloat16)
        status = native.projection_matmul_bf16(
            abi.ProjectionMatmulArgs(
                p=ctypes.addressof(projection), x=x.data_ptr(), x_stride=576, m=9, k=576, y=y.data_ptr(),
                y_stride=y.stride(0), residual=None, residual_stride=0, act=0, num_threads=2,
            )
        )  # fmt: skip
        assert status == 0 and torch.equal(y[:, :200], out)


def test_float32_activations_take_the_reference_path(native) -> None:  # type: ignore[no-untyped-def]
    data = q8(64, 64, seed=2)
    mod = make_linear(data, dtype=torch.bfloat16, kernels=native)
    x = torch.randn(3, 64)
    torch.testing.assert_close(mod(x), F.linear(x, data.dequantize()), rtol=1e-6, atol=1e-6)


def test_without_the_kernel_per_group_int8_keeps_the_nibble_form() -> None:
    assert isinstance(make_linear(q8(64, 64), dtype=torch.bfloat16), Int8GroupLinear)  # kernels not passed
