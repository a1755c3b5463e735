"""The test packers (``prequant_tools.py``) against the tools themselves, where they import:
AutoAWQ's ``WQLinear_GEMM.from_linear`` / ``dequantize_gemm`` and AutoGPTQ's ``QuantLinear.pack``
and its torch dequantisation. Neither is a project dependency (both pin old stacks and pull CUDA
builds); they install on CPU with ``pip install --no-deps --target DIR autoawq==0.2.9
auto-gptq==0.7.1`` and run here with ``PYTHONPATH`` naming a folder that holds only their ``awq``
and ``auto_gptq`` packages (auto-gptq's wheel also ships a top-level ``tests`` package, which
would shadow ours). Only their packing modules are imported
(their package ``__init__`` imports training stacks), so the parent packages are stood in for.
Elsewhere these tests skip; the engine's own tests (``test_prequant.py``) do not need them."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from backends.engine.model.prequant_config import PrequantConfig
from backends.engine.model.quant.prequant import unpack_layer
from tests.backends.engine.prequant_tools import pack_awq, pack_gptq, quantize_awq, quantize_gptq


def _tool_module(monkeypatch: pytest.MonkeyPatch, package: str, module: str) -> types.ModuleType:
    """``package.module`` imported without running the ``__init__`` of ``package`` and its subpackages."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} is not installed (see this module's docstring)")
    root = Path(next(iter(spec.submodule_search_locations)))
    parts = module.split(".")
    for depth in range(len(parts)):
        name = ".".join([package, *parts[:depth]])
        stub = types.ModuleType(name)
        stub.__path__ = [str(root.joinpath(*parts[:depth]))]
        monkeypatch.setitem(sys.modules, name, stub)
    return importlib.import_module(f"{package}.{module}")


def _linear(w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def test_awq_packing_equals_autoawq(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    gemm = _tool_module(monkeypatch, "awq", "modules.linear.gemm")
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(3)) * 0.05
    qt = quantize_awq(w, 128)
    ours = pack_awq(qt)
    # AutoAWQ packs the fake-quantized weight with scales and zeros [G, N] (its quantizer's transpose)
    theirs = gemm.WQLinear_GEMM.from_linear(
        _linear(qt.dequantize()), 4, 128, scales=qt.s.t().contiguous(), zeros=qt.z.t().float().contiguous()
    )
    assert torch.equal(ours["qweight"], theirs.qweight) and torch.equal(ours["qzeros"], theirs.qzeros)
    # and the engine's unpacking equals AutoAWQ's own dequantisation, exactly
    config = PrequantConfig.from_hf({"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128}})
    assert config is not None
    engine = unpack_layer(config, "layer", ours.get).dequantize()
    reference = gemm.dequantize_gemm(theirs.qweight, theirs.qzeros, theirs.scales.float(), 4, 128)  # [K, N]
    torch.testing.assert_close(engine, reference.t(), rtol=0, atol=0)


@pytest.mark.parametrize(("sym", "desc_act"), [(True, False), (False, True)])
def test_gptq_packing_equals_autogptq(monkeypatch, sym: bool, desc_act: bool) -> None:  # type: ignore[no-untyped-def]
    qlinear = _tool_module(monkeypatch, "auto_gptq", "nn_modules.qlinear.qlinear_cuda")
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(4)) * 0.05
    qt = quantize_gptq(w, 128, sym=sym, desc_act=desc_act, seed=5)
    ours = pack_gptq(qt, v1=True)
    theirs = qlinear.QuantLinear(4, 128, 256, 96, bias=False, weight_dtype=torch.float32)
    theirs.pack(_linear(qt.dequantize()), qt.s.float(), qt.z.clone(), qt.g_idx.to(torch.int32))
    assert torch.equal(ours["qweight"], theirs.qweight) and torch.equal(ours["qzeros"], theirs.qzeros)
    assert torch.equal(ours["g_idx"], theirs.g_idx.to(torch.int32))
    # AutoGPTQ's torch path (no CUDA) on the identity gives its dequantised weight [K, N]
    theirs.scales = theirs.scales.float()
    reference = theirs(torch.eye(256))
    config = PrequantConfig.from_hf({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}})
    assert config is not None
    engine = unpack_layer(config, "layer", ours.get).dequantize()
    torch.testing.assert_close(engine, reference.t(), rtol=0, atol=0)
