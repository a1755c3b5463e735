"""``GpuCausalLM`` and ``DecodeGraphs`` against the plain ``CausalLM`` on the same weights.

The same teacher-forced trace runs through each path: one step prefilling three prompts of
different lengths into scattered cache blocks, then decode steps of fixed tokens. On the CPU the
GPU path's torch definitions run (float32, exact up to summation order), through the graphs'
static inputs and padding (uncaptured); on a CUDA machine (marked ``gpu``) the Triton kernels run
in bfloat16, graphs replayed against the same steps run eagerly (identical), and against the
float32 CPU reference (within the tolerance of ``model/test_cuda.py``).
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))

from backends.engine import cuda  # noqa: E402
from backends.engine.cuda.graphs import DecodeGraphs, bucket_sizes  # noqa: E402
from backends.engine.model.attention import AttentionMetadata, allocate_kv_cache  # noqa: E402
from backends.engine.model.loader import load_model  # noqa: E402
from bench.synthetic import write_random_llama  # noqa: E402

BLOCK = 4
NUM_BLOCKS = 40
TABLES = [[3, 7, 1, 9, 30, 31], [10, 2, 25, 26], [0, 4, 5, 6, 8, 11, 12, 13, 14]]
PROMPTS = [list(range(10, 19)), [40, 41, 42, 43, 44], [(7 * i) % 250 for i in range(20)]]
DECODE_STEPS = 8
FORCED = [[(31 * s + 17 * i) % 256 for i in range(3)] for s in range(DECODE_STEPS)]

Decode = Callable[[list[int], list[int], list[int], list[int], list[list[int]]], torch.Tensor]


def write_tiny(path: Path) -> Path:
    return write_random_llama(path, hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=256, seed=3)


def eager_decode(model, kv) -> Decode:  # type: ignore[no-untyped-def]
    device = model.device

    def step(ids, positions, seq_lens, slots, tables):  # type: ignore[no-untyped-def]
        attn = AttentionMetadata.from_lists(query_lens=[1] * len(ids), seq_lens=seq_lens, block_tables=tables,
                                            block_size=BLOCK, device=device)  # fmt: skip
        hidden = model(torch.tensor(ids, device=device), torch.tensor(positions, device=device), attn, kv)
        return model.compute_logits(hidden)

    return step


def trace(model, kv, decode: Decode, rows: list[int] = [0, 1, 2]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Float32 CPU logits of the prefill step's last rows, then of each decode step (``rows``: the
    sequences that decode, in the order given)."""
    device = model.device
    lens = [len(p) for p in PROMPTS]
    attn = AttentionMetadata.from_lists(query_lens=lens, seq_lens=lens, block_tables=TABLES, block_size=BLOCK,
                                        device=device)  # fmt: skip
    ids = torch.tensor([t for p in PROMPTS for t in p], device=device)
    pos = torch.tensor([i for p in PROMPTS for i in range(len(p))], device=device)
    ends = torch.tensor(lens, device=device).cumsum(0) - 1
    out = [model.compute_logits(model(ids, pos, attn, kv)[ends]).float().cpu()]
    for forced in FORCED:
        positions = [lens[r] for r in rows]
        seq_lens = [lens[r] + 1 for r in rows]
        slots = [TABLES[r][p // BLOCK] * BLOCK + p % BLOCK for r, p in zip(rows, positions, strict=True)]
        logits = decode([forced[r] for r in rows], positions, seq_lens, slots, [TABLES[r] for r in rows])
        out.append(logits.float().cpu())
        for r in rows:
            lens[r] += 1
    return torch.cat(out)


def graphs_for(model, kv, max_batch: int, capture: bool) -> DecodeGraphs:  # type: ignore[no-untyped-def]
    graphs = DecodeGraphs(model, kv, max_batch=max_batch, max_blocks_per_seq=12, pad_block=NUM_BLOCKS)
    if capture:
        graphs.capture()
    return graphs


def test_bucket_sizes() -> None:
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(16) == [1, 2, 4, 8, 16]
    assert bucket_sizes(24) == [1, 2, 4, 8, 16, 24]


@pytest.mark.parametrize(("quantization", "int4_kernel"),
                         [("none", "torch"), ("int8", "torch"), ("int4", "torch"), ("int4", "triton")])  # fmt: skip
def test_gpu_path_on_cpu_equals_plain_model(quantization: str, int4_kernel: str) -> None:
    """The GPU forward's torch definitions, eager and through the graphs' padded static inputs
    (a bucket of 4 for 3 rows, then 2 rows in a bucket of 2), give the plain model's logits;
    under the int8 and int4 policies per-channel int8 weights (every layer; the vocabulary head)
    take ``int8_matmul``, and with ``int4_kernel="triton"`` int4 weights take ``int4_matmul``."""
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_model(write_tiny(Path(tmp) / "m"), quantization=quantization, dtype=torch.float32)
    plain = loaded.model
    gpu = cuda.prepare(plain, use_triton=False, int4_kernel=int4_kernel)
    assert len(gpu._int4) == (2 * 4 if int4_kernel == "triton" else 0)  # every projection of both layers
    config = loaded.config
    kv = allocate_kv_cache(config, NUM_BLOCKS, BLOCK, torch.float32)
    ref = trace(plain, kv, eager_decode(plain, kv))
    kv = allocate_kv_cache(config, NUM_BLOCKS, BLOCK, torch.float32)
    eager = trace(gpu, kv, eager_decode(gpu, kv))
    torch.testing.assert_close(eager, ref, rtol=1e-4, atol=1e-4)
    for max_batch, rows in ((4, [0, 1, 2]), (2, [2, 0])):
        kv = allocate_kv_cache(config, NUM_BLOCKS + 1, BLOCK, torch.float32)
        graphs = graphs_for(gpu, kv, max_batch, capture=False)
        got = trace(gpu, kv, graphs.run, rows)
        expected = trace(plain, (kv := allocate_kv_cache(config, NUM_BLOCKS, BLOCK, torch.float32)),
                         eager_decode(plain, kv), rows)  # fmt: skip
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and cuda.HAVE_TRITON), reason="needs CUDA and Triton")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("quantization", "int4_kernel"),
                         [("int4", "torch"), ("int4", "triton"), ("int8", "torch"), ("none", "torch")])  # fmt: skip
