"""``EngineOptions``: the step budget's default follows the other options; a budget set below
``max_num_seqs`` is refused, and so are adapters on CUDA."""

from __future__ import annotations

import pytest

from backends.engine.builder import DEFAULT_MAX_NUM_BATCHED_TOKENS, EngineOptions


def test_step_budget_default_follows_the_other_options() -> None:
    assert EngineOptions().num_batched_tokens(8192) == DEFAULT_MAX_NUM_BATCHED_TOKENS
    # more sequences than the default budget: each still gets its token every step
    assert EngineOptions(max_num_seqs=300).num_batched_tokens(8192) == 300
    # prompts not chunked: a whole context fits in one step
    assert EngineOptions(enable_chunked_prefill=False).num_batched_tokens(2048) == 2048
    assert EngineOptions(max_num_batched_tokens=64, max_num_seqs=8).num_batched_tokens(8192) == 64


def test_budget_below_max_num_seqs_is_refused() -> None:
    with pytest.raises(ValueError, match="max_num_batched_tokens must be at least max_num_seqs"):
        EngineOptions(max_num_batched_tokens=8, max_num_seqs=16)


def test_adapters_on_cuda_are_refused_by_name(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """The GPU path carries no adapter terms: a config asking for both is an error naming the
    option (check-config says so before anything loads), not adapters silently skipped."""
    from backends.engine.lora.options import LoRAOptions
    from gateway.cli import main

    with pytest.raises(ValueError, match='lora: adapters run on the CPU only for now'):
        EngineOptions(device="cuda:1", lora=LoRAOptions())
    assert EngineOptions(device="cpu", lora=LoRAOptions()).lora is not None
    config = tmp_path / "taxiway.toml"
    config.write_text(
        '[[models]]\nname = "local"\nbackend = "engine"\n'
        'options = { model = "smollm2-135m-instruct", device = "cuda", lora = { adapters = {} } }\n'
    )
    assert main(["check-config", str(config)]) != 0
    assert "models[0].options: lora: adapters run on the CPU only" in capsys.readouterr().err
