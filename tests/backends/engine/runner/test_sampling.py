"""Sampling: each feature on small hand-made logits with derivable expectations."""

from __future__ import annotations

import math

import pytest
import torch

from backends.engine.runner import sampling
from backends.engine.runner.sampling import (
    SamplingBatch,
    SeqSamplingState,
    apply_penalties,
    make_generator,
    sample,
    validate_sampling_params,
)
from gateway.errors import InvalidRequestError
from gateway.interface import SamplingParams

V = 16


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def _run(logits: torch.Tensor, params: list[SamplingParams], *, seed: int = 0, **state_kwargs) -> list[int]:  # type: ignore[no-untyped-def]
    states = [SeqSamplingState(params=p, **state_kwargs) for p in params]
    batch = SamplingBatch.build(states, V)
    return sample(logits, batch, torch.Generator().manual_seed(seed)).token_ids


def _frequencies(logits_row: torch.Tensor, params: SamplingParams, draws: int = 40_000) -> torch.Tensor:
    """Token frequencies of ``draws`` samples (a batch of identical rows, one step)."""
    logits = logits_row.unsqueeze(0).expand(draws, V).contiguous()
    tokens = _run(logits, [params] * draws, seed=1)
    return torch.bincount(torch.tensor(tokens), minlength=V).float() / draws


# -- greedy and truncation ---------------------------------------------------------------------


def test_greedy_is_argmax() -> None:
    logits = _logits(5)
    assert _run(logits, [SamplingParams(temperature=0)] * 5) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("seed", range(5))
def test_top_k_1_and_tiny_top_p_are_greedy(seed: int) -> None:
    logits = _logits(6, seed)
    greedy = logits.argmax(-1).tolist()
    assert _run(logits, [SamplingParams(top_k=1)] * 6, seed=seed) == greedy
    assert _run(logits, [SamplingParams(top_p=1e-6, temperature=1.5)] * 6, seed=seed) == greedy
    assert _run(logits, [SamplingParams(min_p=1.0)] * 6, seed=seed) == greedy


@pytest.mark.parametrize("temperature", [1e-45, 1e-39, 1e-30, 1e-6])
def test_temperatures_too_small_for_float32_are_greedy(temperature: float) -> None:
    # as float32 1e-45 is a denormal (or 0) and logits / 1e-30 overflow: NaN probabilities
    logits = _logits(6) * 10
    params = [SamplingParams(temperature=temperature), SamplingParams(temperature=temperature, seed=3)] * 3
    assert sampling.is_greedy(params[0])
    assert _run(logits, params) == logits.argmax(-1).tolist()


def test_mixed_greedy_and_sampled_rows() -> None:
    logits = _logits(4)
    params = [SamplingParams(temperature=0), SamplingParams(), SamplingParams(temperature=0), SamplingParams(top_k=1)]
    tokens = _run(logits, params)
    greedy = logits.argmax(-1).tolist()
    assert [tokens[0], tokens[2], tokens[3]] == [greedy[0], greedy[2], greedy[3]]


def test_min_p_excludes_unlikely_tokens() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05] + [1e-9] * (V - 4))
    freq = _frequencies(probs.log(), SamplingParams(min_p=0.2), draws=20_000)  # keeps p >= 0.1
    assert freq[3:].sum() == 0
    kept = torch.tensor([0.5, 0.3, 0.15]) / 0.95
    assert torch.allclose(freq[:3], kept, atol=0.015)


def test_top_k_renormalises_the_k_best() -> None:
    logits = torch.linspace(2, -2, V)
    freq = _frequencies(logits, SamplingParams(top_k=3))
    expected = torch.softmax(logits[:3], -1)
    assert freq[3:].sum() == 0
    assert torch.allclose(freq[:3], expected, atol=0.015)


def test_top_p_keeps_the_smallest_set_reaching_p(top_p_path: str) -> None:
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1] + [0.0] * (V - 4)) + 1e-12
    freq = _frequencies(probs.log(), SamplingParams(top_p=0.65))  # 0.4 + 0.3 >= 0.65
    assert freq[2:].sum() == 0
    assert torch.allclose(freq[:2], torch.tensor([0.4, 0.3]) / 0.7, atol=0.015)


