"""Multi-LoRA vs HF transformers + ``peft`` on the same base weights (SmolLM2-135M-Instruct Q4_1
GGUF, which both load), with four random-weight PEFT adapters of different shapes: q/v rank 8;
every projection rank 4 with rsLoRA; the MLP rank 16; k/o/down rank 8 alpha 32.

- float32 path: all four adapters and the base model in one batch (8 prompts each, 40 sequences),
  greedy 16 tokens; for every adapter HF + peft's argmax, teacher-forced on our continuation, is
  our token at every position on all 8 prompts (our greedy output is peft's greedy output).
- quantized native path (int4 kernels, bfloat16): teacher-forced top-1 agreement with HF + peft
  over the adapters is at least the base model's own agreement with HF (met on the AVX-512 BF16
  build; the AVX2 build misses it by a near-tie: ``AVX2_MISS``). Each row's logits are the same
  bit for bit in the mixed batch, alone, and after a prefix-cache hit.

Greedy identity is checked as in ``model/test_smollm2_accuracy.py``: HF scores prompt +
continuation in one forward instead of running its decode loop.
"""

from __future__ import annotations

import pytest
import torch

from backends.engine.model.loader import load_model
from tests.backends.engine.engine_helpers import load_fused
from tests.backends.engine.lora.lora_helpers import LoRARunner, load_adapter, peft_model, with_lora, write_peft_adapter

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "Explain photosynthesis in one sentence.",
    "The three primary colors are",
    "Once upon a time, in a small village,",
    "Translate to French: Good morning, how are you?",
    "List three benefits of regular exercise:",
]
NEW_TOKENS = 16
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "qv": dict(targets=["q_proj", "v_proj"], r=8, alpha=16, seed=1),
    "all": dict(targets=ALL, r=4, alpha=8, seed=2, use_rslora=True),
    "mlp": dict(targets=["gate_proj", "up_proj", "down_proj"], r=16, alpha=16, seed=3),
    "kod": dict(targets=["k_proj", "o_proj", "down_proj"], r=8, alpha=32, seed=4),
}
NAMES = [None, *ADAPTERS]  # None: the base model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """As in test_smollm2_accuracy: two threads crawl on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def seq_id(name: str | None, k: int) -> int:
    return NAMES.index(name) * 100 + k


@pytest.fixture(scope="module")
def reference(smollm2_path, smollm2_hf, tmp_path_factory):
    """Prompts, adapter directories, our float32 greedy continuations of every (adapter, prompt) in
    one batch, and HF + peft's teacher-forced argmax on them."""
    tokenizer, hf = smollm2_hf
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    root = tmp_path_factory.mktemp("adapters")
    dirs = {n: write_peft_adapter(hf, root / n, **spec) for n, spec in ADAPTERS.items()}

    ours = load_model(smollm2_path, dtype=torch.float32)
    runner = LoRARunner(ours, with_lora(ours, max_loras=4), num_blocks=512, block_size=16)
    adapters = {n: load_adapter(p, ours.config, i + 1, torch.float32) for i, (n, p) in enumerate(dirs.items())}
    seqs = {seq_id(n, k): (p, None if n is None else adapters[n]) for n in NAMES for k, p in enumerate(prompts)}
    continuations = runner.greedy(seqs, NEW_TOKENS)
    del ours, runner

    top1: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for n in NAMES:
            model = hf if n is None else peft_model(hf, dirs[n])
            for k, p in enumerate(prompts):
                c = continuations[seq_id(n, k)]
                top1[seq_id(n, k)] = model(torch.tensor([p + c])).logits[0, len(p) - 1 : -1].argmax(-1)
            if n is not None:
                model.unload()
    return prompts, dirs, continuations, top1


def test_float32_greedy_is_peft_greedy(reference) -> None:
    prompts, _, continuations, top1 = reference
    for n in NAMES:
        identical = [bool((top1[seq_id(n, k)] == torch.tensor(continuations[seq_id(n, k)])).all()) for k in range(len(prompts))]
        assert sum(identical) == len(PROMPTS) >= 8, (n, identical)
    for n in ADAPTERS:  # each adapter really moves the model
        changed = sum(continuations[seq_id(n, k)] != continuations[seq_id(None, k)] for k in range(len(prompts)))
        assert changed >= len(PROMPTS) // 2, (n, changed)


