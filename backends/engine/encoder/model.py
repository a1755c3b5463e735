"""BERT-family encoders: bidirectional attention over a batch of whole inputs, no KV cache.

One module covers BERT and RoBERTa / XLM-R (the same layer; RoBERTa's positions start after its
padding id, ``EncoderConfig.position_offset``). Post-norm layers::

    h = LN(h + Wo · attention(Wqkv · h))
    h = LN(h + W2 · gelu(W1 · h))

Weights and matmuls are float32 (the reference) or bfloat16 (``dtype = "bfloat16"``: the
linear layers, attention and activation, while the residual stream and the layer norms stay
float32 — on this project's AVX-512 BF16 CPU a layer's matmuls ran 2.5-3.5x faster, and vectors
kept cosine ≥ 0.99997 to float32's).

The step's batch is padded ``[B, L]`` (the scheduler groups inputs of similar length, so little is
padding), but the linear layers — nearly all of the work — run on the real tokens only: ``keep``
picks them out once after the embedding, and attention alone scatters them back to ``[B, L]``
for ``scaled_dot_product_attention`` with a key-padding mask. A batch whose inputs all have one
length skips the gather, the scatter and the mask.
"""

from __future__ import annotations

import msgspec
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class EncoderConfig(msgspec.Struct, frozen=True, kw_only=True):
    """What the forward needs from a Hugging Face ``config.json`` (``model_type`` bert, roberta,
    xlm-roberta)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    #: positions start here (RoBERTa: pad_token_id + 1), so usable length is max_position_embeddings - offset
    position_offset: int = 0
    #: a sequence-classification model (``*ForSequenceClassification``: a cross-encoder, a
    #: classifier): its labels, in the order of its logits; empty for an embedding model
    labels: tuple[str, ...] = ()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings - self.position_offset


_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),  # exact (erf), as BERT and sentence-transformers compute it
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class EncoderLayer(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.qkv: nn.Module = nn.Linear(h, 3 * h)  # query, key, value rows concatenated: one matmul
        self.attn_out: nn.Module = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.ffn_in: nn.Module = nn.Linear(h, config.intermediate_size)
        self.ffn_out: nn.Module = nn.Linear(config.intermediate_size, h)
        self.ffn_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: Tensor, batch: Batch) -> Tensor:
        """``x[T, H]``: the batch's real tokens, input by input, float32 (the residual stream); the
        matmuls, attention and activation run in ``compute_dtype``."""
        dtype = self.compute_dtype
        # attention: only it sees the padded [B, L] layout
        qkv = batch.pad(self.qkv(x.to(dtype)))  # [B, L, 3H]
        b, seq_len, _ = qkv.shape
        q, k, v = qkv.view(b, seq_len, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.key_mask)  # [B, nh, L, hd]
        a = batch.unpad(a.transpose(1, 2).reshape(b, seq_len, -1))  # [T, H]
        x = self.attn_norm(x + self.attn_out(a).float())
        # feed-forward, on the real tokens only
        return self.ffn_norm(x + self.ffn_out(self.act(self.ffn_in(x.to(dtype)))).float())

    @property
    def compute_dtype(self) -> torch.dtype:
        weight = getattr(self.qkv, "weight", None)  # an Int8Linear computes in its input's dtype
        return weight.dtype if weight is not None else getattr(self.qkv, "compute_dtype", torch.float32)


class Batch:
    """A step's inputs: ``input_ids[B, L]`` right-padded, ``lengths[B]``, and for text pairs
    ``token_types[B, L]`` (1 from the second text on; None: all 0); how the real tokens
    (``T = sum(lengths)``) map to and from the padded layout."""

    def __init__(self, input_ids: Tensor, lengths: Tensor, token_types: Tensor | None = None) -> None:
        b, seq_len = input_ids.shape
        self.input_ids = input_ids
        self.lengths = lengths
        self.token_types = token_types
        self.shape = (b, seq_len)
        self.is_uniform = bool((lengths == seq_len).all())
        if self.is_uniform:
            self.keep: Tensor | None = None
            self.key_mask: Tensor | None = None
        else:
            valid = torch.arange(seq_len).unsqueeze(0) < lengths.unsqueeze(1)  # [B, L]
            self.keep = valid.view(-1).nonzero().squeeze(1)  # [T] flat indices of real tokens
            self.key_mask = valid.view(b, 1, 1, seq_len)  # True: attend

    def unpad(self, padded: Tensor) -> Tensor:
        """``[B, L, D]`` → ``[T, D]``."""
        flat = padded.reshape(-1, padded.shape[-1])
        return flat if self.keep is None else flat.index_select(0, self.keep)

    def pad(self, x: Tensor) -> Tensor:
        """``[T, D]`` → ``[B, L, D]``; padding rows are zero (masked out as keys)."""
        b, seq_len = self.shape
        if self.keep is None:
            return x.view(b, seq_len, -1)
        out = x.new_zeros(b * seq_len, x.shape[-1])
        out.index_copy_(0, self.keep, x)
        return out.view(b, seq_len, -1)

    def segment_ids(self) -> Tensor:
        """``[T]``: which input each real token belongs to (for pooling)."""
        return torch.repeat_interleave(torch.arange(self.shape[0]), self.lengths)


class Encoder(nn.Module):
    """Token embeddings → layers → per-token hidden states ``[T, H]`` (the transformer's
    ``last_hidden_state`` without its padding)."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, h)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(max(config.type_vocab_size, 1), h)
        self.embed_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, batch: Batch) -> Tensor:
        _, seq_len = batch.shape
        positions = torch.arange(seq_len) + self.config.position_offset
        # single texts: token type 0 throughout, as sentence-transformers encodes them
        types = self.token_type_embeddings.weight[0] if batch.token_types is None else self.token_type_embeddings(batch.token_types)
        e = self.word_embeddings(batch.input_ids) + self.position_embeddings(positions) + types
        x = self.embed_norm(batch.unpad(e))  # [T, H]
        for layer in self.layers:
            x = layer(x, batch)
        return x


class ClassificationHead(nn.Module):
    """BERT's sequence-classification head: ``classifier(tanh(pooler(h[CLS])))`` -> logits; RoBERTa's
    (``dense`` -> tanh -> ``out_proj`` on ``<s>``) has the same shape, under other weight names."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out = nn.Linear(config.hidden_size, len(config.labels))

    def forward(self, first: Tensor) -> Tensor:
        """``first[B, H]``: each input's first token's hidden state -> ``[B, labels]``."""
        return self.out(torch.tanh(self.dense(first)))


def num_parameters_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))

