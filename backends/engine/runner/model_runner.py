"""``ModelRunner``: one scheduler step in, one sampled token per sampling sequence out.

It owns the paged KV cache and the per-sequence sampling state (seeded generators), turns a
``SchedulerOutput`` into the flattened batch of docs/architecture.md, runs the model, computes
logits only for the rows that sample, and samples them.
"""

from __future__ import annotations

from typing import Any

import msgspec
import torch

from backends.engine.model.attention import AttentionMetadata, allocate_kv_cache
from backends.engine.model.config import ModelConfig
from backends.engine.runner.sampling import (
    MAX_TOP_LOGPROBS,
    SamplingBatch,
    SeqSamplingState,
    is_greedy,
    make_generator,
    sample,
)
from backends.engine.sched.output import SchedulerOutput
from backends.engine.sched.sequence import Sequence
from backends.engine.structured.matchers import Masks, SequenceMatchers


class SampledToken(msgspec.Struct, frozen=True):
    token_id: int
    logprob: float = 0.0
    top_logprobs: tuple[tuple[int, float], ...] = ()


class ModelRunner:
    """Runs steps of ``model`` over a KV cache of ``num_blocks`` blocks of ``block_size`` tokens."""


    def __init__(
        self,
        model: Any,
        config: ModelConfig,
        *,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        seed: int | None = None,
        decode_graphs: int = 0,
        max_model_len: int | None = None,
    ) -> None:
        """``decode_graphs``: on CUDA, the largest decode batch replayed from CUDA graphs (0: none;
        ``model`` is then a ``cuda.model.GpuCausalLM``); ``max_model_len`` bounds their block tables."""
        self.model = model
        self.config = config
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = torch.device(device)
        # graphs' padding rows write into one block past those the scheduler hands out
        extra = 1 if decode_graphs else 0
        self.kv_caches = allocate_kv_cache(config, num_blocks + extra, block_size, dtype, self.device)
        self.graphs = None
        if decode_graphs:
            from backends.engine.cuda.graphs import DecodeGraphs

            width = -(-(max_model_len or config.max_position_embeddings) // block_size)
            self.graphs = DecodeGraphs(
                model, self.kv_caches, max_batch=decode_graphs, max_blocks_per_seq=width, pad_block=num_blocks
            )
            if self.device.type == "cuda":
                self.graphs.capture()
        # unseeded rows share one generator; a seeded choice keeps its own for its whole life
        self._generator = torch.Generator(device=self.device)
        if seed is not None:
            self._generator.manual_seed(seed)
        else:
            self._generator.seed()
        self._seq_generators: dict[int, torch.Generator] = {}
        #: constrained decoding's per-sequence matchers; set by the engine (it has the tokenizer)
        self.matchers: SequenceMatchers | None = None

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def execute(self, out: SchedulerOutput) -> torch.Tensor | None:
        """Run the model on the step; return float32 logits of the sampling rows (or None)."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        seq_lens: list[int] = []
        tables: list[tuple[int, ...]] = []
        sample_rows: list[int] = []
        for sched in out.scheduled:
            input_ids.extend(sched.token_ids)
            positions.extend(sched.positions)
            slots.extend(sched.slot_mapping(bs))
            starts.append(starts[-1] + sched.num_new_tokens)
            seq_lens.append(sched.seq_len)
            tables.append(sched.block_table)
            if sched.do_sample:
                sample_rows.append(starts[-1] - 1)
        if self.graphs is not None and len(sample_rows) == len(seq_lens) == len(input_ids) <= self.graphs.max_batch:
            return self.graphs.run(input_ids, positions, seq_lens, slots, tables)  # a decode-only step
        width = max(len(t) for t in tables)
        padded = [list(t) + [0] * (width - len(t)) for t in tables]
        dev = self.device
        attn = AttentionMetadata(
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
        )
        hidden = self.model(
            torch.tensor(input_ids, dtype=torch.long, device=dev),
            torch.tensor(positions, dtype=torch.long, device=dev),
            attn,
            self.kv_caches,
        )
        if not sample_rows:
            return None
        if len(sample_rows) < hidden.shape[0]:
            hidden = hidden[torch.tensor(sample_rows, device=dev)]
        return self.model.compute_logits(hidden)

    def run(self, out: SchedulerOutput) -> dict[int, SampledToken]:
        """``{seq_id: SampledToken}`` for every ``do_sample`` row of the step."""
        for seq_id in out.finished_seq_ids:
            self._seq_generators.pop(seq_id, None)
        seqs = [s.seq for s in out.scheduled if s.do_sample]
        masks = None
        if self.matchers is not None:
            self.matchers.forget(out.finished_seq_ids)
            masks = self.matchers.start(seqs)  # constrained rows' masks, computed while the forward runs
        logits = self.execute(out)
        if logits is None:
            return {}
        return self.sample(logits, seqs, masks)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence], masks: Masks | None = None) -> dict[int, SampledToken]:
        """Sample one token per row; constrained rows (``SamplingParams.structured``) within their
        grammar (``masks`` from ``matchers.start(seqs)``, computed here when not given)."""
        if masks is None and self.matchers is not None:
            masks = self.matchers.start(seqs)
        states = [
            SeqSamplingState(
                params=seq.sampling,
                prompt_ids=seq.prompt_token_ids,
                output_ids=seq.output_token_ids,
                generator=self._seq_generator(seq),
            )
            for seq in seqs
        ]
        batch = SamplingBatch.build(states, self.vocab_size, self.device)
        if masks is not None:
            batch.token_bitmask = masks.wait()
        result = sample(logits, batch, self._generator)
        if masks is not None:
            assert self.matchers is not None
            rows = masks.rows
            self.matchers.advance([seqs[r] for r in rows], [result.token_ids[r] for r in rows])
        logprobs, tops = result.logprobs, result.top_logprobs
        return {
            seq.seq_id: SampledToken(
                token_id=result.token_ids[row],
                logprob=logprobs[row] if logprobs is not None else 0.0,
                top_logprobs=tuple(tops[row]) if tops is not None else (),
            )
            for row, seq in enumerate(seqs)
        }

    def _seq_generator(self, seq: Sequence) -> torch.Generator | None:
        params = seq.sampling
        if params.seed is None or is_greedy(params):
            return None
        generator = self._seq_generators.get(seq.seq_id)
        if generator is None:
            # choice i of a seeded request: seed + i, so choice 0 equals the n=1 result
            generator = self._seq_generators[seq.seq_id] = make_generator(params.seed + seq.index, self.device)
        return generator
