"""`taxiway bench engine`: one sequence on the engine vs HF transformers (or llama.cpp) on the same GGUF.

Each measurement runs in a fresh subprocess (so resident memory is that engine's alone), and the
two engines alternate for ``--rounds`` rounds; medians are reported with the ratios. Figures:
prefill tokens/s on a ``--prompt-tokens`` prompt (time to the first sampled token), decode tokens/s
over ``--decode-tokens`` (greedy, EOS ignored), resident memory after load and peak while
loading. HF transformers dequantises the GGUF to float32 (its only way to run one) and runs
``generate()`` (greedy): prefill is ``generate`` of one token, decode the extra time of
``generate`` of ``1 + N`` tokens over ``N``.

``--compare-quant Q4_K_M`` measures the engine alone on the file and on the same model written as
llama.cpp's ``Q4_K_M`` mix (``bench/quant_mix.py``, made once beside the catalogue's models),
alternating, and prints the mix's decode and prefill over the file's, measured in one run.

``--llama-bench PATH`` adds llama.cpp (its ``llama-bench`` tool, built from llama.cpp's sources:
a yardstick, not a dependency) to the alternation: prefill is ``llama-bench -p N -n 0``, decode
``-p 0 -n M -d N`` (M tokens after N in the cache, as the engine's decode follows its prompt).
``--native-target avx2`` runs the engine on the AVX2 build of its native kernels (the engine
option ``native_target``): with a llama.cpp built for AVX2 only (``-DGGML_AVX512=OFF``) it compares
what a CPU without AVX-512 gets from each, on a machine that has it.
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import time
from argparse import SUPPRESS, ArgumentParser, Namespace

import msgspec

from bench.report import add_json_flag, human, write_json


class Measurement(msgspec.Struct):
    engine: str
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    rss_after_load_mb: float
    peak_rss_mb: float
    load_s: float


def _prompt_ids(tokenizer_encode, n: int) -> list[int]:  # type: ignore[no-untyped-def]
    from bench.loadgen import RequestSpec, prompt_text

    ids = tokenizer_encode(prompt_text(RequestSpec(n + 64, 1), 0))
    return ids[:n]


def _rss_mb() -> tuple[float, float]:
    import resource

    import psutil

    return psutil.Process().memory_info().rss / 2**20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_ours(
    path: str, threads: int, prompt_tokens: int, decode_tokens: int, dtype: str, native_target: str = "native"
) -> Measurement:
    from backends.engine.builder import EngineOptions, build_engine
    from gateway.interface import SamplingParams

    start = time.perf_counter()
    options = EngineOptions(
        model=path, threads=threads, dtype=dtype, max_num_seqs=1, max_num_batched_tokens=max(512, prompt_tokens),
        kv_cache_tokens=prompt_tokens + decode_tokens + 64, enable_prefix_caching=False,
        native_target=native_target,  # type: ignore[arg-type]
    )  # fmt: skip
    engine = build_engine(options)
    load_s = time.perf_counter() - start
    rss, peak = _rss_mb()
    ids = _prompt_ids(lambda t: engine.tokenizer.encode(t, add_special_tokens=False), prompt_tokens)

    def one(request_id: str, max_tokens: int) -> tuple[float, float]:
        engine.add_request(request_id, ids, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        t0 = time.perf_counter()
        engine.step()  # the whole prompt in one chunk, plus the first token
        t1 = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        return t1 - t0, time.perf_counter() - t1

    one("warm-up", 4)
    prefill_s, decode_s = one("measured", decode_tokens + 1)
    return Measurement("taxiway", prompt_tokens / prefill_s, decode_tokens / decode_s, rss, peak, load_s)


def measure_hf(path: str, threads: int, prompt_tokens: int, decode_tokens: int) -> Measurement:
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    gguf = Path(path)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - start
    rss, peak = _rss_mb()
    ids = torch.tensor([_prompt_ids(lambda t: tokenizer.encode(t, add_special_tokens=False), prompt_tokens)])

    mask = torch.ones_like(ids)

    @torch.inference_mode()
    def generate(new_tokens: int) -> float:
        t0 = time.perf_counter()
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )
        assert out.shape[1] == ids.shape[1] + new_tokens
        return time.perf_counter() - t0

    def one(steps: int) -> tuple[float, float]:
        """generate() itself, as users call it: the prompt plus one token, then plus ``steps``."""
        prefill_s = generate(1)
        return prefill_s, generate(1 + steps) - prefill_s

    one(2)
    prefill_s, decode_s = one(decode_tokens)
    return Measurement("hf-transformers", prompt_tokens / prefill_s, decode_tokens / decode_s, rss, peak, load_s)


def measure_llama_bench(binary: str, path: str, threads: int, prompt_tokens: int, decode_tokens: int) -> Measurement:
    """llama.cpp's own benchmark tool on the same file: prefill of ``prompt_tokens``, then decode
    of ``decode_tokens`` after as many in the cache; one repetition each (rounds alternate)."""

    def tokens_per_s(*test: str) -> float:
        command = [binary, "-m", path, "-t", str(threads), "-r", "1", "-o", "json", *test]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        return float(msgspec.json.decode(done.stdout)[0]["avg_ts"])

    prefill = tokens_per_s("-p", str(prompt_tokens), "-n", "0")
    decode = tokens_per_s("-p", "0", "-n", str(decode_tokens), "-d", str(prompt_tokens))
    return Measurement("llama.cpp", prefill, decode, math.nan, math.nan, math.nan)


def configure(parser: ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct", help="catalogue name or .gguf path")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--no-hf", action="store_true", help="leave HF transformers out")
    parser.add_argument("--native-target", choices=["native", "avx2"], default="native",
                        help="the engine's native kernels built for this CPU, or for AVX2 + FMA only")
    parser.add_argument("--llama-bench", metavar="PATH", help="also measure llama.cpp: its llama-bench binary")
    parser.add_argument(
        "--compare-quant", choices=["Q4_K_M"], default=None,
        help="the engine on the file vs on the same model as this GGUF mix (written once), instead of HF",
    )  # fmt: skip
    add_json_flag(parser, dest="out")
    parser.add_argument("--worker", choices=["taxiway", "hf-transformers"], help=SUPPRESS)


def _run_worker(kind: str, args: Namespace, path: str) -> Measurement:
    command = [sys.executable, "-m", "gateway", "bench", "engine", "--worker", kind, "--model", path,
               "--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens),
               "--decode-tokens", str(args.decode_tokens), "--dtype", args.dtype,
               "--native-target", args.native_target]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{done.stderr[-3000:]}")
    return msgspec.json.decode(done.stdout.strip().splitlines()[-1], type=Measurement)


def run(args: Namespace) -> int:
    """One stream's prefill and decode tokens/s and memory: the engine vs HF transformers."""
    from backends.engine.catalogue import default_home, resolve_model

    path = str(resolve_model(args.model, default_home(os.environ), progress=True))
    if args.worker == "taxiway":
        m = measure_ours(path, args.threads, args.prompt_tokens, args.decode_tokens, args.dtype, args.native_target)
        print(msgspec.json.encode(m).decode())
        return 0
    if args.worker == "hf-transformers":
        m = measure_hf(path, args.threads, args.prompt_tokens, args.decode_tokens)
        print(msgspec.json.encode(m).decode())
        return 0

    if args.compare_quant:
        return _compare_quant(args, path)
    kinds = ["taxiway", *([] if args.no_hf else ["hf-transformers"]), *(["llama.cpp"] if args.llama_bench else [])]
    results: dict[str, list[Measurement]] = {k: [] for k in kinds}
    for round_ in range(args.rounds):
        for kind in kinds if round_ % 2 == 0 else kinds[::-1]:
            if kind == "llama.cpp":
                m = measure_llama_bench(args.llama_bench, path, args.threads, args.prompt_tokens, args.decode_tokens)
            else:
                m = _run_worker(kind, args, path)
            results[kind].append(m)
            print(f"round {round_ + 1} {kind:>16}: prefill {m.prefill_tokens_per_s:7.1f} tok/s  "
                  f"decode {m.decode_tokens_per_s:6.1f} tok/s  rss {m.rss_after_load_mb:6.0f} MB  "
                  f"peak {m.peak_rss_mb:6.0f} MB", file=sys.stderr)  # fmt: skip

    def med(kind: str, field: str) -> float:
        return statistics.median(getattr(m, field) for m in results[kind])

    out = human(args.out)
    def mb(kind: str, field: str) -> str:
        value = med(kind, field)
        return "—" if math.isnan(value) else f"{value:.0f}"

    print(f"{args.prompt_tokens}-token prompt, {args.decode_tokens} decode tokens, {args.threads} threads, "
          f"{args.dtype} activations, native kernels built for {args.native_target}, medians of {args.rounds}\n",
          file=out)  # fmt: skip
    print("| engine | prefill tok/s | decode tok/s | RSS after load (MB) | peak RSS (MB) |\n|---|---|---|---|---|", file=out)
    for kind in kinds:
        print(f"| {kind} | {med(kind, 'prefill_tokens_per_s'):.1f} | {med(kind, 'decode_tokens_per_s'):.1f} "
              f"| {mb(kind, 'rss_after_load_mb')} | {mb(kind, 'peak_rss_mb')} |", file=out)  # fmt: skip
    for other, name in (("hf-transformers", "HF"), ("llama.cpp", "llama.cpp")):
        if other in kinds:
            for field, label in (("prefill_tokens_per_s", "prefill"), ("decode_tokens_per_s", "decode")):
                print(f"{label}: taxiway / {name} = {med('taxiway', field) / med(other, field):.2f}x", file=out)
    write_json(args.out, results)
    print(f"({time.strftime('%Y-%m-%d %H:%M')})", file=out)
    return 0


