"""``SparseMoE``: a mixture-of-experts MLP (mixtral, qwen3_moe), in place of a layer's ``MLP``.

Per token: the router's logits over the experts, their softmax in float32, the ``top_k`` most
probable experts, their probabilities renormalised to sum to 1 where the family does
(``norm_topk_prob``: always for Mixtral, a config flag for Qwen3-MoE). The output is the
weighted sum of those experts' SwiGLU MLPs.

Experts run batched by token: the step's ``T * top_k`` (token, expert) pairs are grouped by
expert with one stable sort, each expert that received any runs one matmul pair over its rows,
and the weighted outputs are added back into their tokens' rows (``index_add_``). Each expert is a
plain ``llama.MLP``, so its ``gate_up_proj`` / ``down_proj`` are the loader's linear modules
(int4, int8 or dense, as every other linear) and tensor parallelism slices them as the dense MLP's.

The router stays dense float32 (``[num_experts, hidden]``, small): which experts a token takes is a
discrete choice, and bfloat16 logits would flip near ties against the float32 reference. The
output is float32, added into the float32 residual stream.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from backends.engine.model.config import ModelConfig
from backends.engine.model.quant import DenseLinear


class SparseMoE(nn.Module):
    """``experts``: ``num_experts`` MLP modules (``forward(x[M, D]) -> [M, D]``), set up by the
    caller (``llama.DecoderLayer``), their weights installed by the loader."""

    def __init__(self, config: ModelConfig, experts: Sequence[nn.Module]) -> None:
        super().__init__()
        assert len(experts) == config.num_experts and config.num_experts_per_tok >= 1
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.router: nn.Module = DenseLinear(config.hidden_size, config.num_experts)  # float32 (loader)
        self.experts = nn.ModuleList(experts)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(weights, experts)``, each ``[T, top_k]``: float32 routing weights and expert ids."""
        probs = self.router(x.float()).softmax(dim=-1)  # [T, E]
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, experts

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[T, D]`` in the compute dtype; returns float32 ``[T, D]``."""
        weights, experts = self.route(x)
        flat = experts.view(-1)  # [T * k], token-major
        order = flat.argsort(stable=True)  # the pairs grouped by expert, tokens in order within one
        tokens = order // self.top_k  # the token of each grouped pair
        pair_weights = weights.view(-1)[order].unsqueeze(1)  # [T * k, 1]
        rows = x[tokens]  # [T * k, D]
        # one host sync: how many rows each expert takes (the loop below needs Python ints)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        start = 0
        for expert, n in zip(self.experts, counts, strict=True):
            if n:
                pairs = slice(start, start + n)
                out.index_add_(0, tokens[pairs], expert(rows[pairs]).float() * pair_weights[pairs])
                start += n
        return out
