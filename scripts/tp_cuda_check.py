"""CUDA checks for the engine and its tensor-parallel path; run on a machine with a GPU.

    python scripts/tp_cuda_check.py [--model PATH] [--tokens 24]

What it checks (each line prints PASS / FAIL / SKIP and numbers):
1. tp=1 on CUDA equals tp=1 on the CPU (float32 activations): max |logit difference| on a
   prefill and greedy tokens of a few prompts.
2. The int4 CUDA kernel (``_weight_int4pack_mm``, bfloat16): one ``Int4Linear`` against its
   dequantised matmul, and the bfloat16 CUDA engine's logits against the float32 CPU ones.
3. The tensor-parallel code path on one GPU: ``build_tp_engine`` with ``tensor_parallel = 1`` on
   CUDA (sharding and repacking onto ``cuda:0``, an NCCL compute group and a gloo control group of
   one rank) gives tp=1's greedy tokens. NCCL refuses two ranks on one GPU, so this is what one GPU
   allows.
4. With two or more GPUs: tp=2 over NCCL (``cuda:0``, ``cuda:1``) against tp=1 on CUDA, float32:
   logits within tolerance and identical greedy tokens.

``--model`` defaults to the cached catalogue model (SmolLM2-135M-Instruct Q4_1) and falls back to
a tiny random model written to a temporary directory (quantized to int4 at load), so the script
needs no network. Exit status 0 when nothing failed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

RESULTS: list[tuple[str, str, str]] = []
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "List three colours:"]


def report(name: str, ok: bool | None, detail: str) -> None:
    status = "SKIP" if ok is None else "PASS" if ok else "FAIL"
    RESULTS.append((name, status, detail))
    print(f"[{status}] {name}: {detail}", flush=True)


# --------------------------------------------------------------------------------------------
# model


def find_model(arg: str | None) -> tuple[Path, str | None]:
    """(path, quantization) of the model to check."""
    if arg:
        return Path(arg), None
    try:
        from backends.engine.catalogue import CATALOGUE, cached_path, default_home

        path = cached_path(CATALOGUE["smollm2-135m-instruct"], default_home())
        if path.is_file():
            return path, None
    except Exception:  # noqa: BLE001
        pass
    return write_tiny_model(Path(tempfile.mkdtemp(prefix="taxiway-tiny-"))), "int4"


def write_tiny_model(path: Path) -> Path:
    """A random llama (6 heads over 3 KV heads, head_dim 64) with a byte-level tokenizer."""
    from bench.synthetic import write_random_llama

    return write_random_llama(
        path, hidden=384, intermediate=1024, layers=2, heads=6, kv_heads=3, vocab=320, tokenizer=True
    )

def options(model: Path, quantization: str | None, **kw: object):  # type: ignore[no-untyped-def]
    from backends.engine.builder import EngineOptions

    base = dict(model=str(model), quantization=quantization, kv_cache_tokens=4096, max_num_seqs=16)
    return EngineOptions(**{**base, **kw})  # type: ignore[arg-type]


def forget_cached_blocks(engine) -> None:  # type: ignore[no-untyped-def]
    """An empty prefix cache: runs compare like with like, and ``prefill_logits`` (which writes
    cache blocks behind the block manager's back) cannot leave stale cached blocks."""
    from backends.engine.sched.block_manager import BlockManager

    bm = engine.scheduler.block_manager
    engine.scheduler.block_manager = BlockManager(bm.num_blocks, bm.block_size, bm.enable_prefix_caching)


def greedy(engine, prompts: list[str], max_tokens: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    from gateway.interface import SamplingParams

    forget_cached_blocks(engine)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    ids = [f"p{i}-{time.monotonic_ns()}" for i in range(len(prompts))]
    for request_id, text in zip(ids, prompts, strict=True):
        engine.add_request(request_id, engine.tokenizer.encode(text), params)
    tokens: dict[str, list[int]] = {request_id: [] for request_id in ids}
    while engine.has_unfinished():
        for output in engine.step():
            tokens[output.request_id].extend(t for item in output.items for t in (getattr(item, "token_ids", ()) or ()))
    return [tokens[request_id] for request_id in ids]


def prefill_logits(engine, text: str) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Float32 logits of every position of one prompt, through the engine's model and cache."""
    from backends.engine.model.attention import AttentionMetadata

    runner = engine.runner
    ids = engine.tokenizer.encode(text)
    n = len(ids)
    blocks = list(range(-(-n // runner.block_size)))
    attn = AttentionMetadata.from_lists(
        query_lens=[n], seq_lens=[n], block_tables=[blocks], block_size=runner.block_size, device=runner.device
    )
    ids_t = torch.tensor(ids, device=runner.device)
    hidden = runner.model(ids_t, torch.arange(n, device=runner.device), attn, runner.kv_caches)
    logits = runner.model.compute_logits(hidden).float().cpu()
    forget_cached_blocks(engine)
    return logits


def compare(name: str, a, b, prompts: list[str], tokens: int, atol: float) -> None:  # type: ignore[no-untyped-def]
    diff = max((prefill_logits(a, p) - prefill_logits(b, p)).abs().max().item() for p in prompts)
    ta, tb = greedy(a, prompts, tokens), greedy(b, prompts, tokens)
    same = sum(x == y for x, y in zip(ta, tb, strict=True))
    report(f"{name}: logits", diff <= atol, f"max |diff| {diff:.2e} (tolerance {atol:.0e})")
    report(f"{name}: greedy tokens", same == len(prompts), f"{same}/{len(prompts)} prompts identical ({tokens} tokens)")


# --------------------------------------------------------------------------------------------
# checks


def check_int4_kernel(device: str) -> None:
    from backends.engine.model.quant import Int4Linear, quantize_int4

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(1536, 576, generator=gen)
    data = quantize_int4(w)
    layer = Int4Linear.from_data(data, dtype=torch.bfloat16, device=device)
    ref = data.dequantize().to(device, torch.bfloat16)
    worst = 0.0
    for rows in (1, 16, 256):
        x = torch.randn(rows, 576, generator=gen).to(device, torch.bfloat16)
        y = layer(x).float()
        expect = (x.float() @ ref.float().t())
        worst = max(worst, ((y - expect).norm() / expect.norm()).item())
    detail = f"relative error {worst:.2e} (M = 1, 16, 256)"
    report(f"2. int4 kernel on {device} vs dequantised matmul", worst < 2e-2, detail)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the cached SmolLM2, else a tiny random model")
    parser.add_argument("--tiny", action="store_true", help="use the tiny random model (int4 at load)")
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--device", default="cuda", help="'cpu' dry-runs the same checks without a GPU")
    args = parser.parse_args()
    dev = args.device

    from backends.engine.builder import build_engine
    from backends.engine.tp.engine import build_tp_engine

    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}, GPUs: {torch.cuda.device_count()}")
    if dev == "cuda" and not torch.cuda.is_available():
        report("cuda", False, "no CUDA device")
        return 1
    if dev == "cuda":
        print(f"device 0: {torch.cuda.get_device_name(0)}")
    if dev == "cpu":
        print("dry run on the CPU: the checks below run on 'cpu' where their names say CUDA / NCCL (gloo)")
    if args.tiny:
        model, quantization = write_tiny_model(Path(tempfile.mkdtemp(prefix="taxiway-tiny-"))), "int4"
    else:
        model, quantization = find_model(args.model)
    print(f"model: {model} (quantization: {quantization or 'as stored'})", flush=True)

    cpu = build_engine(options(model, quantization, dtype="float32", threads=4))
    cuda32 = build_engine(options(model, quantization, dtype="float32", device=dev))
    compare("1. tp=1 CUDA vs CPU, float32", cuda32, cpu, PROMPTS, args.tokens, atol=2e-3)

    check_int4_kernel(dev)
    cuda16 = build_engine(options(model, quantization, dtype="bfloat16", device=dev))
    diff = max(
        ((prefill_logits(cuda16, p) - prefill_logits(cpu, p)).norm() / prefill_logits(cpu, p).norm()).item()
        for p in PROMPTS
    )
    report("2. bfloat16 CUDA engine (int4 kernel) vs float32 CPU", diff < 5e-2, f"relative logit error {diff:.2e}")
    pairs = zip(greedy(cuda16, PROMPTS, args.tokens), greedy(cpu, PROMPTS, args.tokens), strict=True)
    same = sum(x == y for x, y in pairs)
    report("2. bfloat16 CUDA greedy tokens vs float32 CPU", None, f"{same}/{len(PROMPTS)} identical (bf16 may differ)")
    del cuda16

    one = build_tp_engine(options(model, quantization, dtype="float32", device=dev, tensor_parallel=1))
    try:
        compare("3. TP path on one GPU (NCCL world of 1) vs tp=1 CUDA", one, cuda32, PROMPTS, args.tokens, atol=1e-4)
        print(f"   weight bytes on cuda:0 through the TP path: {one.rank_weight_bytes}")
    finally:
        one.close()

    if dev == "cpu" or torch.cuda.device_count() >= 2:
        two = build_tp_engine(options(model, quantization, dtype="float32", device=dev, tensor_parallel=2))
        try:
            compare("4. tp=2 NCCL vs tp=1 CUDA, float32", two, cuda32, PROMPTS, args.tokens, atol=1e-3)
            print(f"   weight bytes per rank: {two.rank_weight_bytes}")
        finally:
            two.close()
    else:
        report("4. tp=2 over NCCL", None, "needs 2 GPUs (NCCL cannot put two ranks on one device)")

    failed = [r for r in RESULTS if r[1] == "FAIL"]
    print(f"\n{len(RESULTS) - len(failed)} of {len(RESULTS)} checks passed or skipped; {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
