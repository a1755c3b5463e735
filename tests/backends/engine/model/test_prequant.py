"""Pre-quantized safetensors (AWQ GEMM, GPTQ v1/v2 with and without ``desc_act``): the engine's
unpacking equals the packed codes' ``(q - z) * s`` exactly, and a tiny model packed as the tools
pack it runs like HF transformers holding the dequantized weights (float32: max |logit error|
<= 1e-4, greedy tokens identical, batched = alone); the bfloat16 fast path within the tolerance of
the GGUF quantized formats. Packers: ``tests/backends/engine/prequant_tools.py``."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from backends.engine.memory import read_header
from backends.engine.model.config import UnsupportedModelError
from backends.engine.model.loader import load_model
from backends.engine.model.prequant_config import PrequantConfig
from backends.engine.model.quant import Int4Linear
from backends.engine.model.quant.permuted import InputPermutedData, InputPermutedLinear
from backends.engine.model.quant.prequant import unpack_layer
from tests.backends.engine.engine_helpers import PagedRunner, default_kernels, hf_logits, load_fused, make_hf_model
from tests.backends.engine.model.test_model import SEQS, max_error, run_steps
from tests.backends.engine.prequant_tools import pack_awq, pack_gptq, quantize_awq, quantize_gptq, write_awq, write_gptq

ATOL = 1e-4
WIDE = dict(hidden_size=256, intermediate_size=512)  # two or more groups of 128 along every input

# (id, qconfig fields, quantize, pack)
LAYERS = {
    "awq-g128": ({"quant_method": "awq", "group_size": 128}, lambda w: quantize_awq(w, 128), pack_awq),
    "awq-g32": ({"quant_method": "awq", "group_size": 32}, lambda w: quantize_awq(w, 32), pack_awq),
    "gptq-v1-sym": (
        {"quant_method": "gptq", "group_size": 128},
        lambda w: quantize_gptq(w, 128, sym=True, desc_act=False), lambda qt: pack_gptq(qt, v1=True),
    ),
    "gptq-v1-asym-desc_act": (
        {"quant_method": "gptq", "group_size": 128, "desc_act": True},
        lambda w: quantize_gptq(w, 128, sym=False, desc_act=True), lambda qt: pack_gptq(qt, v1=True),
    ),
    "gptq-v2-asym-desc_act-g64": (
        {"quant_method": "gptq", "group_size": 64, "desc_act": True, "checkpoint_format": "gptq_v2"},
        lambda w: quantize_gptq(w, 64, sym=False, desc_act=True), lambda qt: pack_gptq(qt, v1=False),
    ),
    "gptq-v2-per-row": (  # group_size -1: one group of 512, held as four engine groups of 128
        {"quant_method": "gptq", "group_size": -1, "checkpoint_format": "gptq_v2"},
        lambda w: quantize_gptq(w, -1, sym=False, desc_act=False), lambda qt: pack_gptq(qt, v1=False),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(LAYERS))
def test_unpacking_equals_the_packed_codes_exactly(case: str) -> None:
    fields, quantize, pack = LAYERS[case]
    config = PrequantConfig.from_hf({"quantization_config": {"bits": 4, **fields}})
    assert config is not None
    w = torch.randn(72, 512, generator=torch.Generator().manual_seed(1)) * 0.05
    qt = quantize(w)
    parts = pack(qt)
    data = unpack_layer(config, "model.layers.0.mlp.down_proj", parts.get)
    expected = qt.dequantize()
    assert isinstance(data, InputPermutedData) == ("desc_act" in case)
    torch.testing.assert_close(data.dequantize(), expected, rtol=0, atol=0)
    # packed as the layers hold it, and run: the float32 reference path
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(2))
    if isinstance(data, InputPermutedData):
        mod = InputPermutedLinear(Int4Linear.from_data(data.data, dtype=torch.float32), data.order)
    else:
        mod = Int4Linear.from_data(data, dtype=torch.float32)
    torch.testing.assert_close(mod.dequantize(), expected, rtol=0, atol=0)
    torch.testing.assert_close(mod(x), F.linear(x, expected), rtol=1e-6, atol=1e-6)


MODELS = {
    "llama-awq": ("llama", lambda hf, p: write_awq(hf, p)),
    "qwen2-awq": ("qwen2", lambda hf, p: write_awq(hf, p)),  # q/k/v biases, stored float16
    "llama-gptq": ("llama", lambda hf, p: write_gptq(hf, p)),
    "llama-gptq-desc_act": ("llama", lambda hf, p: write_gptq(hf, p, sym=False, desc_act=True)),
    "phi3-gptq-v2-desc_act": ("phi3", lambda hf, p: write_gptq(hf, p, desc_act=True, v1=False, group_size=64)),
}


@pytest.fixture(scope="module", params=list(MODELS))
def packed(request, tmp_path_factory):
    arch, write = MODELS[request.param]
    hf = make_hf_model(arch, seed=7, **WIDE)
    path, reference = write(hf, tmp_path_factory.mktemp(request.param))
    return request.param, path, reference


def greedy(step, prompt: list[int], count: int) -> list[int]:
    """``count`` greedy tokens after ``prompt``; ``step(tokens, new)`` gives the logits of ``new``."""
    tokens = list(prompt)
    for _ in range(count):
        tokens.append(int(step(tokens, tokens[-1:] if len(tokens) > len(prompt) else tokens)[-1].argmax()))
    return tokens[len(prompt) :]


def test_float32_matches_transformers_on_the_dequantized_weights(packed) -> None:
    """Logits of every step (paged, batched, chunked prefill) vs HF's; each sequence alone as in
    the batch; greedy tokens HF's."""
    case, path, reference = packed
    loaded = load_model(path, dtype=torch.float32)
    method = case.split("-")[1]
    assert loaded.tensor_types["layers.1.down"] == method and loaded.tensor_types["embed"] == "safetensors"
    qkv = loaded.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, InputPermutedLinear if "desc_act" in case else Int4Linear)
    batched = run_steps(loaded.model, loaded.config)
    assert max_error(batched, reference) <= ATOL
    # each sequence alone gives what it got in the batch
    for seq_id, (tokens, logits) in batched.items():
        runner = PagedRunner(loaded.model, loaded.config, seed=seq_id + 7)
        alone = torch.cat([runner.step([(seq_id, tokens[:-3])])[0]] + [runner.step([(seq_id, [t])])[0] for t in tokens[-3:]])
        torch.testing.assert_close(alone, logits, atol=1e-5, rtol=1e-5)
    # greedy decoding through the paged cache picks HF's tokens
    runner = PagedRunner(loaded.model, loaded.config)
    prompt = [5, 17, 99, 3]
    ours = greedy(lambda _, new: runner.step([(0, new)])[0], prompt, 8)
    assert ours == greedy(lambda tokens, _: hf_logits(reference, tokens), prompt, 8)


