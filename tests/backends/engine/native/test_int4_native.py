"""The native int4 matmul (``backends/engine/native/csrc/int4_matmul.c``) and its weight layout:
packing round trips, the kernel against exact float64 products of the stored weights, batch and
thread-count invariance, the int8-per-group head on top of it, and refusals."""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F

from backends.engine.model import quant
from backends.engine.model.quant import layouts
from backends.engine.native import abi
from backends.engine.model.quant import Int4Linear, Int8GroupLinear, quantize_int4, quantize_int8


def weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.fixture
def native(native_matmuls):  # type: ignore[no-untyped-def]
    return native_matmuls


def within_bfloat16_of_exact(out: torch.Tensor, x: torch.Tensor, mod: torch.nn.Module) -> bool:
    """``out`` is the exact product rounded once to bfloat16, up to float32 accumulation."""
    w = mod.dequantize(torch.float32).double()
    product = F.linear(x.double(), w)
    slack = F.linear(x.double().abs(), w.abs()) * 2**-24 + product.abs() * 2**-8
    truth = product
    if getattr(mod, "bias", None) is not None:  # added to the rounded product: one more rounding
        truth = product + mod.bias.double()
        slack = slack + truth.abs() * 2**-8
    return bool(((out.double() - truth).abs() <= slack).all())


