"""Engine speed on a CUDA device, for a model shaped like SmolLM2-135M (random weights).

    python scripts/cuda_engine_bench.py [--device cuda] [--batch 1,16,64]

The device machines reach no package index, so the real GGUF cannot travel there; speed depends
on shapes, not on weight values, so a random model of SmolLM2's exact shapes, quantized to int4
at load (group 32, the engine's own path), stands in. Measures prefill tokens/s on a 512-token
prompt and decode tokens/s (forward + logits, greedy) at several batch sizes, with the paged KV
cache, bfloat16 activations. Prints one JSON line per figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def main() -> int:
    from backends.engine.model.attention import AttentionMetadata, allocate_kv_cache
    from backends.engine.model.loader import load_model
    from bench.synthetic import write_random_llama

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", default="1,16,64")
    parser.add_argument("--decode-steps", type=int, default=64)
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    with tempfile.TemporaryDirectory() as tmp:
        write_random_llama(
            Path(tmp), hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152,
            std=0.02, rope_theta=100000.0, max_positions=8192,
        )  # SmolLM2-135M's shapes
        loaded = load_model(tmp, quantization="int4", dtype=torch.bfloat16, device=device)
    model, config = loaded.model, loaded.config
    block_size, prompt_len = 16, 512
    batches = [int(b) for b in args.batch.split(",")]
    max_len = prompt_len + args.decode_steps + 16
    blocks_per_seq = -(-max_len // block_size)
    kv = allocate_kv_cache(config, blocks_per_seq * max(batches), block_size, torch.bfloat16, device)
    print(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                      "torch": torch.__version__}), flush=True)  # fmt: skip

    def tables(b: int) -> list[list[int]]:
        return [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(b)]

    # prefill: one 512-token prompt
    ids = torch.randint(0, config.vocab_size, (prompt_len,), device=device)
    pos = torch.arange(prompt_len, device=device)
    meta = AttentionMetadata.from_lists(query_lens=[prompt_len], seq_lens=[prompt_len], block_tables=tables(1),
                                        block_size=block_size, device=device)  # fmt: skip
    for _ in range(3):
        model.compute_logits(model(ids, pos, meta, kv)[-1:])
    sync()
    t = time.perf_counter()
    reps = 10
    for _ in range(reps):
        model.compute_logits(model(ids, pos, meta, kv)[-1:])
    sync()
    print(json.dumps({"figure": "prefill", "tokens": prompt_len,
                      "tokens_per_s": round(prompt_len * reps / (time.perf_counter() - t), 1)}), flush=True)  # fmt: skip

    for b in batches:
        # fill the cache of b sequences with a prompt, then decode greedily
        for i in range(b):
            m = AttentionMetadata.from_lists(query_lens=[prompt_len], seq_lens=[prompt_len],
                                             block_tables=[tables(b)[i]], block_size=block_size, device=device)  # fmt: skip
            model(ids, pos, m, kv)
        tok = torch.randint(0, config.vocab_size, (b,), device=device)
        warm_up = 4  # first calls of each kernel shape (allocator, kernel selection) are not timed
        for step in range(args.decode_steps + warm_up):
            if step == warm_up:
                sync()
                t = time.perf_counter()
            length = prompt_len + step + 1
            m = AttentionMetadata.from_lists(query_lens=[1] * b, seq_lens=[length] * b, block_tables=tables(b),
                                             block_size=block_size, device=device)  # fmt: skip
            positions = torch.full((b,), length - 1, device=device)
            tok = model.compute_logits(model(tok, positions, m, kv)).argmax(-1)
        sync()
        elapsed = time.perf_counter() - t  # t was set at step == warm_up
        print(json.dumps({"figure": "decode", "batch": b, "context": prompt_len,
                          "step_ms": round(elapsed / args.decode_steps * 1e3, 2),
                          "tokens_per_s": round(b * args.decode_steps / elapsed, 1)}), flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