def test_cuda_graphs_equal_eager_and_track_cpu_float32(quantization: str, int4_kernel: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny(Path(tmp) / "m")
        ref_model = load_model(path, quantization=quantization, dtype=torch.float32).model
        model = load_model(path, quantization=quantization, dtype=torch.bfloat16, device="cuda").model
        gpu = cuda.prepare(model, int4_kernel=int4_kernel)
    config = gpu.config
    kv = allocate_kv_cache(config, NUM_BLOCKS, BLOCK, torch.float32)
    ref = trace(ref_model, kv, eager_decode(ref_model, kv))

    def fresh() -> list:  # type: ignore[type-arg]
        return allocate_kv_cache(config, NUM_BLOCKS + 1, BLOCK, torch.bfloat16, "cuda")

    kv = fresh()
    eager = trace(gpu, kv, graphs_for(gpu, kv, 4, capture=False).run)  # the decode kernels, not replayed
    kv = fresh()
    replayed = trace(gpu, kv, graphs_for(gpu, kv, 4, capture=True).run)
    assert torch.equal(replayed, eager), "graph replay differs from the same steps run eagerly"
    kv = fresh()
    forward = trace(gpu, kv, eager_decode(gpu, kv))  # steps through the eager forward (SDPA attention)
    for name, out in (("graphs", replayed), ("eager forward", forward)):
        rel = ((out - ref).norm() / ref.norm()).item()
        agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
        print(f"{quantization}/{int4_kernel} {name}: CUDA bfloat16 vs CPU float32 relative logit error {rel:.2e}, "
              f"argmax agreement {agree:.3f}")
        assert rel < 3e-2
        assert agree >= 0.85


def check_triton_path_on_cpu() -> None:
    """The GPU forward with the Triton kernels (interpreted, float32 on the CPU) through the
    graphs' static inputs gives the plain model's logits: unquantized, every layer int8, and int4
    through ``int4_matmul``."""
    for quantization, int4_kernel in (("none", "torch"), ("int8", "torch"), ("int4", "triton")):
        with tempfile.TemporaryDirectory() as tmp:
            loaded = load_model(write_tiny(Path(tmp) / "m"), quantization=quantization, dtype=torch.float32)
        plain, config = loaded.model, loaded.config
        gpu = cuda.prepare(plain, use_triton=True, int4_kernel=int4_kernel)
        kv = allocate_kv_cache(config, NUM_BLOCKS + 1, BLOCK, torch.float32)
        got = trace(gpu, kv, graphs_for(gpu, kv, 4, capture=False).run)
        kv = allocate_kv_cache(config, NUM_BLOCKS, BLOCK, torch.float32)
        torch.testing.assert_close(got, trace(plain, kv, eager_decode(plain, kv)), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not cuda.HAVE_TRITON, reason="needs Triton (the GPU image has it; CPU installs do not)")
def test_triton_path_in_interpreter() -> None:
    import os
    import subprocess

    repo = Path(__file__).resolve().parents[4]
    code = (
        "from tests.backends.engine.cuda.test_kernels import patch_interpreter; patch_interpreter();"
        "from tests.backends.engine.cuda.test_gpu_model import check_triton_path_on_cpu; check_triton_path_on_cpu()"
    )
    path = os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])  # keep wheels installed by path
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
