"""Our forward vs HF transformers' on the same tiny random weights (float32: max |logit error|
<= 1e-4), loaded from safetensors and from GGUF files of every supported tensor type, through a
paged cache with mixed prefill / chunked prefill / decode steps; batched vs alone. The mixtures of
experts (mixtral, qwen3_moe: 4 experts, top-2) also greedy-decode the tokens HF does."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as QT

from backends.engine.model.loader import load_model
from backends.engine.model.quant import quantize_int4, quantize_int8
from backends.engine.model.config import ModelConfig, UnsupportedModelError
from tests.backends.engine.engine_helpers import (
    PagedRunner,
    run_paged_steps,
    hf_logits,
    is_router,
    load_fused,
    make_hf_model,
    roundtrip_model,
    save_hf,
    write_gguf,
)

ATOL = 1e-4

# Three sequences through four steps: fresh prefill, chunked prefill (8 then 5 tokens, the second
# chunk starting at position 8), decodes, and a sequence that joins late.
SEQS = {
    0: list(range(3, 10)),
    1: [17, 200, 5, 9, 9, 31, 77, 120, 64, 1, 2, 250, 8],
    2: [40, 41, 42, 43, 44],
}
STEPS = [
    [(0, SEQS[0]), (1, SEQS[1][:8])],
    [(0, [11]), (1, SEQS[1][8:]), (2, SEQS[2])],
    [(2, [99]), (0, [12]), (1, [13])],
    [(1, [14]), (2, [100]), (0, [15])],
]


def run_steps(model, config, dtype=torch.float32) -> dict[int, tuple[list[int], torch.Tensor]]:
    return run_paged_steps(model, config, SEQS, STEPS, dtype)


def max_error(ours: dict, reference) -> float:
    worst = 0.0
    for tokens, logits in ours.values():
        ref = hf_logits(reference, tokens)
        worst = max(worst, (logits - ref).abs().max().item())
    return worst


MOE = ("mixtral", "qwen3_moe")


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3", "phi3", *MOE])
def tiny(request, tmp_path_factory):
    arch = request.param
    model = make_hf_model(arch)
    path = save_hf(model, tmp_path_factory.mktemp(f"tiny-{arch}"))
    return arch, model, path


def test_hf_safetensors_float32_matches_transformers(tiny) -> None:
    arch, hf, path = tiny
    loaded = load_model(path, dtype=torch.float32)
    assert loaded.config.architecture == arch
    assert loaded.config.num_kv_heads == 2
    assert loaded.config.attention_bias == (arch == "qwen2")
    assert loaded.config.tie_word_embeddings == (arch in ("qwen2", "qwen3"))
    assert loaded.config.qk_norm == (arch in ("qwen3", "qwen3_moe"))
    assert (loaded.config.num_experts, loaded.config.num_experts_per_tok) == ((4, 2) if arch in MOE else (0, 0))
    assert max_error(run_steps(loaded.model, loaded.config), hf) <= ATOL


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0])
def test_gguf_float32_matches_transformers_on_decoded_weights(tiny, qtype, tmp_path) -> None:
    arch, hf, _ = tiny
    path = write_gguf(hf, tmp_path / "m.gguf", qtype)
    loaded = load_model(path, dtype=torch.float32)
    assert loaded.format == "gguf"
    assert loaded.tensor_types["layers.0.o"] == qtype.name
    assert loaded.config.architecture == arch
    # llama.cpp writes Mixtral as llama (with an expert count) and Qwen3-MoE as qwen3moe
    assert loaded.metadata["general.architecture"] == {"mixtral": "llama", "qwen3_moe": "qwen3moe"}.get(arch, arch)
    reference = roundtrip_model(hf, qtype)  # HF with exactly the weights the file decodes to
    assert max_error(run_steps(loaded.model, loaded.config), reference) <= ATOL


def test_gguf_mixed_types_q4_1_with_q8_0_embedding(tmp_path) -> None:
    hf = make_hf_model("llama", seed=3, tie_word_embeddings=True)
    path = write_gguf(hf, tmp_path / "m.gguf", QT.Q4_1, embed_type=QT.Q8_0)  # SmolLM2's layout
    loaded = load_model(path, dtype=torch.float32)
    assert loaded.config.tie_word_embeddings
    reference = roundtrip_model(hf, QT.Q4_1, embed_type=QT.Q8_0)
    assert max_error(run_steps(loaded.model, loaded.config), reference) <= ATOL


@pytest.mark.parametrize("qtype", [QT.Q2_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q5_1, QT.IQ4_NL, QT.IQ4_XS])
def test_k_quants_match_transformers_on_decoded_weights(qtype, tmp_path) -> None:
    """K-quant and IQ4 GGUFs (super-blocks of 256: a model 256 wide), float32 and the bfloat16 fast path,
    against HF on the weights the file decodes to; the embedding Q8_0 as in llama.cpp's mixes."""
    hf = make_hf_model("llama", seed=5, hidden_size=256, intermediate_size=512, tie_word_embeddings=True)
    path = write_gguf(hf, tmp_path / "m.gguf", qtype, embed_type=QT.Q8_0)
    reference = roundtrip_model(hf, qtype, embed_type=QT.Q8_0)
    loaded = load_model(path, dtype=torch.float32)
    assert loaded.tensor_types["layers.0.down"] == qtype.name
    assert max_error(run_steps(loaded.model, loaded.config), reference) <= ATOL
    # the fast path (packed kernels, the native step where this machine builds it), within the
    # bfloat16 tolerance of test_bfloat16_fast_path_tracks_float32
    fast = load_fused(path, dtype=torch.bfloat16)
    exact = run_steps(loaded.model, loaded.config)
    for seq_id, (_, logits) in run_steps(fast.model, fast.config, dtype=torch.bfloat16).items():
        ref = exact[seq_id][1]
        assert (logits.float() - ref).abs().max().item() <= 0.03 * ref.abs().max().item()


