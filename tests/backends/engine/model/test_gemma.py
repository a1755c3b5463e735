"""gemma2 and gemma3 (text) against transformers' ``Gemma2ForCausalLM`` / ``Gemma3ForCausalLM`` on
the same tiny random weights (``engine_helpers._make_gemma``: a sliding window of 4, so every
prompt here outgrows it; soft-caps that bite; gemma3's global layer between local ones with its
own scaled rotary base): float32 logits within 1e-4 through mixed prefill / chunked prefill /
decode steps on a paged cache, greedy tokens identical batched and alone, from safetensors and
from GGUF files written as llama.cpp's converter writes them; the bfloat16 fast path close.
Tensor parallelism: ``tests/backends/engine/tp/test_tp.py``."""

from __future__ import annotations

import msgspec
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from backends.engine.model.config import ModelConfig, UnsupportedModelError
from backends.engine.model.gemma import GemmaCausalLM
from backends.engine.model.loader import load_model
from backends.engine.native.fused import FusedLayer
from tests.backends.engine.engine_helpers import (
    PagedRunner,
    run_paged_steps,
    hf_logits,
    load_fused,
    make_hf_model,
    roundtrip_model,
    save_hf,
    write_gguf,
)

ATOL = 1e-4

# Longer than the window of 4 everywhere: a chunked prefill whose second chunk starts past the
# window, decodes at 12-24 positions, a sequence that joins late.
SEQS = {
    0: [3, 9, 27, 81, 243, 217, 139, 161, 227, 169, 5],
    1: [17, 200, 5, 9, 9, 31, 77, 120, 64, 1, 2, 250, 8, 33, 101, 7, 6, 190, 44, 12, 99],
    2: [40, 41, 42, 43, 44, 45],
}
STEPS = [
    [(0, SEQS[0]), (1, SEQS[1][:9])],
    [(0, [11]), (1, SEQS[1][9:]), (2, SEQS[2])],
    [(2, [99]), (0, [12]), (1, [13])],
    [(1, [14]), (2, [100]), (0, [15])],
]


def run_steps(model, config, dtype=torch.float32) -> dict[int, tuple[list[int], torch.Tensor]]:
    return run_paged_steps(model, config, SEQS, STEPS, dtype)


_HF_LOGITS: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}


def reference_logits(reference, tokens: list[int]) -> torch.Tensor:
    """transformers' logits, each computed once per model (its gemma forward builds its masks slowly)."""
    key = (id(reference), tuple(tokens))
    if key not in _HF_LOGITS:
        _HF_LOGITS[key] = hf_logits(reference, tokens)
    return _HF_LOGITS[key]


def max_error(ours: dict, reference) -> float:
    return max((logits - reference_logits(reference, tokens)).abs().max().item() for tokens, logits in ours.values())


def greedy(model, config, prompts: dict[int, list[int]], num_tokens: int, seed: int = 0) -> dict[int, list[int]]:
    """Greedy continuations of ``prompts``, all in one batch: one prefill step, then decodes."""
    runner = PagedRunner(model, config, seed=seed)
    out: dict[int, list[int]] = {i: [] for i in prompts}
    step = list(prompts.items())
    for _ in range(num_tokens):
        logits = runner.step(step)
        step = []
        for (seq_id, _), rows in zip(prompts.items(), logits):
            token = int(rows[-1].argmax())
            out[seq_id].append(token)
            step.append((seq_id, [token]))
    return out


def hf_greedy_agrees(hf, prompt: list[int], continuation: list[int]) -> bool:
    """Whether ``continuation`` is transformers' greedy continuation of ``prompt``: each token the
    argmax of its forward over what precedes it (one forward over the whole: each step of HF's
    greedy loop sees exactly these tokens when every earlier one agreed)."""
    logits = hf_logits(hf, prompt + continuation)[len(prompt) - 1 : -1]
    return logits.argmax(-1).tolist() == continuation


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def tiny(request, tmp_path_factory):
    arch = request.param
    model = make_hf_model(arch)
    return arch, model, save_hf(model, tmp_path_factory.mktemp(f"tiny-{arch}"))


