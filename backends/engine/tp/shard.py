"""Megatron-style sharding of a built ``CausalLM`` for one tensor-parallel rank.

The model is loaded whole (``loader.load_model``), then each rank keeps its slice:

- attention: whole GQA groups per rank. With ``world <= num_kv_heads`` the KV heads are split as
  evenly as possible, uneven when they do not divide (SmolLM2, 3 KV heads on 2 ranks: rank 0 keeps
  KV heads 0-1 and q heads 0-5, rank 1 keeps KV head 2 and q heads 6-8). With more ranks than KV
  heads, each KV head is replicated on ``world / num_kv_heads`` ranks that split its q heads.
  ``qkv_proj`` is column parallel (this rank's q, k and v rows), ``o_proj`` row parallel (the
  matching input columns), followed by one all-reduce.
- MLP: ``gate_up_proj`` column parallel, ``down_proj`` row parallel (one all-reduce), the
  intermediate dimension split in whole quantization groups.
- mixture of experts (``moe.SparseMoE``): every expert sliced as the dense MLP is, the router
  replicated. The experts' partial sums are added up over the experts first and all-reduced
  once per layer (``RowParallelMoE``): one collective whatever the routing, so a rank never
  waits on a collective another rank's routing skipped.
- embedding and output projection: vocabulary parallel. Each rank keeps ``~V / world`` rows; the
  embedding lookup zeroes the ids it does not own and all-reduces, the logits of every rank's
  rows are all-gathered. Each rank then holds about ``1 / world`` of every weight.

Quantized weights stay quantized: column slices take whole output rows, row slices take whole
groups of the input dimension (``ValueError`` when a boundary falls inside a group) and are packed
again for the target device with ``quant.make_linear``. Norms and rotary frequencies are
replicated. Scales pass through ``to_data()`` unchanged, so a rank's slice computes exactly what
the same rows and columns compute unsharded; only the all-reduce's summation order differs.
"""

from __future__ import annotations

from typing import Protocol

import msgspec
import torch
from torch import Tensor, nn

from backends.engine.model.config import ModelConfig, UnsupportedModelError
from backends.engine.model.loader import return_freed_memory
from backends.engine.model.quant import (
    ConcatLinear,
    DenseLinear,
    Int4Data,
    Int4Linear,
    Int8Data,
    Int8Linear,
    WeightData,
    cat_rows,
    make_linear,
)

Range = tuple[int, int]  # [start, stop)


class Collectives(Protocol):
    """What sharded modules need from the process group (``tp_comm.TPGroup``)."""

    rank: int
    world_size: int

    def all_reduce(self, x: Tensor) -> Tensor: ...

    def all_gather(self, x: Tensor) -> list[Tensor]: ...