def test_llama3_rope_scaling_matches_transformers(tmp_path) -> None:
    rope = {
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
    }  # fmt: skip
    hf = make_hf_model("llama", seed=1, rope_parameters=rope)
    loaded = load_model(save_hf(hf, tmp_path / "m"), dtype=torch.float32)
    assert loaded.config.rope_scaling is not None and loaded.config.rope_scaling.kind == "llama3"
    assert max_error(run_steps(loaded.model, loaded.config), hf) <= ATOL


def test_mistral_matches_transformers(tmp_path) -> None:
    hf = make_hf_model("mistral", seed=2, sliding_window=None)
    loaded = load_model(save_hf(hf, tmp_path / "m"), dtype=torch.float32)
    assert loaded.config.architecture == "mistral"
    assert max_error(run_steps(loaded.model, loaded.config), hf) <= ATOL


def test_batched_equals_alone(tiny) -> None:
    """Float32 rounding only. A mixture of experts runs each expert over the rows the batch gives
    it (another matmul shape per batch), and its routing weights amplify that rounding: measured
    1.1e-5 on qwen3_moe, so its bound is 5e-5."""
    arch, _, path = tiny
    tol = 5e-5 if arch in MOE else 1e-5
    loaded = load_model(path, dtype=torch.float32)
    batched = run_steps(loaded.model, loaded.config)
    for seq_id, (tokens, logits) in batched.items():
        runner = PagedRunner(loaded.model, loaded.config, seed=seq_id + 7)
        alone = torch.cat([runner.step([(seq_id, tokens[:-3])])[0]] + [runner.step([(seq_id, [t])])[0] for t in tokens[-3:]])
        torch.testing.assert_close(alone, logits, atol=tol, rtol=tol)


@pytest.mark.parametrize("quantization", ["int4", "int8", None])
def test_bfloat16_fast_path_tracks_float32(tiny, quantization) -> None:
    """The fast path (bf16 activations, packed kernels, the native step where this machine builds
    it, as the engine runs) vs the float32 dequantise path on the same weights. Measured: max error ~0.05 on logits of magnitude ~3.5 for int4, int8 and dense
    alike, i.e. bfloat16 rounding, not the kernels. Where the argmax differs it is a near tie.

    A mixture of experts has a looser bound: its routing weights amplify the rounding (a softmax
    over router logits ~5 wide). Measured: max error 0.06-0.077 of the largest logit, on one
    position where a 1 % input error moved a token's two experts' weights from 0.46/0.54 to
    0.54/0.46 (same experts chosen); 0.01-0.03 elsewhere."""
    arch, _, path = tiny
    ref = load_model(path, quantization=quantization, dtype=torch.float32)
    fast = load_fused(path, quantization=quantization, dtype=torch.bfloat16)
    a = run_steps(ref.model, ref.config)
    b = run_steps(fast.model, fast.config, dtype=torch.bfloat16)
    for seq_id in SEQS:
        la, lb = a[seq_id][1], b[seq_id][1]
        tol = (0.1 if arch in MOE else 0.03) * la.abs().max().item()
        assert (la - lb).abs().max().item() <= tol
        picked = la.gather(1, lb.argmax(-1, keepdim=True)).squeeze(1)
        assert (la.max(-1).values - picked).max().item() <= 2 * tol


def quantized_reference(hf, quantization: str):
    """HF with its weights replaced by what load-time quantization keeps (the loader's policy:
    linear layers in ``quantization``, the embedding and lm_head int8 per channel; a router kept
    float32; stacked experts ``[E, out, in]`` quantized row by row, as each expert is)."""
    import copy

    ref = copy.deepcopy(hf)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim < 2 or is_router(name):
                continue
            rows = p.view(-1, p.shape[-1])
            if quantization == "int8" or "embed_tokens" in name or "lm_head" in name:
                rows.copy_(quantize_int8(rows).dequantize())
            else:
                rows.copy_(quantize_int4(rows).dequantize())
    return ref