@pytest.mark.parametrize("n, k", [(16, 8), (64, 576), (48, 1536)])
def test_layout_round_trips(n: int, k: int) -> None:
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(n + k))
    packed = layouts.native_pack(q)
    assert packed.shape == (n, k // 2) and packed.dtype == torch.uint8
    assert torch.equal(layouts.native_unpack(packed, n, k), q)
    # row chunks of whole 16-row blocks pack to slices of the whole
    assert torch.equal(layouts.native_pack(q[16:32]), packed[16:32])


def test_layout_is_what_the_kernel_reads(native) -> None:  # type: ignore[no-untyped-def]
    """One weight set (q = 9, scale 1, zero 0: w = 1) at a time, read out by a one-hot x: pins
    the byte layout between the Python packer and the C kernel independently of any reference."""
    n, k = 32, 64
    for row, col in [(0, 0), (1, 1), (5, 2), (15, 7), (16, 8), (31, 63), (7, 37)]:
        q = torch.full((n, k), 8, dtype=torch.uint8)
        q[row, col] = 9
        data = quant.Int4Data(q=q, scales=torch.ones(n, k // 32), zeros=torch.zeros(n, k // 32), group_size=32)
        mod = Int4Linear.from_data(data, dtype=torch.bfloat16, kernels=native)
        assert mod.layout == "native"
        x = torch.zeros(1, k, dtype=torch.bfloat16)
        x[0, col] = 1.0
        expected = torch.zeros(1, n)
        expected[0, row] = 1.0
        assert torch.equal(mod(x).float(), expected), (row, col)


@pytest.mark.parametrize("n, k, group_size", [(64, 576, 32), (200, 64, 32), (96, 256, 64), (32, 384, 128)])
def test_kernel_matches_exact_products(native, n: int, k: int, group_size: int) -> None:  # type: ignore[no-untyped-def]
    data = quantize_int4(weights(n, k), group_size)
    mod = Int4Linear.from_data(data, dtype=torch.bfloat16, kernels=native, bias=torch.randn(n) * 0.1)
    assert mod.layout == "native"
    for rows in [1, 2, 3, 4, 5, 6, 7, 8, 9, 17, 40]:
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).bfloat16()
        out = mod(x)
        assert out.shape == (rows, n) and out.dtype == torch.bfloat16
        assert within_bfloat16_of_exact(out, x, mod), rows


def test_bias_and_residual_epilogues(native) -> None:  # type: ignore[no-untyped-def]
    """The epilogues the fused layer uses: the bias (padded to the kernel's width) added and
    rounded as ``y + bias`` in bfloat16, and the bfloat16 result added into a float32 residual."""
    n, k, rows = 200, 64, 3  # padded to 256 rows
    mod = Int4Linear.from_data(quantize_int4(weights(n, k)), dtype=torch.bfloat16, kernels=native, bias=torch.randn(n))
    x = torch.randn(rows, k).bfloat16()
    bias = torch.zeros(mod.padded_out, dtype=torch.bfloat16)
    bias[:n] = mod.bias
    y = torch.empty(rows, mod.padded_out, dtype=torch.bfloat16)

    def call(y: torch.Tensor | None, bias: torch.Tensor | None, residual: torch.Tensor | None) -> int:
        return native.int4_matmul_bf16(
            abi.Int4MatmulArgs(
                x=x.data_ptr(), x_stride=k, m=rows, w=mod.weight.data_ptr(), sz=mod.scales_and_zeros.data_ptr(),
                n=mod.padded_out, k=k, group_size=32, y=None if y is None else y.data_ptr(),
                y_stride=0 if y is None else mod.padded_out, num_threads=2, bias=None if bias is None else bias.data_ptr(),
                residual=None if residual is None else residual.data_ptr(),
                residual_stride=0 if residual is None else mod.padded_out, act=0,
            )
        )  # fmt: skip

    assert call(y, bias, None) == 0
    assert torch.equal(y[:, :n], mod(x))
    plain = torch.empty_like(y)
    assert call(plain, None, None) == 0
    residual = torch.randn(rows, mod.padded_out)
    expected = residual + plain.float()
    assert call(None, None, residual) == 0
    assert torch.equal(residual, expected)
    assert call(None, None, None) == -1  # nowhere to write


def test_each_row_is_independent_of_the_batch_and_the_threads(native) -> None:  # type: ignore[no-untyped-def]
    """Rows are summed in one fixed order whatever shares the call: batched generation can equal
    generation alone bit for bit."""
    mod = Int4Linear.from_data(quantize_int4(weights(320, 576)), dtype=torch.bfloat16, kernels=native)
    x = torch.randn(21, 576, generator=torch.Generator().manual_seed(3)).bfloat16()
    batched = mod(x)
    for i in range(x.shape[0]):
        assert torch.equal(mod(x[i : i + 1]), batched[i : i + 1])
    assert torch.equal(mod(x[5:12]), batched[5:12])
    before = torch.get_num_threads()
    try:
        for threads in (1, 3):  # one row splits its blocks by thread: any split, the same sums
            torch.set_num_threads(threads)
            assert torch.equal(mod(x), batched)
            assert all(torch.equal(mod(x[i : i + 1]), batched[i : i + 1]) for i in (0, 7, 20))
    finally:
        torch.set_num_threads(before)


def test_strided_input_and_empty_batch(native) -> None:  # type: ignore[no-untyped-def]
    mod = Int4Linear.from_data(quantize_int4(weights(64, 128)), dtype=torch.bfloat16, kernels=native)
    wide = torch.randn(5, 256).bfloat16()
    x = wide[:, 64:192]  # a row stride of 256
    assert torch.equal(mod(x), mod(x.contiguous()))
    assert mod(torch.empty(0, 128, dtype=torch.bfloat16)).shape == (0, 64)


def test_native_layout_unpacks_gathers_and_chunks_exactly(native) -> None:  # type: ignore[no-untyped-def]
    n, k = 200, 64  # padded to 256 rows
    data = quantize_int4(weights(n, k))
    mod = Int4Linear.from_data(data, dtype=torch.bfloat16, kernels=native)
    assert mod.layout == "native" and mod.padded_out == 256
    back = mod.to_data()
    assert torch.equal(back.q, data.q)
    ids = torch.tensor([0, 15, 16, 31, 32, 63, 64, 199, 5, 5])
    assert torch.equal(mod.gather_q(ids), data.q[ids])
    torch.testing.assert_close(mod.embed(ids, torch.float32), mod.dequantize(torch.float32)[ids], rtol=0, atol=0)
    torch.testing.assert_close(mod.dequantize(torch.float32, slice(64, 192)), mod.dequantize(torch.float32)[64:192], rtol=0, atol=0)
    chunks = (data.rows(slice(r, min(r + 64, n))) for r in range(0, n, 64))
    chunked = Int4Linear.from_row_chunks(chunks, n, dtype=torch.bfloat16, kernels=native)
    assert chunked.layout == "native"
    assert torch.equal(chunked.weight, mod.weight) and torch.equal(chunked.scales_and_zeros, mod.scales_and_zeros)


def q4_0(n: int, k: int, seed: int = 0) -> quant.Int4Data:
    """GGUF Q4_0's form: w = d * (q - 8), d a float16, no zero."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    d = (torch.rand(n, k // 32, generator=gen) * 0.01 + 1e-4).half().float()
    return quant.Int4Data(q=q, scales=d, zeros=torch.zeros_like(d), group_size=32)


def q4_1(n: int, k: int, seed: int = 0) -> quant.Int4Data:
    """GGUF Q4_1's form: w = d * q + m, d and m float16s; as Int4Data (q - 8) * d + (m + 8 d)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    d = (torch.rand(n, k // 32, generator=gen) * 0.01 + 1e-4).half().float()
    m = (-7.5 * d + torch.randn(n, k // 32, generator=gen) * 0.003).half().float()
    return quant.Int4Data(q=q, scales=d, zeros=m + 8.0 * d, group_size=32)


@pytest.mark.parametrize(
    "form, fmt, width", [(q4_0, abi.INT4_SCALES_F16, 1), (q4_1, abi.INT4_SCALES_F16_OFFSETS, 2)], ids=["q4_0", "q4_1"]
)
def test_float16_scales_stay_exact(native, form, fmt, width) -> None:  # type: ignore[no-untyped-def]
    """Q4_0's float16 d, and Q4_1's float16 d and m, are kept as float16s (bfloat16 would round
    them): every weight exact, the products within bfloat16 of exact at every batch size, through
    both entry points. Q4_1's are laid out by blocks of 16 rows (16 d, then their 16 m)."""
    n, k = 200, 576
    data = form(n, k)
    assert not torch.equal(data.scales.bfloat16().float(), data.scales)  # bfloat16 pairs would round d
    assert not torch.equal(data.zeros.bfloat16().float(), data.zeros) or width == 1  # and the zeros
    mod = Int4Linear.from_data(data, dtype=torch.bfloat16, kernels=native, bias=torch.randn(n) * 0.1)
    assert mod.scale_format == fmt and mod.scales_and_zeros.dtype == torch.float16
    blocked = (k // 32, mod.padded_out // 16, 2, 16)
    assert mod.scales_and_zeros.shape == ((k // 32, mod.padded_out, 1) if width == 1 else blocked)
    if width == 2:  # row 16 b + i: d at [:, b, 0, i], m at [:, b, 1, i]
        assert torch.equal(mod.scales_and_zeros[:, 1, 0, 3].float(), data.scales[19])
        assert torch.equal(mod.scales_and_zeros[:, 1, 1, 3].float(), data.zeros[19] - 8 * data.scales[19])
    ids = torch.tensor([0, 19, 37, 199, 5])  # gathered rows (an int4 embedding's lookups)
    assert torch.equal(mod.scale_pairs(ids, torch.float32), mod.scale_pairs(dtype=torch.float32)[:, ids])
    for rows in [slice(64, 192), slice(3, 70)]:  # whole 16-row blocks (dequantize's chunks), and not
        assert torch.equal(mod.scale_pairs(rows, torch.float32), mod.scale_pairs(dtype=torch.float32)[:, rows])
    assert torch.equal(mod.dequantize(torch.float32), data.dequantize())
    back = mod.to_data()
    assert torch.equal(back.q, data.q) and torch.equal(back.scales, data.scales) and torch.equal(back.zeros, data.zeros)
    x = torch.randn(17, k, generator=torch.Generator().manual_seed(5)).bfloat16()
    batched = mod(x)
    for rows in [1, 2, 5, 9, 17]:
        assert within_bfloat16_of_exact(mod(x[:rows]), x[:rows], mod), rows
    assert all(torch.equal(mod(x[i : i + 1]), batched[i : i + 1]) for i in range(17))
    # the fused layer's entry point passes the format with the Projection
    plain = Int4Linear.from_data(data, dtype=torch.bfloat16, kernels=native)
    projection = plain.projection(None)
    y = torch.empty(3, plain.padded_out, dtype=torch.bfloat16)
    status = native.projection_matmul_bf16(
        abi.ProjectionMatmulArgs(
            p=ctypes.addressof(projection), x=x.data_ptr(), x_stride=k, m=3, k=k, y=y.data_ptr(), y_stride=y.stride(0),
            residual=None, residual_stride=0, act=0, num_threads=2,
        )
    )  # fmt: skip
    assert status == 0 and torch.equal(y[:, :n], plain(x[:3]))
    # a scale or an offset float16 cannot hold keeps the bfloat16 pairs, in a chunk too
    other = form(64, k, seed=1)
    other.scales[0, 0] = 1 / 3
    chunked = Int4Linear.from_row_chunks([data.rows(slice(0, 192)), other], 256, dtype=torch.bfloat16, kernels=native)
    assert chunked.scale_format == abi.INT4_SCALES_BF16_PAIRS and chunked.scales_and_zeros.shape == (k // 32, 256, 2)
    whole = quant.Int4Data(
        q=torch.cat([data.q[:192], other.q]), scales=torch.cat([data.scales[:192], other.scales]),
        zeros=torch.cat([data.zeros[:192], other.zeros]), group_size=32,
    )  # fmt: skip
    expected = Int4Linear.from_data(whole, dtype=torch.bfloat16, kernels=native)
    assert torch.equal(chunked.scales_and_zeros, expected.scales_and_zeros) and torch.equal(chunked(x), expected(x))
    # chunks that all keep float16s make the one layer's
    chunked = Int4Linear.from_row_chunks([data.rows(slice(0, 128)), data.rows(slice(128, n))], n, dtype=torch.bfloat16, kernels=native)
    assert chunked.scale_format == fmt and torch.equal(chunked.scales_and_zeros, plain.scales_and_zeros)
    assert torch.equal(chunked(x), plain(x))


def test_int8_groups_run_exactly_through_the_native_kernel(native) -> None:  # type: ignore[no-untyped-def]
    """GGUF Q8_0 (the tied SmolLM2 head) is two int4 nibbles per weight on the int4 kernel."""
    data = quantize_int8(weights(128, 192), group_size=32)
    mod = Int8GroupLinear.from_data(data, dtype=torch.bfloat16, kernels=native)
    assert mod.inner.layout == "native"
    x = torch.randn(6, 192, generator=torch.Generator().manual_seed(4)).bfloat16()
    w = mod.dequantize(torch.float32).double()  # q * d, d as stored (bfloat16)
    assert torch.equal(mod.to_data().q, data.q)
    truth = F.linear(x.double(), w)
    # the nibble pair's zero z = 8 d / 17 and d are each rounded to bfloat16 (2**-9 relative), so
    # 17 z - 8 d is off zero by up to 16 d * 2**-9, times |sum x| over the group
    d = mod.scales.double()  # [N, G]
    zero_err = x.double().view(6, -1, 32).sum(-1).abs() @ (d * 16 * 2**-9).T
    slack = F.linear(x.double().abs(), w.abs()) * 2**-24 * 17 + zero_err
    assert ((mod(x).double() - truth).abs() <= truth.abs() * 2**-8 + slack).all()


def test_kernel_refuses_shapes_outside_its_contract(native) -> None:  # type: ignore[no-untyped-def]
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    w = torch.zeros(48 * 32, dtype=torch.uint8)
    sz = torch.zeros(2, 48, 2, dtype=torch.bfloat16)
    y = torch.zeros(1, 48, dtype=torch.bfloat16)

    def call(n: int, group_size: int) -> int:
        return native.int4_matmul_bf16(
            abi.Int4MatmulArgs(
                x=x.data_ptr(), x_stride=64, m=1, w=w.data_ptr(), sz=sz.data_ptr(), n=n, k=64, group_size=group_size,
                y=y.data_ptr(), y_stride=n, num_threads=1,
            )
        )  # fmt: skip

    assert call(48, 32) == -1  # n % 32
    assert call(32, 12) == -1  # group % 8
    assert call(32, 48) == -1  # k % group
    assert call(32, 32) == 0


def test_layers_without_the_kernels_keep_torchs_kernel(native) -> None:  # type: ignore[no-untyped-def]
    mod = Int4Linear.from_data(quantize_int4(weights(64, 64)), dtype=torch.bfloat16)  # kernels not passed
    assert mod.layout == "torch_cpu" and mod.kernels is None
    float_mod = Int4Linear.from_data(quantize_int4(weights(64, 64)), dtype=torch.float32, kernels=native)
    assert float_mod.layout == "torch_cpu"