def split_evenly(n: int, parts: int, unit: int = 1) -> list[Range]:
    """``[0, n)`` in ``parts`` contiguous ranges of whole ``unit``s, the first ones larger by one unit."""
    if n % unit:
        raise ValueError(f"{n} is not a multiple of {unit}")
    base, extra = divmod(n // unit, parts)
    ranges, start = [], 0
    for i in range(parts):
        stop = start + (base + (i < extra)) * unit
        ranges.append((start, stop))
        start = stop
    return ranges


class ShardPlan(msgspec.Struct, frozen=True, kw_only=True):
    """What rank ``rank`` of ``world_size`` keeps: q heads, KV heads, MLP columns, vocabulary rows."""

    rank: int
    world_size: int
    q_heads: Range
    kv_heads: Range
    ffn: Range
    vocab: Range
    vocab_sizes: tuple[int, ...]  # rows of every rank, to reassemble the logits

    @classmethod
    def build(cls, config: ModelConfig, rank: int, world_size: int, ffn_unit: int = 1) -> ShardPlan:
        heads = plan_heads(config.num_heads, config.num_kv_heads, world_size)
        if config.intermediate_size % ffn_unit or config.intermediate_size // ffn_unit < world_size:
            raise UnsupportedModelError(
                f"the MLP's {config.intermediate_size} columns do not split into groups of {ffn_unit} "
                f"over {world_size} ranks"
            )
        ffn = split_evenly(config.intermediate_size, world_size, ffn_unit)
        vocab = split_evenly(config.vocab_size, world_size)
        q, kv = heads[rank]
        return cls(
            rank=rank, world_size=world_size, q_heads=q, kv_heads=kv, ffn=ffn[rank], vocab=vocab[rank],
            vocab_sizes=tuple(b - a for a, b in vocab),
        )  # fmt: skip

    @property
    def num_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    def qkv_rows(self, config: ModelConfig) -> list[Range]:
        """Output rows of the fused ``qkv_proj`` this rank keeps: its q heads, then its k and v heads."""
        (qa, qb), (ka, kb) = self.q_heads, self.kv_heads
        hd, q_size, kv_size = config.head_dim, config.q_size, config.kv_size
        k, v = q_size, q_size + kv_size  # where the k and v rows start
        return [(qa * hd, qb * hd), (k + ka * hd, k + kb * hd), (v + ka * hd, v + kb * hd)]

    def attn_cols(self, config: ModelConfig) -> Range:
        """Input columns of ``o_proj`` this rank keeps: its q heads' attention outputs."""
        qa, qb = self.q_heads
        return qa * config.head_dim, qb * config.head_dim

    def gate_up_rows(self, config: ModelConfig) -> list[Range]:
        """Output rows of the fused ``gate_up_proj`` this rank keeps: its MLP columns of gate, then of up."""
        (fa, fb), inter = self.ffn, config.intermediate_size
        return [(fa, fb), (inter + fa, inter + fb)]

    def local_config(self, config: ModelConfig) -> ModelConfig:
        """``config`` with this rank's head counts: what sizes its KV cache."""
        return msgspec.structs.replace(config, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads)


def plan_heads(num_heads: int, num_kv_heads: int, world_size: int) -> list[tuple[Range, Range]]:
    """``[(q_heads, kv_heads)]`` per rank; every rank's q heads map onto its KV heads in equal groups."""
    group = num_heads // num_kv_heads
    if world_size <= num_kv_heads:
        kv = split_evenly(num_kv_heads, world_size)
        return [((a * group, b * group), (a, b)) for a, b in kv]
    replicas = world_size // num_kv_heads
    if world_size % num_kv_heads or group % replicas:
        raise UnsupportedModelError(
            f"tensor_parallel={world_size} cannot split {num_heads} heads over {num_kv_heads} KV heads: use at most "
            f"{num_kv_heads} ranks, or a multiple of {num_kv_heads} that divides the {group} q heads of a group"
        )
    per = group // replicas
    plans = []
    for rank in range(world_size):
        kv = rank // replicas
        start = kv * group + (rank % replicas) * per
        plans.append(((start, start + per), (kv, kv + 1)))
    return plans


# --------------------------------------------------------------------------------------------
# parallel modules


class RowParallelLinear(nn.Module):
    """This rank's input columns of a linear layer; the partial outputs are summed across ranks."""

    def __init__(self, inner: nn.Module, comm: Collectives) -> None:
        super().__init__()
        self.inner = inner
        self.comm = comm
        self.in_features = inner.in_features
        self.out_features = inner.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.comm.all_reduce(self.inner(x))


class RowParallelMoE(nn.Module):
    """A mixture of experts whose experts hold this rank's MLP columns: its output, their partial
    sums, summed across ranks."""

    def __init__(self, moe: nn.Module, comm: Collectives) -> None:
        super().__init__()
        self.moe = moe
        self.comm = comm

    def forward(self, x: Tensor) -> Tensor:
        return self.comm.all_reduce(self.moe(x))


class VocabParallelEmbedding(nn.Module):
    """Rows ``vocab`` of the token embedding / output projection (tied or not)."""

    def __init__(self, inner: nn.Module, vocab: Range, vocab_sizes: tuple[int, ...], comm: Collectives) -> None:
        super().__init__()
        self.inner = inner
        self.start, self.stop = vocab
        self.vocab_sizes = vocab_sizes
        self.comm = comm
        self.in_features = inner.in_features
        self.out_features = sum(vocab_sizes)

    def embed(self, ids: Tensor) -> Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.stop - self.start)
        rows = self.inner.embed(local.clamp(0, self.stop - self.start - 1))  # [T, D]
        return self.comm.all_reduce(rows.masked_fill(outside.unsqueeze(-1), 0))

    def forward(self, hidden: Tensor) -> Tensor:
        """Logits over the whole vocabulary ``[S, V]`` on every rank."""
        local = self.inner(hidden)  # [S, V_rank]
        width = max(self.vocab_sizes)
        if local.shape[1] < width:  # all-gather wants equal shapes
            local = torch.nn.functional.pad(local, (0, width - local.shape[1]))
        parts = self.comm.all_gather(local.contiguous())
        return torch.cat([p[:, :n] for p, n in zip(parts, self.vocab_sizes, strict=True)], dim=-1)