@pytest.fixture(params=["candidates", "full"])
def top_p_path(request, monkeypatch):  # type: ignore[no-untyped-def]
    """Top-p rows are drawn among their best NUM_CANDIDATES logits, or over the whole vocabulary
    when those hold too little mass: run both paths."""
    if request.param == "full":
        monkeypatch.setattr(sampling, "NUM_CANDIDATES", 2)
    return request.param


@pytest.mark.parametrize(
    ("params", "kept"),
    [
        (SamplingParams(top_p=0.5), [0.4, 0.3]),
        (SamplingParams(top_p=0.75), [0.4, 0.3, 0.2]),
        # top-p is over what top-k left: [4/7, 3/7], 4/7 >= 0.5
        (SamplingParams(top_p=0.5, top_k=2), [0.4]),
        # ... and over what min-p left: [0.4, 0.3, 0.2] / 0.9, 0.4/0.9 + 0.3/0.9 >= 0.75
        (SamplingParams(top_p=0.75, min_p=0.3), [0.4, 0.3]),
    ],
)
def test_top_p_composes_with_top_k_and_min_p(params: SamplingParams, kept: list[float], top_p_path: str) -> None:
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1] + [0.0] * (V - 4)) + 1e-12
    freq = _frequencies(probs.log(), params, draws=20_000)
    n = len(kept)
    assert freq[n:].sum() == 0
    assert torch.allclose(freq[:n], torch.tensor(kept) / sum(kept), atol=0.015)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_temperature_sampling_matches_softmax_frequencies(temperature: float) -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0, 0.2, -3.0] + [-1.5] * (V - 8))
    freq = _frequencies(logits, SamplingParams(temperature=temperature))
    expected = torch.softmax(logits / temperature, -1)
    # 40k draws: a frequency's standard error is at most 0.0025.
    assert (freq - expected).abs().max() < 0.012, (freq, expected)


# -- logit bias and penalties -------------------------------------------------------------------


def test_logit_bias_bans_and_forces() -> None:
    logits = _logits(3)
    best = logits.argmax(-1).tolist()
    banned = [SamplingParams(temperature=0, logit_bias={best[r]: -100.0}) for r in range(3)]
    assert all(t != b for t, b in zip(_run(logits, banned), best, strict=True))
    forced = [SamplingParams(logit_bias={7: 100.0}, temperature=1.0) for _ in range(3)]
    assert _run(logits, forced) == [7, 7, 7]
    freq = _frequencies(torch.zeros(V), SamplingParams(logit_bias={0: -100.0, 5: -100.0}), draws=5_000)
    assert freq[0] == 0 and freq[5] == 0


def test_penalties_follow_the_formulas() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0] + [0.0] * (V - 4)] * 3)
    params = [
        SamplingParams(repetition_penalty=2.0),
        SamplingParams(frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(logit_bias={3: -1.5}, presence_penalty=1.0, repetition_penalty=1.0),
    ]
    states = [
        SeqSamplingState(params=params[0], prompt_ids=[0, 1], output_ids=[1]),
        SeqSamplingState(params=params[1], prompt_ids=[3, 3], output_ids=[0, 0, 2]),
        SeqSamplingState(params=params[2], prompt_ids=[0], output_ids=[]),
    ]
    out = apply_penalties(logits, SamplingBatch.build(states, V))
    expected = logits.clone()
    expected[0, 0] = 2.0 / 2.0  # positive: divided; prompt tokens count
    expected[0, 1] = -1.0 * 2.0  # negative: multiplied; once however often seen
    expected[1, 0] = 2.0 - 2 * 0.5 - 0.25  # frequency * count + presence
    expected[1, 2] = 0.5 - 1 * 0.5 - 0.25  # prompt tokens (3) are not penalised
    expected[2, 3] = 3.0 - 1.5  # bias; presence penalty has no outputs to act on
    assert torch.equal(out, expected)
    assert torch.equal(logits, torch.tensor([[2.0, -1.0, 0.5, 3.0] + [0.0] * (V - 4)] * 3))  # untouched


def test_penalties_change_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.9] + [0.0] * (V - 2)])
    state = SeqSamplingState(params=SamplingParams(temperature=0, frequency_penalty=0.2), output_ids=[0])
    assert sample(logits, SamplingBatch.build([state], V)).token_ids == [1]