def test_bfloat16_fast_path_tracks_float32(packed) -> None:
    """The engine's fast path (bfloat16, packed kernels, the native fused layers where this machine
    builds them) within the tolerance of the GGUF quantized formats (test_model's Q4_1 / K-quants:
    0.03 of the largest logit): scales and zeros rounded to bfloat16, bfloat16 activations."""
    from backends.engine.native.fused import FusedLayer

    case, path, _ = packed
    exact = load_model(path, dtype=torch.float32)
    kernels = default_kernels()
    fast = load_fused(path, kernels, dtype=torch.bfloat16)
    if kernels is not None and kernels.has_int4_matmul:  # desc_act layers gather their input: not fused
        assert isinstance(fast.model.layers[0], FusedLayer) == ("desc_act" not in case)
    a = run_steps(exact.model, exact.config)
    b = run_steps(fast.model, fast.config, dtype=torch.bfloat16)
    for seq_id in SEQS:
        la, lb = a[seq_id][1], b[seq_id][1]
        assert (la - lb).abs().max().item() <= 0.03 * la.abs().max().item()


def test_quantization_none_dequantizes_to_dense(tmp_path) -> None:
    hf = make_hf_model("llama", seed=7, **WIDE)
    path, reference = write_gptq(hf, tmp_path / "m", desc_act=True)
    loaded = load_model(path, quantization="none", dtype=torch.float32)
    assert type(loaded.model.layers[0].mlp.down_proj).__name__ == "DenseLinear"
    assert max_error(run_steps(loaded.model, loaded.config), reference) <= ATOL


