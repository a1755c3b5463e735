"""The native prefill-attention kernel (``native/csrc/prefill_attention.c``) against exact causal
attention in float64 over the same paged cache: whole prompts, chunks after a cached prefix,
steps that mix prefills with decodes, odd shapes; its invariance to how a step is made up; and
the fallback to torch's SDPA where it refuses."""

from __future__ import annotations

import random

import pytest
import torch

from backends.engine.model import attention
from backends.engine.model.attention import AttentionMetadata, AttentionPlan, paged_attention

pytestmark = pytest.mark.usefixtures("two_threads")


@pytest.fixture
def kernels(native_matmuls, monkeypatch):  # type: ignore[no-untyped-def]
    """The kernels, where this build has prefill attention (the AVX-512 BF16 variant), given to
    every ``Case``; elsewhere torch's SDPA runs it (test_attention.py)."""
    if not native_matmuls.has_prefill_attention:
        pytest.skip(f"the {native_matmuls.variant} build has no prefill attention kernel: torch's SDPA runs it")
    monkeypatch.setattr(Case, "kernels", native_matmuls)
    return native_matmuls


@pytest.fixture
def two_threads():  # type: ignore[no-untyped-def]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


class Case:
    """A step over shuffled cache blocks: sequence i computes ``q_lens[i]`` new tokens, the last
    of its ``seq_lens[i]`` positions; the cache already holds every position's K/V."""

    kernels = None  # the native kernels ``run`` passes to ``paged_attention`` (the fixture sets them)

    def __init__(self, seed: int, q_lens: list[int], seq_lens: list[int], heads: int = 9, kv_heads: int = 3,
                 head_dim: int = 64, block_size: int = 16) -> None:  # fmt: skip
        rng = random.Random(seed)
        gen = torch.Generator().manual_seed(seed)
        self.heads, self.kv_heads, self.head_dim, self.block_size = heads, kv_heads, head_dim, block_size
        self.q_lens, self.seq_lens = q_lens, seq_lens
        num_blocks = sum(-(-n // block_size) for n in seq_lens) + 3
        self.k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).bfloat16()
        self.v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).bfloat16()
        free = list(range(num_blocks))
        rng.shuffle(free)
        self.tables = [[free.pop() for _ in range(-(-n // block_size))] for n in seq_lens]
        self.q = torch.randn(sum(q_lens), heads, head_dim, generator=gen).bfloat16()

    def slots(self, i: int) -> list[int]:
        bs = self.block_size
        return [self.tables[i][p // bs] * bs + p % bs for p in range(self.seq_lens[i])]

    def run(self) -> torch.Tensor:
        """``paged_attention`` with the cache already written (as the fused layer calls it)."""
        meta = AttentionMetadata.from_lists(
            query_lens=self.q_lens, seq_lens=self.seq_lens, block_tables=self.tables, block_size=self.block_size
        )
        plan = AttentionPlan.build(meta, self.block_size)
        flat_k = self.k_cache.view(-1, self.kv_heads, self.head_dim)
        flat_v = self.v_cache.view(-1, self.kv_heads, self.head_dim)
        k, v = flat_k[meta.slot_mapping], flat_v[meta.slot_mapping]
        scale = self.head_dim**-0.5
        return paged_attention(self.q, k, v, self.k_cache, self.v_cache, plan, scale, write_kv=False, kernels=self.kernels)

    def exact(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float64 causal attention, and sum_t p_t |v_t| per output (the scale of the error that
        rounding the probabilities to bfloat16 may make)."""
        outs, scales = [], []
        row = 0
        group = self.heads // self.kv_heads
        for i, (q_len, seq_len) in enumerate(zip(self.q_lens, self.seq_lens, strict=True)):
            slots = self.slots(i)
            k = self.k_cache.view(-1, self.kv_heads, self.head_dim)[slots].double().repeat_interleave(group, 1)
            v = self.v_cache.view(-1, self.kv_heads, self.head_dim)[slots].double().repeat_interleave(group, 1)
            q = self.q[row : row + q_len].double()
            scores = torch.einsum("qhd,khd->hqk", q, k) * self.head_dim**-0.5
            pos = torch.arange(seq_len - q_len, seq_len).unsqueeze(1)
            scores = scores.masked_fill(torch.arange(seq_len).unsqueeze(0) > pos, float("-inf"))
            p = scores.softmax(-1)
            outs.append(torch.einsum("hqk,khd->qhd", p, v).reshape(q_len, -1))
            scales.append(torch.einsum("hqk,khd->qhd", p, v.abs()).reshape(q_len, -1))
            row += q_len
        return torch.cat(outs), torch.cat(scales)


def spy_on(kernels, monkeypatch) -> list[int]:  # type: ignore[no-untyped-def]
    statuses: list[int] = []
    real = kernels.prefill_attention_bf16

    def spy(*args):  # type: ignore[no-untyped-def]
        statuses.append(real(*args))
        return statuses[-1]

    monkeypatch.setattr(kernels, "prefill_attention_bf16", spy)
    return statuses


@pytest.mark.parametrize(
    ("seed", "q_lens", "seq_lens", "shape"),
    [
        (0, [512], [512], (9, 3, 64, 16)),  # SmolLM2, one prompt
        (1, [200, 37, 1, 250, 1], [200, 300, 50, 900, 17], (9, 3, 64, 16)),  # chunks after prefixes, decodes
        (2, [5, 17, 33], [5, 40, 1000], (8, 2, 128, 32)),  # head_dim 128
        (3, [31, 2], [31, 64], (4, 4, 32, 4)),  # no GQA, head_dim 32
        (4, [70, 9], [70, 100], (16, 1, 64, 1)),  # the largest group (MQA), block size 1
        (5, [2, 3], [2, 3], (9, 3, 64, 16)),  # shorter than a tile
    ],
)
def test_native_prefill_matches_exact_attention(kernels, monkeypatch, seed, q_lens, seq_lens, shape) -> None:  # type: ignore[no-untyped-def]
    statuses = spy_on(kernels, monkeypatch)
    heads, kv_heads, head_dim, block_size = shape
    case = Case(seed, q_lens, seq_lens, heads, kv_heads, head_dim, block_size)
    out = case.run().double()
    assert statuses == [0], "the native kernel did not run"
    exact, scale = case.exact()
    prefill_rows = torch.cat([torch.full((n,), n > 1) for n in q_lens])
    # probabilities rounded to bfloat16 (as torch's flash attention does) move the sum by at most
    # half a bfloat16 step of sum p|v|; the output is rounded once more
    bound = (scale + exact.abs()) * 2**-8 * 1.01 + 1e-6
    err = (out - exact).abs()
    assert (err[prefill_rows] <= bound[prefill_rows]).all(), err.max()

    # torch's SDPA on the same inputs makes errors of the same size
    with monkeypatch.context() as m:
        m.setattr(attention, "_native_prefill", lambda *a: False)
        sdpa = case.run().double()
    native_err, sdpa_err = err[prefill_rows].mean(), (sdpa - exact).abs()[prefill_rows].mean()
    assert native_err <= 1.25 * sdpa_err, (native_err, sdpa_err)


def test_rows_do_not_depend_on_the_rest_of_the_step(kernels) -> None:  # type: ignore[no-untyped-def]
    """A prompt's rows are bit for bit the same whole, chunked after a cached prefix, or batched
    with other prefills and decodes: every sum runs over key positions in a fixed order."""
    whole = Case(7, [300], [300])
    alone = whole.run()

    chunk = Case(7, [300], [300])  # the same cache and queries
    chunk.q_lens, chunk.seq_lens, chunk.q = [120], [300], whole.q[180:]
    assert torch.equal(chunk.run(), alone[180:])

    mixed = Case(7, [300], [300])
    other = Case(8, [50, 1], [80, 90])
    # the other sequences' blocks live past ours in one shared cache
    offset = mixed.k_cache.shape[0]
    mixed.k_cache = torch.cat([mixed.k_cache, other.k_cache])
    mixed.v_cache = torch.cat([mixed.v_cache, other.v_cache])
    mixed.tables = [[b + offset for b in other.tables[0]], whole.tables[0], [b + offset for b in other.tables[1]]]
    mixed.q_lens, mixed.seq_lens = [50, 300, 1], [80, 300, 90]
    mixed.q = torch.cat([other.q[:50], whole.q, other.q[50:]])
    assert torch.equal(mixed.run()[50:350], alone)


def test_bad_block_id_is_refused_and_torch_answers(kernels, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    statuses = spy_on(kernels, monkeypatch)
    case = Case(9, [40, 20], [40, 60])
    out = torch.full((60, 9 * 64), 7.0).bfloat16()
    meta = AttentionMetadata.from_lists(query_lens=case.q_lens, seq_lens=case.seq_lens, block_tables=case.tables, block_size=16)
    plan = AttentionPlan.build(meta, 16)
    assert plan.prefill_tables is not None
    plan.prefill_tables.block_tables[1, 0] = case.k_cache.shape[0]  # one past the last block
    assert not attention._native_prefill(kernels, case.q, case.k_cache, case.v_cache, plan, 0.125, out)
    assert statuses == [-1]
    assert torch.equal(out, torch.full((60, 9 * 64), 7.0).bfloat16())  # nothing written

    # through paged_attention the step still gets an answer, from SDPA
    statuses.clear()
    good = case.run().double()
    assert statuses == [0]
    exact, scale = case.exact()
    assert ((good - exact).abs() <= (scale + exact.abs()) * 2**-8 * 1.01 + 1e-6).all()


def test_float32_and_unsupported_head_dim_use_sdpa(kernels, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    statuses = spy_on(kernels, monkeypatch)
    case = Case(10, [24], [24], heads=6, kv_heads=2, head_dim=72)  # not 32, 64 or 128
    out = case.run().double()
    assert statuses == [-1]
    exact, scale = case.exact()
    assert ((out - exact).abs() <= (scale + exact.abs()) * 2**-8 * 1.01 + 1e-6).all()

    statuses.clear()
    case = Case(11, [24], [24])
    case.q, case.k_cache, case.v_cache = case.q.float(), case.k_cache.float(), case.v_cache.float()
    out = case.run().double()
    assert statuses == []  # float32 never reaches the kernel
    exact, _ = case.exact()
    torch.testing.assert_close(out, exact, atol=1e-5, rtol=1e-5)