def test_config_from_transformers(tiny) -> None:
    arch, _, path = tiny
    config = load_model(path, dtype=torch.float32).config
    assert config.architecture == arch and config.sliding_window == 4
    if arch == "gemma2":
        assert config.sliding_layers == (0,) and (config.attn_logit_softcap, config.final_logit_softcap) == (2.0, 3.0)
        assert not config.qk_norm and config.local_rope_theta is None
    else:
        assert config.sliding_layers == (0, 1, 2, 3, 4, 6) and config.attn_logit_softcap is None
        assert config.qk_norm and config.local_rope_theta == 10000.0 and config.rope_theta == 1e6
        assert config.rope_scaling is not None and config.rope_scaling.factor == 2.0


def test_hf_safetensors_float32_matches_transformers(tiny) -> None:
    _, hf, path = tiny
    loaded = load_model(path, dtype=torch.float32)
    assert isinstance(loaded.model, GemmaCausalLM)
    assert max_error(run_steps(loaded.model, loaded.config), hf) <= ATOL


def test_greedy_tokens_equal_transformers_batched_and_alone(tiny) -> None:
    _, hf, path = tiny
    loaded = load_model(path, dtype=torch.float32)
    prompts = {0: SEQS[0], 1: SEQS[1][:13], 2: SEQS[2]}
    batched = greedy(loaded.model, loaded.config, prompts, 10)
    for seq_id, prompt in prompts.items():
        alone = greedy(loaded.model, loaded.config, {seq_id: prompt}, 10, seed=seq_id + 7)[seq_id]
        assert batched[seq_id] == alone
        assert hf_greedy_agrees(hf, prompt, alone)


def test_batched_logits_equal_alone(tiny) -> None:
    _, _, path = tiny
    loaded = load_model(path, dtype=torch.float32)
    for seq_id, (tokens, logits) in run_steps(loaded.model, loaded.config).items():
        runner = PagedRunner(loaded.model, loaded.config, seed=seq_id + 7)
        alone = torch.cat([runner.step([(seq_id, tokens[:-3])])[0]] + [runner.step([(seq_id, [t])])[0] for t in tokens[-3:]])
        torch.testing.assert_close(alone, logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("qtype", [QT.F32, QT.Q8_0])
def test_gguf_matches_transformers_on_decoded_weights(tiny, qtype, tmp_path) -> None:
    """A GGUF as llama.cpp's converter writes gemma (norms stored as ``1 + weight``, its keys, no
    sliding pattern or local rotary base: llama.cpp's defaults) gives transformers' logits."""
    _, hf, path = tiny
    loaded = load_model(write_gguf(hf, tmp_path / "m.gguf", qtype), dtype=torch.float32)
    assert loaded.format == "gguf" and loaded.tensor_types["layers.0.post_ffn_norm"] == "F32"
    expected = load_model(path, dtype=torch.float32).config
    assert loaded.config == msgspec.structs.replace(expected, rms_norm_eps=loaded.config.rms_norm_eps)  # float32 in GGUF
    reference = hf if qtype == QT.F32 else roundtrip_model(hf, qtype)  # F32: the same weights
    assert max_error(run_steps(loaded.model, loaded.config), reference) <= ATOL


def test_query_pre_attn_scalar_sets_the_attention_scale(tmp_path) -> None:
    hf = make_hf_model("gemma2", seed=4, query_pre_attn_scalar=24)
    loaded = load_model(save_hf(hf, tmp_path / "m"), dtype=torch.float32)
    assert loaded.config.query_pre_attn_scalar == 24.0
    assert max_error(run_steps(loaded.model, loaded.config), hf) <= ATOL


@pytest.mark.parametrize("quantization", ["int4", None])
def test_bfloat16_fast_path_tracks_float32(tiny, quantization) -> None:
    """The engine's fast path (bfloat16, packed kernels, ``native.fuse`` where this machine builds
    the kernels: gemma's layers stay unfused, its global layers' attention native) vs float32 on
    the same weights, within the bfloat16 tolerance of test_model's llama-family test."""
    _, _, path = tiny
    ref = load_model(path, quantization=quantization, dtype=torch.float32)
    fast = load_fused(path, quantization=quantization, dtype=torch.bfloat16)
    assert not any(isinstance(layer, FusedLayer) for layer in fast.model.layers)
    a = run_steps(ref.model, ref.config)
    b = run_steps(fast.model, fast.config, dtype=torch.bfloat16)
    for seq_id in SEQS:
        la, lb = a[seq_id][1], b[seq_id][1]
        assert (la - lb).abs().max().item() <= 0.03 * la.abs().max().item()


# --------------------------------------------------------------------------------------------
# configs


def _hf4_gemma3(**over: object) -> dict:
    """A transformers 4.x ``config.json`` of Gemma 3 1B's shape (keys as google's file spells them)."""
    cfg = {
        "model_type": "gemma3_text", "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144,
        "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256, "sliding_window": 512,
        "sliding_window_pattern": 6, "rope_theta": 1000000, "rope_local_base_freq": 10000, "rope_scaling": None,
        "final_logit_softcapping": None, "attn_logit_softcapping": None, "max_position_embeddings": 32768,
    }  # fmt: skip
    return {**cfg, **over}


def test_transformers4_gemma3_config() -> None:
    config = ModelConfig.from_hf_config(_hf4_gemma3())
    assert config.architecture == "gemma3" and config.sliding_window == 512
    assert config.sliding_layers == tuple(i for i in range(26) if (i + 1) % 6)
    assert (config.rope_theta, config.local_rope_theta, config.rope_scaling) == (1e6, 1e4, None)
    scaled = ModelConfig.from_hf_config(_hf4_gemma3(rope_scaling={"rope_type": "linear", "factor": 8.0}))
    assert scaled.rope_scaling is not None and scaled.rope_scaling.factor == 8.0


def test_gemma_variants_the_engine_cannot_run_are_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="Gemma3ForConditionalGeneration"):
        ModelConfig.from_hf_config({"model_type": "gemma3", "text_config": {}})
    with pytest.raises(UnsupportedModelError, match="bidirectional"):
        ModelConfig.from_hf_config(_hf4_gemma3(use_bidirectional_attention=True))
    with pytest.raises(UnsupportedModelError, match="hidden_activation 'gelu'"):
        ModelConfig.from_hf_config(_hf4_gemma3(hidden_activation="gelu"))
    with pytest.raises(UnsupportedModelError, match="layer_types"):
        ModelConfig.from_hf_config(_hf4_gemma3(num_hidden_layers=2, layer_types=["chunked_attention"] * 2))


