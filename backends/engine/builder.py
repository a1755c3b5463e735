"""Engine options and ``build_engine``: from a model name or path to a ready ``LLMEngine``.

Used alike by the ``engine`` backend, ``taxiway generate`` and the benchmarks.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import msgspec
import structlog

from backends.engine.lora.options import LoRAOptions
from gateway.errors import ConfigError

if TYPE_CHECKING:
    from backends.engine.native.ckernels import Kernels

log = structlog.get_logger(__name__)

Positive = Annotated[int, msgspec.Meta(ge=1)]

DEFAULT_KV_CACHE_TOKENS = 16384
#: a prefill chunk delays every running stream by its cost: on 2 cores 256 tokens of SmolLM2 take
#: ~0.18 s (512: ~0.35 s) at the same serving throughput (docs/benchmarks.md)
DEFAULT_MAX_NUM_BATCHED_TOKENS = 256


class EngineOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The ``options`` table of a model served by the ``engine`` backend."""

    model: str = "smollm2-135m-instruct"  # catalogue name, .gguf path or HF directory
    quantization: Literal["int4", "int8", "none"] | None = None  # None: as stored in the file
    dtype: Literal["bfloat16", "float32"] = "bfloat16"  # activations and KV cache
    max_num_seqs: Positive = 16
    max_num_batched_tokens: Positive | None = None  # default: see ``num_batched_tokens``
    max_model_len: Positive | None = None  # default: the model's context length
    kv_cache_tokens: Positive | None = None  # default: DEFAULT_KV_CACHE_TOKENS
    kv_cache_memory_mb: Annotated[float, msgspec.Meta(gt=0)] | None = None
    block_size: Positive = 16
    threads: Positive | None = None  # torch intra-op threads (per rank)
    device: str = "cpu"
    max_waiting: Positive = 256
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    tensor_parallel: Positive = 1
    seed: int | None = None
    home: str | None = None  # model cache; default $TAXIWAY_HOME or ~/.cache/taxiway
    native_kernels: bool = True  # the native CPU kernels (native/); false: torch's ops throughout
    # which instruction set they are built for: "native" this CPU's (AVX-512 BF16 where it has it,
    # else AVX2 + FMA), "avx2" AVX2 + FMA only (x86-64-v3: what a CPU without AVX-512 runs)
    native_target: Literal["native", "avx2"] = "native"
    lora: LoRAOptions | None = None  # LoRA adapters served on this model (lora/options.py)
    # where a load runs: "auto" in a child process when another engine serves in this process
    # (a reload, an on-demand load: backends/engine/child_load.py), else on a thread of it
    load_process: Literal["auto", "always", "never"] = "auto"
    # the CPU priority of a child-process load (child_load.py) and of its thread here: 0 shares the
    # CPU evenly with serving, 19 takes only what serving leaves (under full load almost nothing).
    # `taxiway bench swap` (C=16, 2 cores), B ready after the signal / p99 during the swap vs steady:
    # nice 5 23-28 s / 1.62-2.12x, 7 40 s / 1.56x, 10 94 s / 1.48x; docs/benchmarks.md
    load_niceness: Annotated[int, msgspec.Meta(ge=0, le=19)] = 7
    cuda_graphs: bool = True  # on CUDA: decode steps replayed from CUDA graphs (cuda/graphs.py)
    # on CUDA: the kernel of int4 weights, torch's _weight_int4pack_mm or ours (cuda/kernels.py,
    # int4_matmul; a copy of each int4 weight packed for it): `taxiway bench gpu` measures both
    cuda_int4_kernel: Literal["torch", "triton"] = "torch"
    # on CUDA with no KV size set: the share of the GPU's memory the process may hold in all
    gpu_memory_utilization: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.9

    def __post_init__(self) -> None:
        if self.kv_cache_tokens is not None and self.kv_cache_memory_mb is not None:
            raise ValueError("set kv_cache_tokens or kv_cache_memory_mb, not both")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be at least max_num_seqs")
        if self.lora is not None and self.device.startswith("cuda"):
            # the GPU path's forward and graphs carry no adapter terms: they would be skipped
            raise ValueError('lora: adapters run on the CPU only for now (device = "cuda" has no adapter path)')

    def num_batched_tokens(self, max_model_len: int) -> int:
        """The step budget: as set, else ``DEFAULT_MAX_NUM_BATCHED_TOKENS`` (at least
        ``max_num_seqs``, and the whole context when prompts are not chunked)."""
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        floor = max(self.max_num_seqs, 1 if self.enable_chunked_prefill else max_model_len)
        return max(DEFAULT_MAX_NUM_BATCHED_TOKENS, floor)


class KVCacheLayout(msgspec.Struct, frozen=True):
    num_blocks: int
    block_size: int
    bytes_per_token: int
    max_model_len: int

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def mib(self) -> float:
        return self.num_tokens * self.bytes_per_token / 2**20

    @property
    def full_context_seqs(self) -> float:
        return self.num_tokens / self.max_model_len