@pytest.fixture(scope="module")
def native(reference, smollm2_path, native_kernels):
    """The engine's quantized native path with the four adapters (bfloat16 weights), and its slots."""
    if not native_kernels.has_int4_matmul:
        pytest.skip("no native int4 matmul on this machine (needs a C compiler and AVX-512 BF16)")
    _, dirs, _, _ = reference
    loaded = load_fused(smollm2_path, kernels=native_kernels, dtype=torch.bfloat16)
    from backends.engine.native.fused import FusedLayer

    assert all(isinstance(layer, FusedLayer) for layer in loaded.model.layers)
    adapters = {n: load_adapter(p, loaded.config, i + 1, torch.float32) for i, (n, p) in enumerate(dirs.items())}
    return loaded, with_lora(loaded, max_loras=4), adapters


#: the AVX2 build (``native_target = "avx2"``, what a CPU without AVX-512 runs) misses the target
AVX2_MISS = (
    "target missed by the AVX2 kernels (issue 14): on an Intel Xeon, these 8 prompts' 128 positions per "
    "model: base 127, adapters pooled 126.75; over 32 prompts (512 positions): base 509, adapters 509, 509, "
    "508, 507 (pooled 508.25). Every miss a near-tie; the AVX-512 BF16 build meets it (127 vs 127; 508 vs "
    "508.5). The adapted models' KL to HF is 0.94-2.2x the base's (random adapters flatten the distribution: "
    "1.4-1.8x its near-ties), alike on torch's bfloat16 path: bfloat16 activations bound it"
)


def test_native_top1_agreement_at_least_the_base_models(reference, native, request) -> None:  # type: ignore[no-untyped-def]
    prompts, _, continuations, top1 = reference
    loaded, slots, adapters = native
    if loaded.model.layers[0].kernels.variant == "avx2-fma":
        request.applymarker(pytest.mark.xfail(strict=False, reason=AVX2_MISS))
    runner = LoRARunner(loaded, slots, num_blocks=512, block_size=16)
    seqs = {
        seq_id(n, k): (p, continuations[seq_id(n, k)], None if n is None else adapters[n])
        for n in NAMES for k, p in enumerate(prompts)
    }  # fmt: skip
    logits = runner.teacher_forced(seqs)
    agreement = {
        n: torch.cat([logits[seq_id(n, k)].argmax(-1) == top1[seq_id(n, k)] for k in range(len(prompts))]).float().mean().item()
        for n in NAMES
    }
    print(agreement)
    # pooled over the adapters' 512 positions: per adapter (128 positions) one near-tie (HF's top-2
    # margin < 0.05, as in the base model's own misses) moves the figure by 0.008
    pooled = sum(agreement[n] for n in ADAPTERS) / len(ADAPTERS)
    assert pooled >= agreement[None], agreement


def test_native_mixed_batch_gives_each_row_what_it_gets_alone(reference, native) -> None:
    prompts, _, _, _ = reference
    loaded, slots, adapters = native
    seqs = {seq_id(n, k): (p, None if n is None else adapters[n]) for n in NAMES for k, p in enumerate(prompts)}
    together = LoRARunner(loaded, slots, num_blocks=512, block_size=16).greedy(seqs, NEW_TOKENS)
    for n in ADAPTERS:
        assert sum(together[seq_id(n, k)] != together[seq_id(None, k)] for k in range(len(prompts))) >= len(PROMPTS) // 2
    for k, n in enumerate(NAMES):  # each alone, on a different prompt
        alone = LoRARunner(loaded, slots, num_blocks=64, block_size=16)
        out = alone.greedy({0: (prompts[k], None if n is None else adapters[n])}, NEW_TOKENS)
        assert out[0] == together[seq_id(n, k)], n