# -- seeds --------------------------------------------------------------------------------------


def _seeded_run(rows: list[SeqSamplingState], logits_per_step: list[torch.Tensor], row: int) -> list[int]:
    out = []
    engine = torch.Generator().manual_seed(123)
    for logits in logits_per_step:
        out.append(sample(logits, SamplingBatch.build(rows, V), engine).token_ids[row])
    return out


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(seed=42),
        SamplingParams(seed=7, temperature=0.8, top_p=0.9),
        SamplingParams(seed=7, top_k=5, min_p=0.05, temperature=1.3),
        SamplingParams(seed=3, frequency_penalty=0.5, repetition_penalty=1.2, logit_bias={1: 2.0}),
    ],
)
def test_seeded_row_is_independent_of_its_batch(params: SamplingParams) -> None:
    steps = [_logits(1, seed=100 + i) for i in range(25)]
    alone = SeqSamplingState(params=params, prompt_ids=[1, 2], output_ids=[3], generator=make_generator(params.seed))
    tokens_alone = _seeded_run([alone], steps, 0)

    others = [
        SeqSamplingState(params=SamplingParams(temperature=0)),
        SeqSamplingState(params=SamplingParams(top_p=0.5, top_k=3, presence_penalty=1.0), output_ids=[4, 4]),
        SeqSamplingState(params=SamplingParams(seed=99, min_p=0.1), generator=make_generator(99)),
        SeqSamplingState(params=SamplingParams(temperature=2.0, logit_bias={0: -100.0})),
    ]
    mine = SeqSamplingState(params=params, prompt_ids=[1, 2], output_ids=[3], generator=make_generator(params.seed))
    batched_steps = [torch.cat([_logits(2, seed=i), s, _logits(2, seed=50 + i)]) for i, s in enumerate(steps)]
    rows = others[:2] + [mine] + others[2:]
    assert _seeded_run(rows, batched_steps, 2) == tokens_alone
    assert len(set(tokens_alone)) > 1  # it really sampled


def test_seeded_top_p_row_ignores_other_rows_top_k(monkeypatch: pytest.MonkeyPatch) -> None:
    """A top-p row whose candidates fall short is drawn over the vocabulary even when another
    row's top-k makes the batch look at every token."""
    monkeypatch.setattr(sampling, "NUM_CANDIDATES", 2)
    steps = [torch.randn(1, V, generator=torch.Generator().manual_seed(i)) * 0.3 for i in range(30)]
    params = SamplingParams(seed=11, top_p=0.8)

    def mine() -> SeqSamplingState:
        return SeqSamplingState(params=params, generator=make_generator(11))

    alone = _seeded_run([mine()], steps, 0)
    other = SeqSamplingState(params=SamplingParams(top_k=V))
    together = _seeded_run([other, mine()], [torch.cat([torch.zeros(1, V), s]) for s in steps], 1)
    assert together == alone
    assert len(set(alone)) > 2  # not confined to the two candidates


def test_same_seed_same_tokens_different_seed_different_tokens() -> None:
    steps = [torch.zeros(1, V) for _ in range(20)]

    def run(seed: int) -> list[int]:
        state = SeqSamplingState(params=SamplingParams(seed=seed), generator=make_generator(seed))
        return _seeded_run([state], steps, 0)

    assert run(5) == run(5)
    assert run(5) != run(6)


# -- logprobs -----------------------------------------------------------------------------------


