"""``taxiway bench gpu``'s dry run on the CPU (``--device cpu --shapes tiny``): every code path of
the script a device call runs, but the graphs' capture, ends with the figures it promises."""

from __future__ import annotations

import json
from argparse import ArgumentParser
from pathlib import Path

import pytest

from bench import gpu


def test_dry_run_emits_every_figure(tmp_path: Path) -> None:
    parser = ArgumentParser()
    gpu.configure(parser)
    out = tmp_path / "gpu.json"
    args = parser.parse_args([
        "--device", "cpu", "--shapes", "tiny", "--batch", "1,3", "--prompt-tokens", "20", "--decode-steps", "2",
        "--quantization", "int4,none", "--hf", "eager", "--profile-steps", "2", "--json", str(out),
    ])  # fmt: skip
    assert gpu.run(args) == 0
    records = json.loads(out.read_text())
    assert records[0]["device"] and records[0]["shapes"] == "tiny"

    def figures(name: str) -> list[dict[str, object]]:
        return [r for r in records if r.get("figure") == name]

    # int4 weights: the GPU path once per int4 kernel, the plain path once
    for quantization, int4_kernel in (("int4", "torch"), ("int4", "triton"), ("none", "torch")):

        def mine(name: str) -> list[dict[str, object]]:
            return [r for r in figures(name) if (r["quantization"], r["int4_kernel"]) == (quantization, int4_kernel)]

        first = int4_kernel == "torch"
        assert {r["path"] for r in mine("prefill")} == ({"fused", "plain"} if first else {"fused"})
        decode = {(r["mode"], r["batch"]) for r in mine("decode")}
        plain = {("plain", 1)} if first else set()
        assert decode == {("graphs", 1), ("eager", 1), ("graphs", 3), ("eager", 3)} | plain
        profiled = mine("profile")
        assert {(r["mode"], r["batch"]) for r in profiled} == {(m, b) for m, b in decode if m == "graphs" or b == 1}
        assert all(r["kernels_per_step"] > 0 and r["top"] and 0 <= r["idle_share"] <= 1 for r in profiled), profiled
        graphs = mine("graphs")
        assert graphs and graphs[0]["buckets"] == [1, 2, 3]
    assert {r["batch"] for r in figures("hf")} == {1, 3}
    rates = [r["tokens_per_s"] for r in figures("decode") + figures("prefill") + figures("hf")]
    assert all(isinstance(rate, float) and rate > 0 for rate in rates), rates
    assert not [r for r in records if "error" in r]


def test_write_model_gives_a_servable_directory(tmp_path: Path) -> None:
    """``--write-model`` (the serving phase's model) with a tokenizer copied from another model
    directory: the engine builds from it and generates."""
    from backends.engine.builder import EngineOptions, build_engine
    from bench.synthetic import write_random_llama
    from gateway.interface import SamplingParams

    source = write_random_llama(tmp_path / "source", hidden=32, intermediate=64, layers=1, heads=2, kv_heads=1,
                                vocab=512, tokenizer=True)  # fmt: skip
    parser = ArgumentParser()
    gpu.configure(parser)
    model = tmp_path / "model"
    args = parser.parse_args(["--write-model", str(model), "--tokenizer-from", str(source), "--shapes", "tiny"])
    assert gpu.run(args) == 0
    engine = build_engine(EngineOptions(model=str(model), dtype="float32", threads=1, kv_cache_tokens=256))
    engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    tokens = []
    while engine.has_unfinished():
        for output in engine.step():
            tokens += [t for item in output.items for t in getattr(item, "token_ids", ())]
    assert len(tokens) == 3


def test_a_wrong_int4_kernel_is_refused_before_any_work(capsys) -> None:  # type: ignore[no-untyped-def]
    parser = ArgumentParser()
    gpu.configure(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--int4-kernels", "torch,cutlass"])
    assert "torch and triton, not 'torch,cutlass'" in capsys.readouterr().err