def test_native_rows_get_the_same_logits_whatever_the_step(reference, native) -> None:
    """Each row's logits are bit-identical whatever else its step holds: a prompt and its
    continuation in the 40-sequence mixed batch, alone in one step, and alone in two steps (the
    second a short prefill over the first's cached blocks, as after a prefix-cache hit; where the
    native prefill attention runs: torch's, on the AVX2 build, sums by the shape, base rows too).
    Torch's matmuls for the LoRA terms, whose summation order follows the shape, moved the trained
    adapter's greedy answer after a prefix-cache hit; the native kernel sums in one order."""
    prompts, _, continuations, _ = reference
    loaded, slots, adapters = native
    kernels = loaded.model.layers[0].kernels  # a FusedLayer's
    seqs = {
        seq_id(n, k): (p, continuations[seq_id(n, k)], None if n is None else adapters[n])
        for n in NAMES for k, p in enumerate(prompts)
    }  # fmt: skip
    mixed = LoRARunner(loaded, slots, num_blocks=512, block_size=16).teacher_forced(seqs)
    for k, n in enumerate(NAMES):
        prompt, continuation, adapter = seqs[seq_id(n, k)]
        alone = LoRARunner(loaded, slots, num_blocks=64, block_size=16).teacher_forced({0: (prompt, continuation, adapter)})
        split = LoRARunner(loaded, slots, num_blocks=64, block_size=16)
        split.adapters[0] = adapter
        tokens = prompt + continuation
        rows = torch.cat([split.step([(0, tokens[:16])])[0], split.step([(0, tokens[16:])])[0]])
        assert len(prompt) < 16 < len(tokens)
        assert torch.equal(alone[0], mixed[seq_id(n, k)]), n
        assert torch.equal(rows[len(prompt) - 1 : -1], mixed[seq_id(n, k)]) or not kernels.has_prefill_attention, n


def _stepwise(runner: LoRARunner, seqs: dict, adapters: dict) -> dict[int, torch.Tensor]:  # type: ignore[type-arg]
    """Teacher-forced through decode steps: each prompt prefilled, then its continuation fed one
    token per step (every step decode-only); the logits ``[len(continuation), V]`` predicting it."""
    runner.adapters.update({i: adapters[i] for i in seqs})
    first = runner.step([(i, p) for i, (p, _) in seqs.items()])
    out = {i: [rows[-1].float()] for i, rows in zip(seqs, first, strict=True)}
    length = len(next(iter(seqs.values()))[1])
    for t in range(length - 1):
        logits = runner.step([(i, [c[t]]) for i, (_, c) in seqs.items()])
        for i, rows in zip(seqs, logits, strict=True):
            out[i].append(rows[-1].float())
    return {i: torch.stack(rows) for i, rows in out.items()}


def test_native_one_call_decode_applies_each_rows_adapter(reference, native) -> None:
    """The one native call per decode step (``LoRAStack`` -> ``DecodeStep`` with ``lora_add``),
    every row with its own adapter (the base and four adapters of different targets and ranks in
    one batch), teacher-forced on the float32 path's continuations through decode steps: its logits
    are the layer-by-layer path's, bit for bit (both add the terms by the same native kernel, each
    row's in one order). The one call is really taken."""
    prompts, _, continuations, _ = reference
    loaded, slots, adapters = native
    step = loaded.model.layers.inner[0].decode_step
    assert step is not None
    seqs = {seq_id(n, k): (p, continuations[seq_id(n, k)]) for n in NAMES for k, p in enumerate(prompts)}
    owners = {seq_id(n, k): None if n is None else adapters[n] for n in NAMES for k in range(len(prompts))}
    calls = {"n": 0}
    original = type(step).__call__

    def counted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return original(self, *args, **kwargs)

    try:
        type(step).__call__ = counted  # type: ignore[method-assign]
        fast = _stepwise(LoRARunner(loaded, slots, num_blocks=1024, block_size=16), seqs, owners)
    finally:
        type(step).__call__ = original  # type: ignore[method-assign]
    assert calls["n"] == NEW_TOKENS - 1  # every step after the prefill
    step_applies = step.applies
    try:
        step.applies = lambda *args: False  # type: ignore[method-assign]
        layered = _stepwise(LoRARunner(loaded, slots, num_blocks=1024, block_size=16), seqs, owners)
    finally:
        step.applies = step_applies  # type: ignore[method-assign]
    differing = [i for i in seqs if not torch.equal(fast[i], layered[i])]
    assert differing == [], differing