def test_logprobs_are_the_raw_distribution() -> None:
    logits = _logits(3)
    params = [
        SamplingParams(logprobs=True, top_logprobs=3, temperature=0.3, frequency_penalty=1.0, top_k=2),
        SamplingParams(temperature=0),
        SamplingParams(logprobs=True, temperature=0, logit_bias={0: 50.0}),
    ]
    states = [SeqSamplingState(params=p, output_ids=[0, 1]) for p in params]
    out = sample(logits, SamplingBatch.build(states, V), torch.Generator().manual_seed(0))
    raw = torch.log_softmax(logits, -1)
    assert out.logprobs is not None and out.top_logprobs is not None
    for row, token in enumerate(out.token_ids):
        assert math.isclose(out.logprobs[row], raw[row, token].item(), rel_tol=1e-6)
    assert out.token_ids[2] == 0  # the bias decided the token, not the reported logprob
    top = out.top_logprobs[0]
    assert [t for t, _ in top] == raw[0].topk(3).indices.tolist()
    assert all(math.isclose(lp, raw[0, t].item(), rel_tol=1e-6) for t, lp in top)
    assert out.top_logprobs[1] == [] and out.top_logprobs[2] == []


def test_no_logprobs_unless_asked() -> None:
    out = sample(_logits(2), SamplingBatch.build([SeqSamplingState(params=SamplingParams())] * 2, V))
    assert out.logprobs is None and out.top_logprobs is None


def test_fast_paths_build_no_tensors() -> None:
    batch = SamplingBatch.build([SeqSamplingState(params=SamplingParams(temperature=0))] * 3, V)
    assert batch.all_greedy and batch.temperature is None and batch.output_counts is None
    batch = SamplingBatch.build([SeqSamplingState(params=SamplingParams(temperature=0.7))] * 3, V)
    assert batch.temperature is not None
    assert (batch.seen_mask, batch.output_counts, batch.bias_index) == (None,) * 3


def test_input_logits_are_not_modified() -> None:
    logits = _logits(2)
    before = logits.clone()
    params = [SamplingParams(temperature=0.5, top_p=0.5, top_k=4, min_p=0.1, logit_bias={1: 5.0}, presence_penalty=1)]
    sample(logits, SamplingBatch.build([SeqSamplingState(params=p, output_ids=[2]) for p in params * 2], V))
    assert torch.equal(logits, before)


# -- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "param"),
    [
        (SamplingParams(temperature=-0.1), "temperature"),
        (SamplingParams(top_p=0.0), "top_p"),
        (SamplingParams(top_k=-1), "top_k"),
        (SamplingParams(min_p=1.5), "min_p"),
        (SamplingParams(presence_penalty=2.5), "presence_penalty"),
        (SamplingParams(frequency_penalty=-3), "frequency_penalty"),
        (SamplingParams(repetition_penalty=0), "repetition_penalty"),
        (SamplingParams(repetition_penalty=1e-300), "repetition_penalty"),  # 0 as float32
        (SamplingParams(repetition_penalty=1e-3), "repetition_penalty"),
        (SamplingParams(repetition_penalty=1e300), "repetition_penalty"),  # inf as float32
        (SamplingParams(repetition_penalty=math.nan), "repetition_penalty"),
        (SamplingParams(logit_bias={V: 1.0}), "logit_bias"),
        (SamplingParams(logit_bias={0: 101.0}), "logit_bias"),
        (SamplingParams(logprobs=True, top_logprobs=21), "top_logprobs"),
    ],
)
def test_validation_names_the_parameter(params: SamplingParams, param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        validate_sampling_params(params, V)
    assert info.value.param == param


@pytest.mark.parametrize("penalty", sampling.REPETITION_PENALTY_RANGE)
def test_extreme_repetition_penalties_keep_the_logits_finite(penalty: float) -> None:
    params = SamplingParams(repetition_penalty=penalty, temperature=sampling.MIN_TEMPERATURE * 2)
    validate_sampling_params(params, V)
    logits = _logits(1) * 100
    batch = SamplingBatch.build([SeqSamplingState(params=params, prompt_ids=list(range(V)))], V)
    assert torch.isfinite(apply_penalties(logits, batch) / batch.temperature.unsqueeze(1)).all()
    assert 0 <= _run(logits, [params], prompt_ids=list(range(V)))[0] < V


def test_valid_parameters_pass() -> None:
    validate_sampling_params(SamplingParams(temperature=0, top_p=1, logit_bias={V - 1: -100}, top_logprobs=20), V)