def kv_cache_layout(  # type: ignore[no-untyped-def]
    config, options: EngineOptions, dtype_bytes: int, tp: int = 1, free_bytes: int | None = None
) -> KVCacheLayout:
    """Size the paged KV cache from a token count or a memory budget (per rank under TP);
    ``free_bytes``: what a GPU leaves for it (``gpu_kv_bytes``), used when neither is set."""
    kv_heads = max(1, config.num_kv_heads // tp) if config.num_kv_heads >= tp else 1
    per_token = config.num_layers * 2 * kv_heads * config.head_dim * dtype_bytes
    if options.kv_cache_memory_mb is not None:
        tokens = int(options.kv_cache_memory_mb * 2**20 // per_token)
    elif options.kv_cache_tokens is None and free_bytes is not None:
        tokens = free_bytes // per_token
    else:
        tokens = options.kv_cache_tokens or DEFAULT_KV_CACHE_TOKENS
    num_blocks = tokens // options.block_size
    if num_blocks < 1:
        raise ConfigError("the KV cache holds less than one block", path="options.kv_cache_tokens")
    max_len = min(options.max_model_len or config.max_position_embeddings, config.max_position_embeddings)
    return KVCacheLayout(num_blocks, options.block_size, per_token, max_len)


def graph_reserve_bytes(config, max_batch: int) -> int:  # type: ignore[no-untyped-def]
    """What the decode graphs' shared pool holds at most, counted before the KV cache is sized:
    per row float32 logits four times over (logits, refined copy, top-k, sampling) and the
    layer activations, plus 256 MiB of cuBLAS workspaces and allocator slack. The captured pool
    is measured and logged (``engine.cuda_graphs``)."""
    per_row = 16 * config.vocab_size + 4 * (
        2 * config.intermediate_size + config.q_size + 2 * config.kv_size + 8 * config.hidden_size
    )
    return max_batch * per_row + 256 * 2**20


def gpu_kv_bytes(options: EngineOptions, config) -> int:  # type: ignore[no-untyped-def]
    """Bytes the KV cache may take on ``options.device``: ``gpu_memory_utilization`` of the GPU,
    less what is in use now (the weights, other processes) and the graphs' reserve."""
    import torch

    free, total = torch.cuda.mem_get_info(torch.device(options.device))
    reserve = graph_reserve_bytes(config, options.max_num_seqs) if options.cuda_graphs else 256 * 2**20
    allowed = int(total * options.gpu_memory_utilization) - (total - free) - reserve
    if allowed <= 0:
        raise ConfigError(
            f"the GPU has no memory left for a KV cache under gpu_memory_utilization={options.gpu_memory_utilization}",
            path="options.gpu_memory_utilization",
        )
    return allowed


def process_environ() -> Mapping[str, str]:
    """The engine's one reading of the process environment (``TAXIWAY_HOME``, ``CC``,
    ``TAXIWAY_NATIVE_KERNELS``): its part of config loading, done beside the options; everything
    below (catalogue, kernel build) takes the values as parameters."""
    return os.environ


def model_home(options: EngineOptions, environ: Mapping[str, str] | None = None) -> Path:
    """Where models and built kernels are cached: ``options.home``, else ``$TAXIWAY_HOME``, else
    ``~/.cache/taxiway``."""
    from backends.engine.catalogue import default_home

    if options.home:
        return Path(options.home).expanduser()
    return default_home(process_environ() if environ is None else environ)


def resolve_model_path(options: EngineOptions, progress: bool = False) -> Path:
    from backends.engine.catalogue import resolve_model

    return resolve_model(options.model, model_home(options), progress=progress)


def make_scheduler(options: EngineOptions, layout: KVCacheLayout, eos_token_ids: frozenset[int]):  # type: ignore[no-untyped-def]
    """A fresh scheduler and block manager for ``layout`` (also after a tensor-parallel restart)."""
    from backends.engine.sched.block_manager import BlockManager
    from backends.engine.sched.scheduler import Scheduler

    return Scheduler(
        BlockManager(layout.num_blocks, layout.block_size, enable_prefix_caching=options.enable_prefix_caching),
        max_num_seqs=options.max_num_seqs,
        max_num_batched_tokens=options.num_batched_tokens(layout.max_model_len),
        max_model_len=layout.max_model_len,
        enable_chunked_prefill=options.enable_chunked_prefill,
        max_waiting=options.max_waiting,
        max_loras=options.lora.max_loras if options.lora is not None else None,
        eos_token_ids=eos_token_ids,
    )


def load_kernels(options: EngineOptions, environ: Mapping[str, str] | None = None) -> Kernels | None:
    """The native kernels for an engine with ``options`` (``ckernels.Kernels``), or None for
    torch's ops: built with ``$CC`` (default ``cc``) into ``<home>/kernels/``, off with
    ``native_kernels = false`` or ``TAXIWAY_NATIVE_KERNELS=0``, for the instruction set of
    ``native_target`` unless ``TAXIWAY_NATIVE_TARGET`` names one (``native`` or ``avx2``: to run
    the AVX2 variant everywhere, tests included). The environment is read here, with the options,
    and passed to the build as parameters (``environ``: default the process's)."""
    from backends.engine.native import ckernels

    env = process_environ() if environ is None else environ
    target = env.get("TAXIWAY_NATIVE_TARGET") or options.native_target
    if target not in ("native", "avx2"):
        raise ConfigError(f"must be native or avx2, not {target!r}", path="TAXIWAY_NATIVE_TARGET")
    build = ckernels.KernelBuild(
        cache_dir=model_home(options, env) / "kernels",
        compiler=tuple(shlex.split(env.get("CC", "cc"))),
        target=target,  # type: ignore[arg-type]
        enabled=options.native_kernels and env.get("TAXIWAY_NATIVE_KERNELS", "1") != "0",
    )
    return ckernels.load(build)


def build_engine(options: EngineOptions, *, progress: bool = False, in_child: bool = False):  # type: ignore[no-untyped-def]
    """Load the model and tokenizer, size the KV cache, wire scheduler and runner. ``in_child``:
    load the weights and tokenizer in a child process (CPU only; ``child_load``), the child and
    this thread's part of the build (the tensors received, the cache, the warm-up) at
    ``options.load_niceness``."""
    if in_child:
        from backends.engine.child_load import thread_niceness

        with thread_niceness(options.load_niceness):
            return _build_engine(options, progress=progress, in_child=True)
    return _build_engine(options, progress=progress, in_child=False)


def _build_engine(options: EngineOptions, *, progress: bool, in_child: bool):  # type: ignore[no-untyped-def]
    import torch

    from backends.engine.engine import LLMEngine
    from backends.engine.model.loader import load_model
    from backends.engine.native.fuse import fuse
    from backends.engine.runner.model_runner import ModelRunner
    from backends.engine.text.tokenizer import Tokenizer

    path = resolve_model_path(options, progress=progress)
    dtype = torch.bfloat16 if options.dtype == "bfloat16" else torch.float32
    kernels = load_kernels(options) if torch.device(options.device).type == "cpu" else None
    loaded = tokenizer = None
    if in_child and torch.device(options.device).type == "cpu":
        from backends.engine.child_load import ChildStartError, load_in_child

        try:
            loaded, tokenizer = load_in_child(path, options, kernels)
        except ChildStartError as exc:  # the load still happens, on this process's thread
            log.warning("engine.child_load_unavailable", model=str(path.name), reason=str(exc))
        if options.threads:  # as load_model does in the process that runs the model
            torch.set_num_threads(options.threads)
    if loaded is None:
        loaded = load_model(
            path, quantization=options.quantization, dtype=dtype, device=options.device, threads=options.threads,
            kernels=kernels,
        )  # fmt: skip
    config = loaded.config
    on_gpu = torch.device(options.device).type == "cuda"
    free = gpu_kv_bytes(options, config) if on_gpu else None
    layout = kv_cache_layout(config, options, torch.finfo(dtype).bits // 8, free_bytes=free)
    if on_gpu:  # the GPU path: fused Triton kernels, decode from CUDA graphs
        from backends.engine import cuda

        model = cuda.prepare(loaded.model, max_positions=layout.max_model_len, int4_kernel=options.cuda_int4_kernel)
    else:
        model = fuse(loaded.model, kernels)  # the native fast path, where it applies
    tokenizer = tokenizer or Tokenizer.load(path)
    scheduler = make_scheduler(options, layout, tokenizer.eos_token_ids)
    runner_class = ModelRunner
    if options.lora is not None:  # the adapters' terms on the projections; each step's rows know theirs
        from backends.engine.lora.runner import lora_runner

        runner_class = lora_runner(model, config, options.lora)
    runner = runner_class(
        model,
        config,
        num_blocks=layout.num_blocks,
        block_size=layout.block_size,
        dtype=dtype,
        device=options.device,
        seed=options.seed,
        decode_graphs=options.max_num_seqs if on_gpu and options.cuda_graphs else 0,
        max_model_len=layout.max_model_len,
    )
    log.info(
        "engine.kv_cache",
        model=str(path.name),
        blocks=layout.num_blocks,
        block_size=layout.block_size,
        tokens=layout.num_tokens,
        mib=round(layout.mib, 1),
        full_context_seqs=round(layout.full_context_seqs, 2),
        max_model_len=layout.max_model_len,
    )
    return LLMEngine(scheduler, runner, tokenizer)
