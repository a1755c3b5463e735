"""``taxiway plan``: will this model, at this quantization, context and concurrency, fit — and how
fast will it decode? Answered before anything is downloaded beyond the model's header.

Memory per device is ``memory.estimate_memory`` (the estimate the fleet's memory budget uses)
for the options the flags describe, split over tensor-parallel ranks, plus the process's runtime
(Python, torch, the gateway and the native kernels' library, measured once here: ``RUNTIME_BYTES``)
and LoRA slots. Decode speed is the memory-bandwidth model: a decode step reads every weight once
and each sequence's KV cache, so ``tokens/s = sequences / (bytes read per step / bandwidth)``,
with the bandwidth measured on this machine (a read of 512 MiB on the engine's threads) or, for a
GPU, stated (``GPU_BANDWIDTH``) or given (``--bandwidth-gbs``).

On a CPU without ``--bandwidth-gbs`` the weights' part is timed instead: the engine's own linear
modules (native kernels where they load) on random weights of the model's shapes and storage,
one token through each, the best pass of ~2 s of them. A small model's int4 matmuls do not run at memory speed
(docs/benchmarks.md: ~14-19 GB/s of weights on this machine against ~37 GB/s read by a sum), so
the bare bandwidth model said 327 tokens/s where ``taxiway bench engine`` measured 126.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import msgspec

#: What a serving process holds before its first model: the interpreter, torch, the gateway,
#: uvicorn and the native kernels' library. Measured on this machine (2026-12-04): RSS after
#: importing those and loading the kernels, 242 MiB (torch alone: 219 MiB).
RUNTIME_BYTES = 242 * 2**20
#: Read bandwidth stated for GPUs (vendor datasheets) when none is given.
GPU_BANDWIDTH = {"h200": 4.8e12, "h100": 3.35e12, "a100": 2.0e12, "l4": 3.0e11}
#: the decode estimate times the first linear modules up to this many bytes (far past the caches),
#: and scales the rest by their bytes: a large model is not built whole to be sized
MAX_TIMED_BYTES = 256 * 2**20
QUANT_FLAGS = {"int4": "int4", "int8": "int8", "bf16": "none", "stored": None}


class DevicePlan(msgspec.Struct, frozen=True):
    weights: int
    kv_cache: int
    activations: int
    runtime: int
    lora: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.runtime + self.lora


class Plan(msgspec.Struct, frozen=True):
    model: str
    quantization: str
    device: str
    tensor_parallel: int
    context: int
    concurrency: int
    per_device: DevicePlan
    total_bytes: int
    fits: bool | None  # None: no --memory-gb given
    memory_bytes: int | None
    bandwidth_bytes_per_s: float
    bandwidth_source: str
    bytes_per_step: int
    decode_tokens_per_s: float  # all sequences together, each at the full context
    decode_tokens_per_s_per_seq: float
    #: "bandwidth": weights and cache at the bandwidth; "timed": the weights' linears timed here
    decode_model: str = "bandwidth"
    linears_s: float | None = None  # with "timed": one step's linear modules, one sequence


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct", help="catalogue name, .gguf file or HF directory")
    parser.add_argument("--quant", choices=sorted(QUANT_FLAGS), default="stored", help="weights as stored, or requantized")
    parser.add_argument("--context", type=int, default=None, help="tokens per sequence (default: the serving default cache)")
    parser.add_argument("--concurrency", type=int, default=16, help="sequences decoding at once (max_num_seqs)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (one device each)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--gpu", default="h200", help=f"GPU kind for the stated bandwidth ({', '.join(GPU_BANDWIDTH)})")
    parser.add_argument("--bandwidth-gbs", type=float, default=None, help="memory bandwidth per device, GB/s")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads the bandwidth is measured on")
    parser.add_argument("--lora", type=int, default=0, help="LoRA adapters resident on the device")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--memory-gb", type=float, default=None, help="memory per device: say whether it fits")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")


def run(args: argparse.Namespace) -> int:
    """Size a deployment: memory per device and estimated decode speed."""
    import sys

    from backends.engine.builder import EngineOptions, resolve_model_path
    from gateway.logs import configure_logging

    configure_logging("warning", stream=sys.stderr)  # stdout is the plan's (--json: JSON alone)
    kv_tokens = None if args.context is None else args.context * args.concurrency
    options = EngineOptions(
        model=args.model, quantization=QUANT_FLAGS[args.quant], max_num_seqs=args.concurrency,
        max_model_len=args.context, kv_cache_tokens=kv_tokens, tensor_parallel=args.tp, device=args.device,
        threads=args.threads,
    )  # fmt: skip
    plan = make_plan(options, resolve_model_path(options), args)
    print(json.dumps(msgspec.to_builtins(plan) | {"total_gb": round(plan.total_bytes / 1e9, 3)}) if args.json else render(plan))
    return 0 if plan.fits is not False else 1


def make_plan(options: Any, path: Any, args: argparse.Namespace) -> Plan:
    from backends.engine.memory import estimate_memory

    est = estimate_memory(path, options)
    config = est_config(path)
    tp = options.tensor_parallel
    # without --context: the cache the serving defaults allocate, shared by the sequences
    context = options.max_model_len or min(config.max_position_embeddings, est.kv_cache // _kv_per_token(config) // options.max_num_seqs)
    lora = args.lora * lora_bytes(config, args.lora_rank) // tp
    dev = DevicePlan(
        weights=est.weights // tp, kv_cache=est.kv_cache // tp, activations=est.overhead, runtime=RUNTIME_BYTES, lora=lora
    )
    bandwidth, source = bandwidth_for(args)
    kv_per_step = options.max_num_seqs * context * _kv_per_token(config) // tp
    per_step = est.weights // tp + kv_per_step
    linears_s = None
    if args.device == "cpu" and not args.bandwidth_gbs and tp == 1:
        # the weights through the engine's kernels, timed; the cache read at the bandwidth
        linears_s = time_linears(path, options)
        step_s = linears_s + kv_per_step / bandwidth
    else:
        step_s = per_step / bandwidth
    memory = None if args.memory_gb is None else int(args.memory_gb * 1e9)
    return Plan(
        model=str(path.name), quantization=args.quant, device=options.device, tensor_parallel=tp, context=context,
        concurrency=options.max_num_seqs, per_device=dev, total_bytes=dev.total * tp,
        fits=None if memory is None else dev.total <= memory, memory_bytes=memory, bandwidth_bytes_per_s=bandwidth,
        bandwidth_source=source, bytes_per_step=per_step, decode_tokens_per_s=options.max_num_seqs / step_s,
        decode_tokens_per_s_per_seq=1 / step_s, decode_model="bandwidth" if linears_s is None else "timed",
        linears_s=linears_s,
    )  # fmt: skip


def est_config(path: Any):  # type: ignore[no-untyped-def]
    from backends.engine.memory import read_config

    return read_config(path)


def _kv_per_token(config: Any) -> int:
    return config.num_layers * 2 * config.num_kv_heads * config.head_dim * 2  # bfloat16 cache


def lora_bytes(config: Any, rank: int) -> int:
    """One adapter on every projection (q, k, v, o, gate, up, down), A and B in bfloat16."""
    d, i = config.hidden_size, config.intermediate_size
    pairs = [(d, config.q_size), (d, config.kv_size), (d, config.kv_size), (config.q_size, d), (d, i), (d, i), (i, d)]
    return config.num_layers * sum(rank * (a + b) for a, b in pairs) * 2


def bandwidth_for(args: argparse.Namespace) -> tuple[float, str]:
    if args.bandwidth_gbs:
        return args.bandwidth_gbs * 1e9, "given"
    if args.device == "cuda":
        return GPU_BANDWIDTH[args.gpu.lower()], f"stated ({args.gpu})"
    return measure_read_bandwidth(args.threads), "measured here"


def measure_read_bandwidth(threads: int | None = None, mib: int = 512) -> float:
    """Bytes/s this machine reads on ``threads`` torch threads: the best of five sums of ``mib``."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    x = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def time_linears(path: Any, options: Any, max_bytes: int = MAX_TIMED_BYTES) -> float:
    """Seconds one decode step of one sequence spends in the model's linear modules on this
    machine: ``memory.decode_linears`` built by the engine's ``make_linear`` (its native kernels
    where they load, ``options.threads`` threads) on random weights, one token through each in
    order, the best of the passes over ~2 s after one to warm up (other processes only slow it).
    Past ``max_bytes`` the rest is scaled by bytes."""
    import torch

    from backends.engine.builder import load_kernels
    from backends.engine.memory import decode_linears, group_size, read_header
    from backends.engine.model.quant import make_linear
    from backends.engine.model.quant.data import quantize_int4, quantize_int8

    if options.threads:
        torch.set_num_threads(options.threads)
    dtype = torch.bfloat16 if options.dtype == "bfloat16" else torch.float32
    config, tensors = read_header(path)
    shapes = decode_linears(tensors, config, options.quantization, torch.finfo(dtype).bits // 8)
    kernels = load_kernels(options)
    generator = torch.Generator().manual_seed(0)
    modules, timed_bytes = [], 0
    for shape in shapes:
        if timed_bytes >= max_bytes:
            break
        w = torch.randn(shape.rows, shape.cols, generator=generator) * 0.02
        if shape.form.startswith("int4"):  # int4, or AWQ / GPTQ's int4g128
            data: Any = quantize_int4(w, group_size(shape.form))
        elif shape.form == "int8":
            data = quantize_int8(w)
        elif shape.form in ("int8g", "int8g16"):
            data = quantize_int8(w, group_size=16 if shape.form == "int8g16" else 32)
        else:
            data = w.to(dtype)
        modules.append((make_linear(data, dtype=dtype, kernels=kernels), torch.randn(1, shape.cols, dtype=dtype)))
        timed_bytes += shape.bytes
    best = float("inf")
    with torch.inference_mode():
        # passes over about 2 s (at least 5, at most 400): the best one is a moment no other
        # process held a core; 20 back-to-back passes (0.1 s) all fell inside one busy spell here
        began = time.perf_counter()
        for i in range(401):
            start = time.perf_counter()
            for module, x in modules:
                module(x)
            if i:  # the first pass warms up
                best = min(best, time.perf_counter() - start)
            if i >= 5 and start - began > 2.0:
                break
    return best * sum(s.bytes for s in shapes) / timed_bytes


def render(plan: Plan) -> str:
    d = plan.per_device
    mb = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    lines = [
        f"{plan.model}: {plan.quantization}, {plan.concurrency} sequences x {plan.context} tokens, "
        f"{plan.device}{f' x {plan.tensor_parallel}' if plan.tensor_parallel > 1 else ''}",
        "",
        "| per device | memory |",
        "|---|---|",
        f"| weights | {mb(d.weights)} |",
        f"| KV cache | {mb(d.kv_cache)} |",
        f"| activations | {mb(d.activations)} |",
        f"| runtime (interpreter, torch, gateway) | {mb(d.runtime)} |",
        f"| LoRA adapters | {mb(d.lora)} |",
        f"| **total** | **{mb(d.total)}** |",
        "",
    ]
    if plan.fits is not None:
        lines.append(f"fits in {plan.memory_bytes / 1e9:g} GB: {'yes' if plan.fits else 'NO'}")
    how = f"bandwidth {plan.bandwidth_bytes_per_s / 1e9:.1f} GB/s, {plan.bandwidth_source}"
    if plan.linears_s is not None:
        how = f"the weights' matmuls timed here, {plan.linears_s * 1e3:.1f} ms a step; the cache at {how}"
    lines.append(
        f"decode ({how}; {plan.bytes_per_step / 2**20:,.0f} MiB read per step): "
        f"~{plan.decode_tokens_per_s:,.0f} tokens/s in all, ~{plan.decode_tokens_per_s_per_seq:,.1f} per sequence"
    )
    return "\n".join(lines)
