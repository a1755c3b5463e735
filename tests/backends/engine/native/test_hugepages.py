"""``hugepages.empty``: a usable tensor whatever the size; advice only where whole 2 MiB pages fit."""

from __future__ import annotations

import sys

import pytest
import torch

from backends.engine.native import hugepages


@pytest.mark.parametrize("shape", [(3, 5), (4 << 20,)])
def test_empty_gives_a_writable_tensor(shape: tuple[int, ...]) -> None:
    t = hugepages.empty(shape, torch.bfloat16)
    assert t.shape == shape and t.dtype == torch.bfloat16 and t.device.type == "cpu"
    t.fill_(1.5)
    assert t.float().sum().item() == 1.5 * t.numel()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is Linux's")
def test_large_tensors_are_advised(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls = []
    monkeypatch.setattr(hugepages, "_madvise", lambda: lambda addr, length, advice: calls.append((addr, length, advice)) or 0)
    small = hugepages.empty((1000,), torch.float32)
    assert calls == [] and small.numel() == 1000
    big = hugepages.empty((5 << 20,), torch.uint8)  # 5 MiB: at least one whole 2 MiB page inside
    ((addr, length, advice),) = calls
    start, end = big.data_ptr(), big.data_ptr() + big.numel()
    assert advice == 14 and addr % (2 << 20) == 0 and length % (2 << 20) == 0 and length > 0
    assert start <= addr and addr + length <= end
