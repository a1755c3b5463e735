"""Per-sequence sampling over one step's batch of logits.

Each row of ``logits[S, V]`` belongs to a sequence with its own ``SamplingParams``. One step:

1. logprobs (when any row asks): ``log_softmax`` of the model's raw logits — before penalties,
   bias, temperature and truncation. This is what vLLM reports by default (``raw_logprobs``) and
   what OpenAI's ``logprobs`` mean: the model's distribution, not the sampler's.
2. penalties, on the raw logits: repetition (HF/vLLM: over prompt + generated tokens, a positive
   logit is divided by the penalty, a negative one multiplied), then frequency and presence
   (OpenAI: over generated tokens, ``l -= count * frequency + (count > 0) * presence``).
3. ``logit_bias`` added (OpenAI: added to the logits before sampling); then, on constrained rows
   (``SamplingParams.structured``), every token their grammar forbids set to -inf.
4. greedy rows (``temperature`` below ``MIN_TEMPERATURE``, 0 included) take the argmax here.
5. the others: divide by temperature, then min-p (on the tempered distribution), top-k, top-p
   (vLLM's order), then draw by inverting the row's CDF at one uniform number.

Seeds: a seeded row draws its one number per step from its own ``torch.Generator``, so its tokens
do not depend on what else shares the batch; unseeded rows share the engine's generator. Every
operation is row-wise, and a row whose filter is off is left bit-for-bit alone. (One number per
row, not a Gumbel/exponential race over ``[S, V]`` noise: generating ``S x V`` random numbers
costs more than the whole rest of a step on CPU.)

Work is skipped for features no row uses: an all-greedy batch is one ``argmax``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from gateway.errors import InvalidRequestError
from gateway.interface import SamplingParams

MAX_TOP_LOGPROBS = 20
#: Top-k/top-p rows are sampled among their best this-many logits (or k) instead of the vocabulary.
NUM_CANDIDATES = 1024
MAX_ABS_LOGIT_BIAS = 100.0


@dataclass(slots=True)
class SeqSamplingState:
    """What sampling needs of one sequence: its parameters, its tokens so far, its generator."""

    params: SamplingParams
    prompt_ids: Sequence[int] = ()
    output_ids: Sequence[int] = ()
    generator: torch.Generator | None = None  # set for seeded requests (``make_generator``)


@dataclass(slots=True)
class SampleOutput:
    token_ids: list[int]
    #: per row, the chosen token's logprob (raw distribution); None when no row asked
    logprobs: list[float] | None = None
    #: per row, ``params.top_logprobs`` (token id, logprob) pairs, best first; None when no row asked
    top_logprobs: list[list[tuple[int, float]]] | None = None


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of a seeded request; keep it with the sequence for its whole life."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return generator


#: Temperatures below this are greedy (vLLM's ``_SAMPLING_EPS``). The sampler divides float32
#: logits by the temperature: 1e-39 is a denormal and 1e-45 rounds to 0, and anything that small
#: overflows the logits to inf and the probabilities to NaN. At 1e-5 a logit of 1e3 becomes 1e8.
MIN_TEMPERATURE = 1e-5
#: ``repetition_penalty`` divides or multiplies float32 logits: 1e-300 is 0 in float32 (a division
#: by zero) and 1e300 is inf (0 * inf = NaN). Within this range a logit of 1e3 stays finite even
#: after the smallest temperature, and nothing useful lies outside it.
REPETITION_PENALTY_RANGE = (0.01, 100.0)


def is_greedy(params: SamplingParams) -> bool:
    """Whether a row takes the argmax: ``temperature`` 0, or too small to divide by in float32."""
    return params.temperature < MIN_TEMPERATURE


def validate_sampling_params(params: SamplingParams, vocab_size: int) -> None:
    """Reject parameters the sampler cannot honour (``InvalidRequestError`` naming the param)."""

    def bad(param: str, message: str) -> InvalidRequestError:
        return InvalidRequestError(message, param=param)

    if not (math.isfinite(params.temperature) and params.temperature >= 0):
        raise bad("temperature", f"temperature must be >= 0, got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise bad("top_p", f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise bad("top_k", f"top_k must be >= 0 (0: off), got {params.top_k}")
    if not 0 <= params.min_p <= 1:
        raise bad("min_p", f"min_p must be in [0, 1], got {params.min_p}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(params, name)
        if not -2 <= value <= 2:
            raise bad(name, f"{name} must be in [-2, 2], got {value}")
    low, high = REPETITION_PENALTY_RANGE
    if not low <= params.repetition_penalty <= high:  # NaN fails too
        raise bad(
            "repetition_penalty",
            f"repetition_penalty must be in [{low:g}, {high:g}] (it scales float32 logits), "
            f"got {params.repetition_penalty:g}",
        )
    for token_id, bias in params.logit_bias.items():
        if not 0 <= token_id < vocab_size:
            raise bad("logit_bias", f"logit_bias token id {token_id} is outside the vocabulary (0..{vocab_size - 1})")
        if not -MAX_ABS_LOGIT_BIAS <= bias <= MAX_ABS_LOGIT_BIAS:
            raise bad("logit_bias", f"logit_bias values must be in [-100, 100], got {bias} for {token_id}")
    if not 0 <= params.top_logprobs <= MAX_TOP_LOGPROBS:
        raise bad("top_logprobs", f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {params.top_logprobs}")


@dataclass(slots=True)
class SamplingBatch:
    """One step's per-row parameters as tensors; a feature no row uses stays ``None``."""

    num_seqs: int
    vocab_size: int
    all_greedy: bool
    is_greedy: list[bool]
    generators: list[torch.Generator | None]
    # Set unless all rows are greedy: per-row values as [S] tensors and as lists (for decisions
    # made in Python without a device sync).
    sampled_rows: list[int] = field(default_factory=list)
    top_k_list: list[int] = field(default_factory=list)  # 0 = off
    top_p_list: list[float] = field(default_factory=list)  # 1.0 = off
    min_p_list: list[float] = field(default_factory=list)  # 0.0 = off
    temperature: torch.Tensor | None = None  # [S] float32 (1.0 on greedy rows)
    top_k: torch.Tensor | None = None  # [S] int64
    top_p: torch.Tensor | None = None  # [S] float32
    min_p: torch.Tensor | None = None  # [S] float32
    repetition_penalty: torch.Tensor | None = None  # [S, 1]
    seen_mask: torch.Tensor | None = None  # [S, V] bool: in prompt or output
    frequency_penalty: torch.Tensor | None = None  # [S, 1]
    presence_penalty: torch.Tensor | None = None  # [S, 1]
    output_counts: torch.Tensor | None = None  # [S, V] float32
    bias_index: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, token ids)
    bias_value: torch.Tensor | None = None
    num_top_logprobs: list[int] = field(default_factory=list)
    wants_logprobs: bool = False
    #: constrained rows and their grammar's ``int32[R, ceil(V/32)]`` bitmask (``structured.matchers``)
    token_bitmask: tuple[list[int], torch.Tensor] | None = None

    @classmethod
    def build(
        cls, states: Sequence[SeqSamplingState], vocab_size: int, device: torch.device | str = "cpu"
    ) -> SamplingBatch:
        params = [s.params for s in states]
        greedy = [is_greedy(p) for p in params]
        batch = cls(
            num_seqs=len(states),
            vocab_size=vocab_size,
            all_greedy=all(greedy),
            is_greedy=greedy,
            generators=[s.generator for s in states],
            num_top_logprobs=[p.top_logprobs if p.logprobs else 0 for p in params],
            wants_logprobs=any(p.logprobs for p in params),
        )

        def column(values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        if not batch.all_greedy:
            batch.sampled_rows = [row for row, is_row_greedy in enumerate(greedy) if not is_row_greedy]
            batch.top_k_list = [min(p.top_k, vocab_size) for p in params]
            batch.top_p_list = [p.top_p for p in params]
            batch.min_p_list = [p.min_p for p in params]
            batch.temperature = column([1.0 if is_greedy(p) else p.temperature for p in params])
            batch.top_k = column(batch.top_k_list, torch.int64)
            batch.top_p = column(batch.top_p_list)
            batch.min_p = column(batch.min_p_list)

        if any(p.repetition_penalty != 1.0 for p in params):
            batch.repetition_penalty = column([p.repetition_penalty for p in params]).unsqueeze(1)
            seen = [
                [*s.prompt_ids, *s.output_ids] if s.params.repetition_penalty != 1.0 else []
                for s in states
            ]
            batch.seen_mask = _token_counts(seen, vocab_size, device) > 0
        if any(p.frequency_penalty != 0 or p.presence_penalty != 0 for p in params):
            batch.frequency_penalty = column([p.frequency_penalty for p in params]).unsqueeze(1)
            batch.presence_penalty = column([p.presence_penalty for p in params]).unsqueeze(1)
            outputs = [
                s.output_ids if s.params.frequency_penalty or s.params.presence_penalty else ()
                for s in states
            ]
            batch.output_counts = _token_counts(outputs, vocab_size, device)
        if any(p.logit_bias for p in params):
            rows, ids, values = [], [], []
            for row, p in enumerate(params):
                for token_id, bias in p.logit_bias.items():
                    rows.append(row)
                    ids.append(int(token_id))
                    values.append(float(bias))
            batch.bias_index = (column(rows, torch.int64), column(ids, torch.int64))
            batch.bias_value = column(values)
        return batch


def _token_counts(histories: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """``[S, V]`` float32 occurrence counts, by one scatter_add over right-padded histories."""
    width = max((len(h) for h in histories), default=0)
    ids = torch.full((len(histories), width + 1), vocab_size, dtype=torch.int64)  # pad: column V
    for row, history in enumerate(histories):
        if history:
            ids[row, : len(history)] = torch.as_tensor(history, dtype=torch.int64)
    ids = ids.to(device)
    counts = torch.zeros(len(histories), vocab_size + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab_size]


def sample(
    logits: torch.Tensor, batch: SamplingBatch, generator: torch.Generator | None = None
) -> SampleOutput:
    """Pick one token per row of ``logits [S, V]``; ``generator`` serves the unseeded rows."""
    assert logits.dim() == 2 and logits.shape[0] == batch.num_seqs, (logits.shape, batch.num_seqs)
    logits = logits.float()

    # 1. logprobs of the raw distribution
    raw_logprobs = torch.log_softmax(logits, dim=-1) if batch.wants_logprobs else None

    # 2-3. penalties and bias, then the grammar's mask
    logits = apply_penalties(logits, batch)
    if batch.token_bitmask is not None:
        logits = apply_token_bitmask(logits, *batch.token_bitmask)

    # 4. greedy
    if batch.all_greedy:
        return _output(logits.argmax(dim=-1), raw_logprobs, batch)
    if len(batch.sampled_rows) < batch.num_seqs:
        tokens = logits.argmax(dim=-1)  # the greedy rows' tokens; sampled rows are overwritten
    else:
        tokens = torch.empty(batch.num_seqs, dtype=torch.int64, device=logits.device)

    # 5. sampled rows: one uniform number each, then temperature, truncation and the draw.
    # Each row's path depends on its own parameters (and logits) only, never on its batch.
    uniform = _uniforms(batch, generator, logits.device)
    candidate_rows, full_rows = [], []
    for row in batch.sampled_rows:
        (candidate_rows if batch.top_k_list[row] > 0 or batch.top_p_list[row] < 1 else full_rows).append(row)
    if candidate_rows:
        rows = _row_index(candidate_rows, batch.num_seqs, logits.device)
        chosen, ok = _sample_candidates(
            _tempered(logits, batch, rows),
            batch.top_k[rows],
            batch.top_p[rows],
            batch.min_p[rows] if any(batch.min_p_list[r] > 0 for r in candidate_rows) else None,
            uniform[rows],
        )
        tokens[rows] = torch.where(ok, chosen, tokens[rows])
        full_rows += [r for r, good in zip(candidate_rows, ok.tolist(), strict=True) if not good]
    if full_rows:
        rows = _row_index(full_rows, batch.num_seqs, logits.device)
        tokens[rows] = _sample_full(
            _tempered(logits, batch, rows),
            batch.top_p[rows] if any(batch.top_p_list[r] < 1 for r in full_rows) else None,
            batch.min_p[rows] if any(batch.min_p_list[r] > 0 for r in full_rows) else None,
            uniform[rows],
        )
    return _output(tokens, raw_logprobs, batch)


def _row_index(rows: list[int], num_seqs: int, device: torch.device) -> torch.Tensor | slice:
    """Index of ``rows``: a plain slice when it is every row (no gather copy)."""
    if len(rows) == num_seqs and rows == list(range(num_seqs)):
        return slice(None)
    return torch.tensor(rows, device=device)


def _tempered(logits: torch.Tensor, batch: SamplingBatch, rows: torch.Tensor | slice) -> torch.Tensor:
    return logits[rows] / batch.temperature[rows].unsqueeze(1)


def _uniforms(batch: SamplingBatch, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``[S]`` float64 in [0, 1): a seeded row's from its own generator, one per step."""
    uniform = torch.empty(batch.num_seqs, dtype=torch.float64, device=device)
    unseeded = [row for row, g in enumerate(batch.generators) if g is None]
    if len(unseeded) == batch.num_seqs:
        return uniform.uniform_(generator=generator)
    if unseeded:
        values = torch.rand(len(unseeded), generator=generator, dtype=torch.float64, device=device)
        uniform[torch.tensor(unseeded, device=device)] = values
    for row, g in enumerate(batch.generators):
        if g is not None:
            uniform[row : row + 1].uniform_(generator=g)
    return uniform


def _invert_cdf(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row of non-negative ``weights [R, N]`` at ``uniform [R]``.

    The CDF is float64: a float32 running sum over ~1e5 entries drifts. The first entry whose
    CDF exceeds ``u * total`` is chosen, so an entry of weight 0 never is.
    """
    cdf = weights.to(torch.float64).cumsum_(dim=-1)
    target = (uniform * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=weights.shape[-1] - 1)


def _sample_candidates(
    x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor | None, uniform: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with top-k or top-p: work on each row's best ``NUM_CANDIDATES`` (or ``k``) logits only.

    Returns the drawn tokens and, per row, whether the candidates sufficed: a top-p row without
    top-k whose candidates hold less than ``p`` of the mass (a flat distribution) must be redone
    by ``_sample_full``.
    """
    vocab_size = x.shape[-1]
    k_row = torch.where(top_k > 0, top_k, NUM_CANDIDATES).clamp_(max=vocab_size)
    values, indices = x.topk(int(k_row.max()), dim=-1)  # [R, K], best first
    positions = torch.arange(values.shape[-1], device=x.device)
    dropped = positions.unsqueeze(0) >= k_row.unsqueeze(1)
    if min_p is not None:
        # p >= min_p * p_max  <=>  l >= l_max + log(min_p) (no softmax needed; 0 is off)
        min_logit = values[:, :1] + torch.log(min_p).unsqueeze(1)
        dropped |= values < min_logit
    values = values.masked_fill(dropped, -math.inf)

    # Top-p is over the distribution left by top-k and min-p (as vLLM and HF do): with top-k
    # that is the candidates; without, the whole row after min-p.
    log_total = values.logsumexp(dim=-1, keepdim=True)
    no_k = (top_k == 0).nonzero().squeeze(1)
    if no_k.numel():
        rest = x if no_k.numel() == x.shape[0] else x[no_k]
        if min_p is not None:
            rest = rest.masked_fill(rest < min_logit[no_k], -math.inf)
        log_total[no_k] = rest.logsumexp(dim=-1, keepdim=True)
    probs = (values - log_total).exp()
    cumulative = probs.cumsum(dim=-1)
    # Keep while the better tokens hold less than p; ties with the last kept logit stay.
    keep = ((cumulative - probs) < top_p.unsqueeze(1)) | (top_p >= 1).unsqueeze(1)
    keep[:, 0] = True
    last = values.gather(1, keep.sum(dim=-1, keepdim=True) - 1)
    weights = probs.masked_fill(values < last, 0.0)
    ok = (top_k > 0) | (top_p >= 1) | (cumulative[:, -1] >= top_p) | (k_row == vocab_size)
    return indices.gather(1, _invert_cdf(weights, uniform).unsqueeze(1)).squeeze(1), ok


def _sample_full(
    x: torch.Tensor, top_p: torch.Tensor | None, min_p: torch.Tensor | None, uniform: torch.Tensor
) -> torch.Tensor:
    """Rows drawn over the whole vocabulary: no top-k, and top-p only for rows whose candidates
    fell short (``None``: no row needs that filter)."""
    if min_p is not None:
        x = x.masked_fill(x < x.amax(dim=-1, keepdim=True) + torch.log(min_p).unsqueeze(1), -math.inf)
    if top_p is not None:
        ordered = x.sort(dim=-1, descending=True).values
        probs = ordered.softmax(dim=-1)
        keep = ((probs.cumsum(dim=-1) - probs) < top_p.unsqueeze(1)) | (top_p >= 1).unsqueeze(1)
        keep[:, 0] = True
        last = ordered.gather(1, keep.sum(dim=-1, keepdim=True) - 1)
        x = x.masked_fill(x < last, -math.inf)
    return _invert_cdf(x.softmax(dim=-1), uniform)


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition, frequency and presence penalties, then ``logit_bias``; ``logits`` itself is
    never modified (a new tensor is returned when anything applies)."""
    if batch.seen_mask is None and batch.output_counts is None and batch.bias_index is None:
        return logits
    logits = logits.clone()
    if batch.seen_mask is not None:
        penalty = batch.repetition_penalty  # [S, 1]; 1.0 on rows without
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(batch.seen_mask, penalised, logits)
    if batch.output_counts is not None:
        counts = batch.output_counts
        logits -= counts * batch.frequency_penalty + (counts > 0).float() * batch.presence_penalty
    if batch.bias_index is not None:
        logits.index_put_(batch.bias_index, batch.bias_value, accumulate=True)
    return logits


def apply_token_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> torch.Tensor:
    """``logits [S, V]`` with the tokens ``bitmask`` forbids on ``rows`` set to -inf (a new tensor;
    bit ``t % 32`` of word ``t // 32`` set: token ``t`` allowed). Other rows are left alone."""
    vocab_size = logits.shape[-1]
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).reshape(len(rows), -1)[:, :vocab_size].bool()
    index = torch.tensor(rows, device=logits.device)
    return logits.index_put((index,), logits[index].masked_fill(~allowed.to(logits.device), -math.inf))


def _output(tokens: torch.Tensor, raw_logprobs: torch.Tensor | None, batch: SamplingBatch) -> SampleOutput:
    token_ids = tokens.tolist()  # a device sync (the other: which top-p rows need the full path)
    if raw_logprobs is None:
        return SampleOutput(token_ids=token_ids)
    chosen = raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
    n_max = max(batch.num_top_logprobs)
    if n_max == 0:
        return SampleOutput(token_ids=token_ids, logprobs=chosen, top_logprobs=[[] for _ in token_ids])
    values, indices = raw_logprobs.topk(n_max, dim=-1)
    values, indices = values.tolist(), indices.tolist()
    top = [
        list(zip(indices[row][:n], values[row][:n], strict=True))
        for row, n in enumerate(batch.num_top_logprobs)
    ]
    return SampleOutput(token_ids=token_ids, logprobs=chosen, top_logprobs=top)
