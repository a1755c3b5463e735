"""``taxiway serve`` with ``device = "cuda"``, end to end through real HTTP: a random tiny Llama
with a byte tokenizer, int4 weights, the KV cache sized from the GPU's free memory, decode steps
replayed from CUDA graphs, eight requests at once. Marked ``gpu`` (``scripts/gpu_check.sh`` runs
it on a device machine); skipped elsewhere."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from backends.engine.cuda.kernels import HAVE_TRITON
from bench.synthetic import write_random_llama

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and HAVE_TRITON), reason="needs CUDA and Triton"),
]


@pytest.mark.parametrize("int4_kernel", ["torch", "triton"])
def test_served_on_cuda(taxiway_server, tmp_path: Path, int4_kernel: str) -> None:  # type: ignore[no-untyped-def]
    path = write_random_llama(tmp_path / "m", hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2,
                              vocab=300, tokenizer=True)  # fmt: skip
    config = tmp_path / "taxiway.toml"
    config.write_text(
        '[[models]]\nname = "tiny"\nbackend = "engine"\n'
        f'options = {{ model = "{path}", device = "cuda", quantization = "int4", max_num_seqs = 8, '
        f'gpu_memory_utilization = 0.5, cuda_int4_kernel = "{int4_kernel}" }}\n'
    )
    server = taxiway_server(config, startup_timeout=300)
    server.wait_ready(timeout=300)
    stats = httpx.get(f"{server.url}/v1/models/tiny/stats", timeout=10).json()
    assert stats["kv_blocks_total"] > 0

    def complete(i: int) -> dict:  # type: ignore[type-arg]
        body = {"model": "tiny", "prompt": f"request {i}: hello", "max_tokens": 24, "temperature": 0,
                "ignore_eos": True}  # fmt: skip
        response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(8) as pool:
        first = list(pool.map(complete, range(8)))
    assert all(r["usage"]["completion_tokens"] == 24 for r in first), first
    assert all(r["choices"][0]["finish_reason"] == "length" for r in first)
    # greedy and alone, twice: the same graph on the same inputs gives the same answer (a batch of
    # eight may not: its attention splits the context differently, and bfloat16 sums in that order)
    alone = [complete(3)["choices"][0]["text"] for _ in range(2)]
    assert alone[0] == alone[1]
    server.wait_for_log("engine.cuda_graphs", timeout=10)

    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=120,
                      json={"model": "tiny", "prompt": "hi", "max_tokens": 8, "stream": True,
                            "ignore_eos": True}) as response:  # fmt: skip
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    reasons = [c["finish_reason"] for line in lines[:-1] for c in json.loads(line[6:])["choices"]]
    assert reasons[-1] == "length"
