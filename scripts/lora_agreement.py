"""Teacher-forced agreement of the native int4 path with HF transformers + ``peft``, with and
without LoRA adapters, on more prompts than the test (``tests/backends/engine/lora/
test_lora_reference.py``) affords in CI: per model (the base and the test's four random adapters)
the top-1 agreement and the mean KL(HF || ours) over every position.

    python scripts/lora_agreement.py [--prompts 32] [--target native|avx2]   # repository root, ~2 min

The continuations are the engine's float32 greedy ones (all models in one batch, as the test
makes them), HF + peft scores them in one forward each. One thread, as the test.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.engine.builder import EngineOptions, load_kernels  # noqa: E402
from backends.engine.catalogue import default_home, pull  # noqa: E402
from backends.engine.model.loader import load_model  # noqa: E402
from tests.backends.engine.engine_helpers import load_fused  # noqa: E402
from tests.backends.engine.lora.lora_helpers import (  # noqa: E402
    LoRARunner,
    load_adapter,
    peft_model,
    with_lora,
    write_peft_adapter,
)
from tests.backends.engine.lora.test_lora_reference import ADAPTERS, NAMES, NEW_TOKENS, PROMPTS  # noqa: E402

MORE_PROMPTS = [
    "The largest planet in our solar system is", "How do I make a cup of tea?", "import numpy as np\n",
    "What is the boiling point of water?", "My favourite book is", "Give me three tips for better sleep.",
    "SELECT name FROM users WHERE", "The French Revolution began in", "Summarize the plot of Hamlet.",
    "Why is the sky blue?", "A haiku about autumn:", "The quick brown fox", "What are prime numbers?",
    "Describe a cat in two sentences.", "In machine learning, overfitting means", "The recipe calls for",
    "Dear customer, thank you for", "Name the seven continents.", "Water is made of", "How does a rainbow form?",
    "The best way to learn a language is", "Convert 10 miles to kilometres.", "Tell me a joke about computers.",
    "The history of the internet",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32, help=f"at most {len(PROMPTS) + len(MORE_PROMPTS)}")
    parser.add_argument("--target", choices=["native", "avx2"], default="native", help="the native kernels' build")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = pull("smollm2-135m-instruct", home=default_home(os.environ), progress=False)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    prompts = [tokenizer(p).input_ids for p in (PROMPTS + MORE_PROMPTS)[: args.prompts]]
    seq = {(n, k): i for i, (n, k) in enumerate((n, k) for n in NAMES for k in range(len(prompts)))}

    with tempfile.TemporaryDirectory() as root:
        dirs = {n: write_peft_adapter(hf, Path(root) / n, **spec) for n, spec in ADAPTERS.items()}
        ours = load_model(path, dtype=torch.float32)
        runner = LoRARunner(ours, with_lora(ours, max_loras=4), num_blocks=4096, block_size=16)
        adapters = {n: load_adapter(p, ours.config, i + 1, torch.float32) for i, (n, p) in enumerate(dirs.items())}
        continuations = runner.greedy(
            {seq[n, k]: (p, None if n is None else adapters[n]) for n in NAMES for k, p in enumerate(prompts)}, NEW_TOKENS
        )
        del ours, runner
        reference = {}
        with torch.no_grad():
            for n in NAMES:
                model = hf if n is None else peft_model(hf, dirs[n])
                for k, p in enumerate(prompts):
                    tokens = torch.tensor([p + continuations[seq[n, k]]])
                    reference[seq[n, k]] = model(tokens).logits[0, len(p) - 1 : -1].log_softmax(-1)
                if n is not None:
                    model.unload()

        kernels = load_kernels(EngineOptions(native_target=args.target))
        if kernels is None or not kernels.has_int4_matmul:
            raise SystemExit(f"no native int4 matmul in the {args.target} build on this machine")
        loaded = load_fused(path, kernels=kernels, dtype=torch.bfloat16)
        adapters = {n: load_adapter(p, loaded.config, i + 1, torch.float32) for i, (n, p) in enumerate(dirs.items())}
        runner = LoRARunner(loaded, with_lora(loaded, max_loras=4), num_blocks=4096, block_size=16)
        logits = runner.teacher_forced(
            {
                seq[n, k]: (p, continuations[seq[n, k]], None if n is None else adapters[n])
                for n in NAMES for k, p in enumerate(prompts)
            }  # fmt: skip
        )

    print(f"{kernels.variant} build, {len(prompts)} prompts, {len(prompts) * NEW_TOKENS} positions per model")
    print("| model | top-1 agreement | mean KL(HF || ours) x 1e5 |\n|---|---|---|")
    pooled = 0
    for n in NAMES:
        agree, kl = 0, 0.0
        for k in range(len(prompts)):
            ref, ours_ = reference[seq[n, k]], logits[seq[n, k]].float().log_softmax(-1)
            agree += int((ours_.argmax(-1) == ref.argmax(-1)).sum())
            kl += float((ref.exp() * (ref - ours_)).sum())
        pooled += agree if n is not None else 0
        print(f"| {n or 'base'} | {agree} | {kl / (len(prompts) * NEW_TOKENS) * 1e5:.1f} |")
    print(f"adapters pooled: {pooled / len(ADAPTERS):.2f}")


if __name__ == "__main__":
    main()