# --------------------------------------------------------------------------------------------
# slicing quantized and dense linears


def _compute_dtype(module: nn.Module) -> torch.dtype:
    if isinstance(module, (Int4Linear, Int8Linear)):
        return module.compute_dtype
    return module.weight.dtype


def _data(module: nn.Module) -> WeightData:
    if isinstance(module, (Int4Linear, Int8Linear)):
        return module.to_data()
    if isinstance(module, DenseLinear):
        return module.weight
    raise UnsupportedModelError(f"cannot shard a {type(module).__name__}")


def _take_rows(data: WeightData, ranges: list[Range]) -> WeightData:
    parts = [data[a:b] if isinstance(data, Tensor) else data.rows(slice(a, b)) for a, b in ranges]
    return _own(parts[0]) if len(parts) == 1 else cat_rows(parts)


def _own(data: WeightData) -> WeightData:
    """A copy that does not keep the whole unsharded storage alive (a row slice is a view)."""
    if isinstance(data, Tensor):
        return data.clone()
    return msgspec.structs.replace(
        data, **{f: v.clone() for f in ("q", "scales", "zeros") if (v := getattr(data, f, None)) is not None}
    )


def _take_cols(data: WeightData, start: int, stop: int) -> WeightData:
    if isinstance(data, Tensor):
        return data[:, start:stop].contiguous()
    k = data.q.shape[1]
    gs = data.group_size
    if isinstance(data, Int8Data) and gs == k and data.zeros is None:  # per channel: the row scales apply to any columns
        return Int8Data(q=data.q[:, start:stop].contiguous(), scales=data.scales, group_size=stop - start)
    if start % gs or stop % gs:
        raise UnsupportedModelError(
            f"a row-parallel slice [{start}, {stop}) splits a quantization group of {gs}: "
            "choose a tensor_parallel size whose head and MLP splits are multiples of the group size"
        )
    groups = slice(start // gs, stop // gs)
    if isinstance(data, Int4Data):
        return Int4Data(
            q=data.q[:, start:stop].contiguous(), scales=data.scales[:, groups].contiguous(),
            zeros=data.zeros[:, groups].contiguous(), group_size=gs,
        )  # fmt: skip
    zeros = None if data.zeros is None else data.zeros[:, groups].contiguous()
    return Int8Data(q=data.q[:, start:stop].contiguous(), scales=data.scales[:, groups].contiguous(), group_size=gs,
                    zeros=zeros)  # fmt: skip


def column_slice(module: nn.Module, ranges: list[Range], device: torch.device) -> nn.Module:
    """The output rows ``ranges`` (concatenated) of ``module``, packed for ``device``."""
    if isinstance(module, ConcatLinear):  # mixed formats: slice each part by its own rows
        parts, offset = [], 0
        for part in module.parts:
            n = part.out_features
            mine = [(max(a, offset) - offset, min(b, offset + n) - offset) for a, b in ranges]
            mine = [(a, b) for a, b in mine if a < b]
            if mine:
                parts.append(column_slice(part, mine, device))
            offset += n
        return parts[0] if len(parts) == 1 else ConcatLinear(parts)
    bias = module.bias
    return make_linear(
        _take_rows(_data(module), ranges),
        bias=None if bias is None else torch.cat([bias[a:b] for a, b in ranges]),
        dtype=_compute_dtype(module), device=device, kernels=getattr(module, "kernels", None),
    )  # fmt: skip


def row_slice(module: nn.Module, start: int, stop: int, device: torch.device, *, keep_bias: bool) -> nn.Module:
    """The input columns ``[start, stop)`` of ``module``; its bias only where ``keep_bias`` (one rank)."""
    if isinstance(module, ConcatLinear):
        return ConcatLinear([row_slice(p, start, stop, device, keep_bias=keep_bias) for p in module.parts])
    return make_linear(
        _take_cols(_data(module), start, stop),
        bias=module.bias if keep_bias else None,
        dtype=_compute_dtype(module), device=device, kernels=getattr(module, "kernels", None),
    )  # fmt: skip


def _group_size(module: nn.Module) -> int:
    if isinstance(module, ConcatLinear):
        return max(_group_size(p) for p in module.parts)
    if isinstance(module, Int8Linear) and module.per_channel:
        return 1
    return getattr(module, "group_size", 1)


# --------------------------------------------------------------------------------------------
# the model


def shard_model(model: nn.Module, comm: Collectives, device: torch.device | str = "cpu") -> ShardPlan:
    """Replace ``model``'s weights by this rank's slices, in place, moving them to ``device``."""
    config: ModelConfig = model.config
    device = torch.device(device)
    first = model.layers[0]
    first_mlp = first.mlp.experts[0] if config.is_moe else first.mlp
    plan = ShardPlan.build(config, comm.rank, comm.world_size, _group_size(first_mlp.down_proj))
    qkv_rows, attn_cols = plan.qkv_rows(config), plan.attn_cols(config)
    inter = config.intermediate_size
    is_first = comm.rank == 0
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = column_slice(attn.qkv_proj, qkv_rows, device)
        o_proj = row_slice(attn.o_proj, *attn_cols, device, keep_bias=is_first)
        attn.o_proj = RowParallelLinear(o_proj, comm)
        attn.num_heads, attn.num_kv_heads = plan.num_heads, plan.num_kv_heads
        attn.qk_size = (plan.num_heads + plan.num_kv_heads) * config.head_dim
        if config.is_moe:  # each expert's partial sum, all-reduced once for the layer
            for expert in mlp.experts:
                _shard_mlp(expert, plan.ffn, inter, device, keep_bias=is_first)
            mlp.router.to(device)
            layer.mlp = RowParallelMoE(mlp, comm)
        else:
            _shard_mlp(mlp, plan.ffn, inter, device, keep_bias=is_first)
            mlp.down_proj = RowParallelLinear(mlp.down_proj, comm)
        for norm in (layer.attn_norm, layer.ffn_norm):
            norm.to(device)
    tied = model.lm_head is model.embed_tokens
    model.embed_tokens = VocabParallelEmbedding(
        column_slice(model.embed_tokens, [plan.vocab], device), plan.vocab, plan.vocab_sizes, comm
    )
    if tied:
        model.lm_head = model.embed_tokens
    else:
        model.lm_head = VocabParallelEmbedding(
            column_slice(model.lm_head, [plan.vocab], device), plan.vocab, plan.vocab_sizes, comm
        )
    model.norm.to(device)
    model.inv_freq = model.inv_freq.to(device)
    return_freed_memory()  # the unsharded weights just dropped
    return plan


def _shard_mlp(mlp: nn.Module, ffn: Range, inter: int, device: torch.device, *, keep_bias: bool) -> None:
    """``mlp``'s columns ``ffn`` of its intermediate dimension, in place: ``gate_up_proj`` column
    parallel, ``down_proj`` row parallel (its partial sums for the caller to all-reduce)."""
    fa, fb = ffn
    mlp.gate_up_proj = column_slice(mlp.gate_up_proj, [(fa, fb), (inter + fa, inter + fb)], device)
    mlp.down_proj = row_slice(mlp.down_proj, fa, fb, device, keep_bias=keep_bias)
    mlp.intermediate_size = fb - fa


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers ``model`` holds (each storage counted once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total
