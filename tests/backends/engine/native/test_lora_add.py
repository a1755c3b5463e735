"""``lora_add_bf16`` (``csrc/fused_ops.c``): the LoRA terms of one projection, each row only its
own adapter's columns, against float64 on the same inputs; each row's result the same bit for
bit whatever the other rows of the call; bad arguments refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backends.engine.native import abi

T, K, N, COLS = 9, 576, 960, 24
#: per row its first column and count: rank-8 adapters at columns 0, 8, 16, a base row (count 0),
#: and rows with fewer columns than a 4-column block (count 1 and 5)
START = [0, 8, 0, 16, 0, 8, 3, 16, 0]
COUNT = [8, 8, 0, 8, 5, 8, 1, 8, 8]


def lora_add(native, a, bt, start, count, x, k, out, n, *, residual=False, gated=False, threads=2) -> int:  # type: ignore[no-untyped-def]
    return native.lora_add_bf16(
        abi.LoraAddArgs(
            term=abi.LoraTerm(a=a.data_ptr(), bt=bt.data_ptr(), start=start.data_ptr(), count=count.data_ptr()),
            x=x.data_ptr(), x_stride=x.stride(0), t=x.shape[0], k=k, gated=int(gated),
            y=None if residual else out.data_ptr(), y_stride=out.stride(0),
            residual=out.data_ptr() if residual else None, residual_stride=out.stride(0), n=n, num_threads=threads,
        )
    )  # fmt: skip


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("residual", [False, True], ids=["bfloat16", "residual"])
def test_lora_terms_match_float64_and_each_row_stands_alone(native_kernels, gated, residual) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(1)
    k = 1536 if gated else K  # the down projection's input: silu(gate) * up of the intermediate size
    a = torch.randn(COLS, k, generator=gen) / k**0.5
    bt = torch.randn(COLS, N, generator=gen) * 0.2
    start, count = torch.tensor(START, dtype=torch.int32), torch.tensor(COUNT, dtype=torch.int32)
    x = torch.randn(T, 2 * k if gated else k, generator=gen).bfloat16()
    before = torch.randn(T, N, generator=gen) if residual else torch.randn(T, N + 64, generator=gen).bfloat16()
    out = before.clone()
    assert lora_add(native_kernels, a, bt, start, count, x, k, out, N, residual=residual, gated=gated) == 0

    inputs = (F.silu(x[:, :k]) * x[:, k:]).double() if gated else x.double()  # rounded as torch rounds
    for i in range(T):
        c0, c = START[i], COUNT[i]
        term = (inputs[i] @ a[c0 : c0 + c].double().t()) @ bt[c0 : c0 + c].double()
        exact = before[i, :N].double() + term
        if residual:  # float32 sums: within float32 accumulation of the terms' magnitudes
            slack = ((inputs[i].abs() @ a[c0 : c0 + c].double().abs().t()) @ bt[c0 : c0 + c].double().abs()) * 2e-6
            assert ((out[i].double() - exact).abs() <= slack + 1e-6).all(), i
        else:  # rounded once to bfloat16
            assert ((out[i, :N].double() - exact).abs() <= exact.abs() * 2**-8 + 1e-5).all(), i
        if c == 0:
            assert torch.equal(out[i], before[i]), i  # a base row is untouched
        assert torch.equal(out[i, N:], before[i, N:])  # nothing past n

    for i in range(T):  # each row alone, on one thread: the same bits
        alone = before[i : i + 1].clone()
        status = lora_add(
            native_kernels, a, bt, start[i : i + 1], count[i : i + 1], x[i : i + 1], k, alone, N,
            residual=residual, gated=gated, threads=1,
        )  # fmt: skip
        assert status == 0 and torch.equal(alone[0], out[i]), i


def test_bad_arguments_are_refused(native_kernels) -> None:  # type: ignore[no-untyped-def]
    a, bt = torch.zeros(8, K), torch.zeros(8, N)
    start, count = torch.zeros(2, dtype=torch.int32), torch.full((2,), 8, dtype=torch.int32)
    x, y, res = torch.zeros(2, K).bfloat16(), torch.zeros(2, N).bfloat16(), torch.zeros(2, N)
    assert lora_add(native_kernels, a, bt, start, count, x, K, y, N) == 0
    assert lora_add(native_kernels, a, bt, start, count, x, 0, y, N) == -1  # no input width
    both = abi.LoraAddArgs(
        term=abi.LoraTerm(a=a.data_ptr(), bt=bt.data_ptr(), start=start.data_ptr(), count=count.data_ptr()),
        x=x.data_ptr(), x_stride=K, t=2, k=K, y=y.data_ptr(), y_stride=N, residual=res.data_ptr(),
        residual_stride=N, n=N, num_threads=1,
    )  # fmt: skip
    assert native_kernels.lora_add_bf16(both) == -1  # one output, not two
    no_a = abi.LoraAddArgs(
        term=abi.LoraTerm(bt=bt.data_ptr(), start=start.data_ptr(), count=count.data_ptr()), x=x.data_ptr(),
        x_stride=K, t=2, k=K, y=y.data_ptr(), y_stride=N, n=N, num_threads=1,
    )  # fmt: skip
    assert native_kernels.lora_add_bf16(no_a) == -1
