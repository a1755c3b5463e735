"""CUDA: torch's packed int4 kernel (``_weight_int4pack_mm``) behind ``Int4Linear`` and
``Int8GroupLinear``, and a tiny int4 model on the GPU (bfloat16) against the CPU float32 reference.

Self-contained (no transformers, no gguf) so it runs on a bare CUDA machine:
``python tests/engine/test_cuda.py`` or ``pytest -m gpu tests/engine/test_cuda.py``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))

from backends.engine.model.attention import AttentionMetadata, allocate_kv_cache  # noqa: E402
from backends.engine.model.loader import load_model  # noqa: E402
from backends.engine.model.quant import Int4Linear, make_linear, quantize_int4, quantize_int8  # noqa: E402
from bench.synthetic import write_random_llama  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_packed_kernels_on_cuda_match_float32_math() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(384, 576, generator=g) * 0.05
    for data in (quantize_int4(w), quantize_int8(w, group_size=32)):
        cpu = make_linear(data, dtype=torch.float32)
        gpu = make_linear(data, dtype=torch.bfloat16, device="cuda")
        exact = gpu.dequantize(torch.float32).cpu()
        # the device's weights are the CPU reference's with scales and zeros rounded to bfloat16
        ref_w = cpu.dequantize()
        assert ((exact - ref_w).norm() / ref_w.norm()).item() < 5e-3
        for rows in (1, 16, 256):
            x = torch.randn(rows, 576, generator=g).bfloat16()
            ref = F.linear(x.float(), exact)
            out = gpu(x.cuda()).float().cpu()
            rel = ((out - ref).norm() / ref.norm()).item()
            assert rel < 1e-2, (type(gpu).__name__, rows, rel)
        ids = torch.tensor([0, 5, 200, 383])
        torch.testing.assert_close(gpu.embed(ids.cuda(), torch.float32).cpu(), exact[ids], rtol=0, atol=0)
        assert gpu.embed(ids.cuda()).dtype == torch.bfloat16


def write_tiny_llama(path: Path) -> Path:
    return write_random_llama(path, hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=256, seed=1)

def run(loaded, device: str) -> torch.Tensor:
    """A mixed step (prefill 9 + prefill 5) then two decode steps; all logits, float32 on CPU."""
    model, config = loaded.model, loaded.config
    kv = allocate_kv_cache(config, 16, 4, loaded.dtype, device)
    tables = [[3, 7, 1], [10, 2]]
    prompts = [list(range(10, 19)), [40, 41, 42, 43, 44]]
    out = []
    lens = [0, 0]
    steps = [[prompts[0], prompts[1]], [[20], [45]], [[21], [46]]]
    for step in steps:
        q_lens = [len(t) for t in step]
        seq_lens = [lens[i] + q_lens[i] for i in range(2)]
        positions = [p for i in range(2) for p in range(lens[i], seq_lens[i])]
        attn = AttentionMetadata.from_lists(
            query_lens=q_lens, seq_lens=seq_lens, block_tables=tables, block_size=4, device=device
        )
        ids = torch.tensor([t for toks in step for t in toks], device=device)
        hidden = model(ids, torch.tensor(positions, device=device), attn, kv)
        out.append(model.compute_logits(hidden).float().cpu())
        lens = seq_lens
    return torch.cat(out)


def test_tiny_int4_model_cuda_bfloat16_tracks_cpu_float32() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_llama(Path(tmp) / "m")
        ref = run(load_model(path, quantization="int4", dtype=torch.float32), "cpu")
        gpu = load_model(path, quantization="int4", dtype=torch.bfloat16, device="cuda")
        assert isinstance(gpu.model.layers[0].mlp.gate_up_proj, Int4Linear)
        out = run(gpu, "cuda")
    rel = ((out - ref).norm() / ref.norm()).item()
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"tiny int4 model, CUDA bfloat16 vs CPU float32: relative logit error {rel:.2e}, argmax agreement {agree:.3f}")
    assert rel < 3e-2
    assert agree >= 0.85


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA")
    test_packed_kernels_on_cuda_match_float32_math()
    print("packed kernels on CUDA: ok")
    test_tiny_int4_model_cuda_bfloat16_tracks_cpu_float32()
    print("tiny model on CUDA: ok")