def _compare_quant(args: Namespace, path: str) -> int:
    """The engine on ``path`` and on its ``args.compare_quant`` mix, alternating per round."""
    from pathlib import Path

    from backends.engine.catalogue import default_home
    from bench.quant_mix import write_q4_k_m

    src = Path(path)
    mix = default_home(os.environ) / "bench" / f"{src.stem}.{args.compare_quant}.gguf"
    if not mix.exists() or mix.stat().st_mtime < src.stat().st_mtime:
        mix.parent.mkdir(parents=True, exist_ok=True)
        tmp = mix.with_suffix(".tmp")
        counts = write_q4_k_m(src, tmp)
        tmp.replace(mix)
        print(f"wrote {mix}: {counts}", file=sys.stderr)
    files = {src.name: str(src), args.compare_quant: str(mix)}
    results: dict[str, list[Measurement]] = {k: [] for k in files}
    for round_ in range(args.rounds):
        for label in list(files) if round_ % 2 == 0 else list(files)[::-1]:
            m = _run_worker("taxiway", args, files[label])
            results[label].append(m)
            print(f"round {round_ + 1} {label:>32}: prefill {m.prefill_tokens_per_s:7.1f} tok/s  "
                  f"decode {m.decode_tokens_per_s:6.1f} tok/s  rss {m.rss_after_load_mb:6.0f} MB", file=sys.stderr)  # fmt: skip

    def med(label: str, field: str) -> float:
        return statistics.median(getattr(m, field) for m in results[label])

    out = human(args.out)
    print(f"{args.prompt_tokens}-token prompt, {args.decode_tokens} decode tokens, {args.threads} threads, "
          f"{args.dtype} activations, medians of {args.rounds}\n", file=out)  # fmt: skip
    print("| file | prefill tok/s | decode tok/s | RSS after load (MB) |\n|---|---|---|---|", file=out)
    for label in files:
        print(f"| {label} | {med(label, 'prefill_tokens_per_s'):.1f} | {med(label, 'decode_tokens_per_s'):.1f} "
              f"| {med(label, 'rss_after_load_mb'):.0f} |", file=out)  # fmt: skip
    base, other = list(files)
    for field, name in (("prefill_tokens_per_s", "prefill"), ("decode_tokens_per_s", "decode")):
        print(f"{name}: {other} / {base} = {med(other, field) / med(base, field):.2f}x", file=out)
    write_json(args.out, results)
    print(f"({time.strftime('%Y-%m-%d %H:%M')})", file=out)
    return 0