def test_memory_header_counts_the_packed_linears(tmp_path) -> None:
    hf = make_hf_model("llama", seed=7, **WIDE)
    path, _ = write_gptq(hf, tmp_path / "m", desc_act=True)
    config, tensors = read_header(path)
    by_name = {t.name: t for t in tensors}
    assert (by_name["layers.0.down"].kind, by_name["layers.0.down"].rows, by_name["layers.0.down"].cols) == ("int4g128", 256, 512)
    assert (by_name["layers.1.k"].rows, by_name["layers.1.k"].cols) == (config.kv_size, 256)


# -- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"quant_method": "gptq", "bits": 8}, "quantization_config.bits = 8"),
        ({"quant_method": "awq", "w_bit": 3}, "quantization_config.w_bit = 3"),
        ({"quant_method": "awq", "group_size": 16}, "quantization_config.group_size = 16"),
        ({"quant_method": "awq", "version": "gemv"}, "quantization_config.version = 'gemv'"),
        ({"quant_method": "gptq", "checkpoint_format": "marlin"}, "quantization_config.checkpoint_format = 'marlin'"),
        ({"quant_method": "gptq", "dynamic": {"-:.*down.*": {}}}, "quantization_config.dynamic"),
        ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes'"),
    ],
)
def test_unsupported_configs_are_refused_naming_the_field(fields: dict, named: str) -> None:
    with pytest.raises(UnsupportedModelError, match=re.escape(named)):
        PrequantConfig.from_hf({"quantization_config": fields})


def test_unsupported_layers_are_refused_naming_the_layer(tmp_path) -> None:
    hf = make_hf_model("llama", seed=7, **WIDE)
    path, _ = write_gptq(hf, tmp_path / "m", desc_act=True)
    tensors = load_file(path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())

    def rewrite(change) -> None:  # type: ignore[no-untyped-def]
        t = dict(tensors)
        change(t)
        save_file(t, str(path / "model.safetensors"))

    # a group holding 127 and 129 channels
    g_idx = tensors["model.layers.1.mlp.up_proj.g_idx"].clone()
    g_idx[(g_idx == 0).nonzero()[0]] = 1
    rewrite(lambda t: t.__setitem__("model.layers.1.mlp.up_proj.g_idx", g_idx))
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.1\.mlp\.up_proj\.g_idx"):
        load_model(path, dtype=torch.float32)
    # an 8-bit qweight under a 4-bit config: its scales do not match the shape 4 bits give
    wide = torch.zeros(64, 512, dtype=torch.int32)  # 8-bit packing of [512, 256]: [K / 4, N]
    rewrite(lambda t: t.__setitem__("model.layers.0.self_attn.o_proj.qweight", wide))
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.0\.self_attn\.o_proj.*group_size"):
        load_model(path, dtype=torch.float32)
    # a quantized lm_head
    rewrite(lambda t: t.update({"lm_head.qweight": t["model.layers.0.mlp.down_proj.qweight"].clone()}))
    with pytest.raises(UnsupportedModelError, match="quantized lm_head"):
        load_model(path, dtype=torch.float32)
    assert config["quantization_config"]["desc_act"]


def test_tensor_parallelism_refuses_desc_act_layers() -> None:
    """A row-parallel slice of the original input channels is not whole groups of the sorted ones:
    sharding an input-permuted layer is refused, not approximated."""
    from backends.engine.tp.shard import column_slice, row_slice

    config = PrequantConfig.from_hf({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}})
    assert config is not None
    qt = quantize_gptq(torch.randn(128, 256) * 0.05, 128, sym=True, desc_act=True)
    data = unpack_layer(config, "layer", pack_gptq(qt).get)
    assert isinstance(data, InputPermutedData)
    mod = InputPermutedLinear(Int4Linear.from_data(data.data, dtype=torch.float32), data.order)
    with pytest.raises(UnsupportedModelError, match="InputPermutedLinear"):
        column_slice(mod, [(0, 64)], torch.device("cpu"))
    with pytest.raises(UnsupportedModelError, match="InputPermutedLinear"):
        row_slice(mod, 0, 128, torch.device("cpu"), keep_bias=True)
