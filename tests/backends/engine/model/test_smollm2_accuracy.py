"""The real default model (SmolLM2-135M-Instruct Q4_1 GGUF) vs HF transformers loading the same
GGUF (dequantised to float32), on 10 fixed prompts tokenized by HF's tokenizer from that GGUF.

- float32 activations (exact reference): greedy tokens identical for the first 32 tokens on
  >= 9 of 10 prompts; teacher-forced logprobs within 1e-3.
- bfloat16 activations (the fast path: packed int4 kernel): teacher-forced top-1 agreement
  >= 0.98 and mean |delta top-1 logprob| <= 0.03.

Greedy identity is checked without running HF's decode loop: our float32 engine generates 32
greedy tokens per prompt (all prompts in one batch through the paged cache), then HF scores each
prompt + continuation in one forward; the continuation is HF's own greedy output exactly when HF's
argmax at every position is the token we chose. Teacher-forced figures score those 320 positions.

The figures are recorded in docs/benchmarks.md ("Engine accuracy vs HF transformers");
``python tests/engine/test_smollm2_accuracy.py`` prints them.
"""

from __future__ import annotations

import pytest
import torch

from backends.engine.model.loader import load_model
from tests.backends.engine.engine_helpers import PagedRunner, load_fused

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "Explain photosynthesis in one sentence.",
    "The three primary colors are",
    "Once upon a time, in a small village,",
    "Translate to French: Good morning, how are you?",
    "List three benefits of regular exercise:",
    "Question: What is 12 times 7? Answer:",
    "The most important invention of the 20th century was",
]
NEW_TOKENS = 32

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The figures do not depend on the thread count (every kernel here splits independent outputs
    across threads), but two threads crawl on a shared machine with a busy core: libgomp's
    spin-waiting made one float32 step take 8 s instead of 0.2 s there."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def greedy(loaded, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """All prompts in one batch: a mixed-length prefill, then batched decode steps."""
    runner = PagedRunner(loaded.model, loaded.config, num_blocks=256, block_size=16, dtype=loaded.dtype)
    batch = list(enumerate(prompts))
    outs: list[list[int]] = [[] for _ in prompts]
    for _ in range(steps):
        logits = runner.step(batch)
        batch = []
        for i, rows in enumerate(logits):
            token = int(rows[-1].argmax())
            outs[i].append(token)
            batch.append((i, [token]))
    return outs


def teacher_forced(loaded, prompts, continuations) -> list[torch.Tensor]:
    """Logprobs ``[NEW_TOKENS, V]`` predicting each continuation token, all sequences in one step."""
    runner = PagedRunner(loaded.model, loaded.config, num_blocks=256, block_size=16, dtype=loaded.dtype)
    logits = runner.step([(i, p + c) for i, (p, c) in enumerate(zip(prompts, continuations))])
    return [rows[len(p) - 1 : -1].log_softmax(-1) for rows, p in zip(logits, prompts)]


@pytest.fixture(scope="module")
def reference(smollm2_path, smollm2_hf):
    """Prompts, our float32 greedy continuations, and HF's teacher-forced logprobs on them."""
    tokenizer, model = smollm2_hf
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    ours = load_model(smollm2_path, dtype=torch.float32)
    continuations = greedy(ours, prompts, NEW_TOKENS)
    del ours
    logprobs = []
    with torch.no_grad():
        for ids, continuation in zip(prompts, continuations):
            logits = model(torch.tensor([ids + continuation])).logits[0, len(ids) - 1 : -1].float()
            logprobs.append(logits.log_softmax(-1))
    return prompts, continuations, logprobs


def figures(reference, dtype: torch.dtype, smollm2_path) -> dict[str, float]:
    prompts, continuations, ref = reference
    loaded = load_fused(smollm2_path, dtype=dtype)  # the engine's path: native where built
    ours = teacher_forced(loaded, prompts, continuations)
    chosen = [torch.tensor(c).unsqueeze(1) for c in continuations]
    top1 = [r.argmax(-1, keepdim=True) for r in ref]
    agree = torch.cat([(o.argmax(-1, keepdim=True) == t).float() for o, t in zip(ours, top1)])
    delta_top1 = torch.cat([(o.gather(1, t) - r.gather(1, t)).abs() for o, r, t in zip(ours, ref, top1)])
    return {
        # our greedy continuation is HF's greedy output iff HF's argmax picks it at every position
        "greedy_identical_prompts": sum(bool((t == c).all()) for t, c in zip(top1, chosen)),
        "max_abs_delta_logprob": max((o - r).abs().max().item() for o, r in zip(ours, ref)),
        "top1_agreement": agree.mean().item(),
        "mean_abs_delta_top1_logprob": delta_top1.mean().item(),
        "max_abs_delta_top1_logprob": delta_top1.max().item(),
    }


def test_float32_matches_transformers(reference, smollm2_path) -> None:
    f = figures(reference, torch.float32, smollm2_path)
    print(f)
    assert f["greedy_identical_prompts"] >= 9
    assert f["max_abs_delta_logprob"] <= 1e-3


def test_bfloat16_fast_path_tracks_transformers(reference, smollm2_path) -> None:
    f = figures(reference, torch.bfloat16, smollm2_path)
    print(f)
    assert f["top1_agreement"] >= 0.98
    assert f["mean_abs_delta_top1_logprob"] <= 0.03


if __name__ == "__main__":  # print the figures for docs/benchmarks.md
    import os
    import time

    from backends.engine.catalogue import default_home, pull
    from tests.backends.engine.conftest import smollm2_hf

    path = pull("smollm2-135m-instruct", home=default_home(os.environ), progress=True)
    t0 = time.perf_counter()
    ref = reference.__wrapped__(path, smollm2_hf.__wrapped__(path))
    for dt in (torch.float32, torch.bfloat16):
        print(dt, figures(ref, dt, path))
    print(f"{time.perf_counter() - t0:.0f} s")
