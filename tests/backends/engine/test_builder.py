"""``EngineOptions``: the step budget's default follows the other options; a budget set below
``max_num_seqs`` is refused."""

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