def _gguf_meta(arch: str, layers: int, **over: object) -> dict:
    meta = {
        "general.architecture": arch, f"{arch}.block_count": layers, f"{arch}.embedding_length": 4608,
        f"{arch}.attention.head_count": 32, f"{arch}.attention.head_count_kv": 16, f"{arch}.attention.key_length": 128,
        f"{arch}.feed_forward_length": 36864, f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
        f"{arch}.context_length": 8192, f"{arch}.vocab_size": 256000,
    }  # fmt: skip
    return {**meta, **over}


def test_gguf_metadata_takes_llama_cpps_defaults_and_scale_rule() -> None:
    # gemma2 27B (46 layers): scaled by hidden / heads = 144, as its query_pre_attn_scalar; 9B by head_dim
    big = ModelConfig.from_gguf_metadata(_gguf_meta("gemma2", 46), has_output_tensor=False)
    assert big.query_pre_attn_scalar == 144.0 and big.sliding_window == 4096
    assert (big.attn_logit_softcap, big.final_logit_softcap) == (50.0, 30.0)
    assert big.sliding_layers == tuple(range(0, 46, 2))
    assert ModelConfig.from_gguf_metadata(_gguf_meta("gemma2", 42), has_output_tensor=False).query_pre_attn_scalar == 128.0
    g3 = ModelConfig.from_gguf_metadata(
        _gguf_meta("gemma3", 8, **{"gemma3.attention.sliding_window": 1024}), has_output_tensor=False
    )
    assert g3.sliding_layers == (0, 1, 2, 3, 4, 6, 7) and g3.local_rope_theta == 10000.0 and g3.qk_norm
    pattern = [True, False, True, True, False, True, True, True]
    g3p = ModelConfig.from_gguf_metadata(
        _gguf_meta("gemma3", 8, **{"gemma3.attention.sliding_window": 1024, "gemma3.attention.sliding_window_pattern": pattern}),
        has_output_tensor=False,
    )  # fmt: skip
    assert g3p.sliding_layers == (0, 2, 3, 5, 6, 7)