@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_quantized_at_load_matches_transformers_on_dequantized_weights(tiny, quantization) -> None:
    _, hf, path = tiny
    loaded = load_model(path, quantization=quantization, dtype=torch.float32)
    ours = run_steps(loaded.model, loaded.config)
    assert max_error(ours, quantized_reference(hf, quantization)) <= ATOL


def test_quantized_at_load_is_close_to_float(tiny) -> None:
    """Relative error of all logits vs the float model. Measured on these random weights (the
    worst case for int4: no structure, ~9 % error per weight compounding over 7 matmuls):
    int8 1.9-2.8 %, int4 20-25 %. The mixtures of experts more (routing weights, and a token's
    experts, move with the quantization error): int8 2.6-4.3 %, int4 27-39 %."""
    arch, hf, path = tiny
    bounds = (("int8", 0.06), ("int4", 0.5)) if arch in MOE else (("int8", 0.04), ("int4", 0.35))
    for quantization, tol in bounds:
        loaded = load_model(path, quantization=quantization, dtype=torch.float32)
        ours = run_steps(loaded.model, loaded.config)
        for tokens, logits in ours.values():
            ref = hf_logits(hf, tokens)
            assert ((logits - ref).norm() / ref.norm()).item() <= tol, quantization


def greedy(runner_steps, prompts: dict[int, list[int]], new_tokens: int) -> dict[int, list[int]]:
    """Greedy continuations: the prompts prefilled together, then one decode step for all."""
    out = {i: [] for i in prompts}
    step = list(prompts.items())
    for _ in range(new_tokens):
        logits = runner_steps(step)
        step = [(i, [int(lg[-1].argmax())]) for (i, _), lg in zip(step, logits, strict=True)]
        for i, (tok,) in step:
            out[i].append(tok)
    return out


def hf_greedy(hf, prompt: list[int], new_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(new_tokens):
        tokens.append(int(hf_logits(hf, tokens)[-1].argmax()))
    return tokens[len(prompt) :]


@pytest.mark.parametrize("arch", MOE)
def test_moe_greedy_tokens_equal_transformers_batched_and_alone(arch, tmp_path) -> None:
    """Float32, 4 experts top-2: our greedy tokens are HF's, for prompts decoded together and
    each alone (different batches group different tokens per expert)."""
    hf = make_hf_model(arch, seed=11)
    loaded = load_model(save_hf(hf, tmp_path / "m"), dtype=torch.float32)
    prompts = {0: [5, 17, 200, 9], 1: list(range(30, 41)), 2: [250, 3], 3: [64, 64, 1, 99, 7, 120]}
    expected = {i: hf_greedy(hf, p, 8) for i, p in prompts.items()}
    batched = greedy(PagedRunner(loaded.model, loaded.config).step, prompts, 8)
    assert batched == expected
    for i, prompt in prompts.items():
        assert greedy(PagedRunner(loaded.model, loaded.config, seed=i).step, {i: prompt}, 8) == {i: expected[i]}


def test_qwen3_moe_without_norm_topk_prob_matches_transformers(tmp_path) -> None:
    """Qwen3-MoE's flag off: the top-k softmax probabilities weight the experts as they are."""
    hf = make_hf_model("qwen3_moe", seed=4, norm_topk_prob=False)
    loaded = load_model(save_hf(hf, tmp_path / "m"), dtype=torch.float32)
    assert not loaded.config.norm_topk_prob
    assert max_error(run_steps(loaded.model, loaded.config), hf) <= ATOL


@pytest.mark.parametrize("arch", MOE)
def test_moe_routes_tokens_to_different_experts(arch, tmp_path) -> None:
    """The test models exercise the grouping: every expert is chosen by some token, and tokens
    differ in their pairs of experts."""
    loaded = load_model(save_hf(make_hf_model(arch), tmp_path / "m"), dtype=torch.float32)
    moe = loaded.model.layers[0].mlp
    x = torch.randn(64, loaded.config.hidden_size, generator=torch.Generator().manual_seed(0))
    weights, experts = moe.route(loaded.model.layers[0].ffn_norm(x))
    assert set(experts.view(-1).tolist()) == set(range(4))
    assert len({tuple(sorted(e)) for e in experts.tolist()}) > 1
    torch.testing.assert_close(weights.sum(-1), torch.ones(64))  # renormalised (both fixtures)


def test_moe_configs_the_engine_cannot_run_are_refused() -> None:
    base = {
        "model_type": "qwen3_moe", "vocab_size": 256, "hidden_size": 128, "intermediate_size": 256,
        "moe_intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_experts": 4,
        "num_experts_per_tok": 2,
    }  # fmt: skip
    assert ModelConfig.from_hf_config(base).num_experts == 4
    with pytest.raises(UnsupportedModelError, match="mlp_only_layers"):
        ModelConfig.from_hf_config({**base, "mlp_only_layers": [1]})
    with pytest.raises(UnsupportedModelError, match="decoder_sparse_step"):
        ModelConfig.from_hf_config({**base, "decoder_sparse_step": 2})
    with pytest.raises(UnsupportedModelError, match="expert counts"):
        ModelConfig.from_hf_config({**base, "num_experts": 0})
