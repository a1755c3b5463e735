"""``EncoderModel``: a loaded encoder with its tokenizer and sentence-transformers pipeline —
token ids in, one pooled (and normalised, where the model says so) vector per input out."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tokenizers import Tokenizer
from torch import Tensor

from backends.engine.encoder.model import Batch, Encoder, num_parameters_bytes
from backends.engine.encoder.pooling import PoolingConfig, pool


class EncoderModel:
    def __init__(
        self,
        encoder: Encoder,
        tokenizer: Tokenizer,
        pooling: PoolingConfig,
        *,
        max_length: int,
        quantization: str,
        dtype: str = "float32",
    ) -> None:
        self.encoder = encoder
        self.config = encoder.config
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = max_length  # tokens per input, special tokens included
        self.quantization = quantization
        self.dtype = dtype
        self.dimensions = encoder.config.hidden_size
        self.prefix, self.suffix = _special_tokens(tokenizer)
        self.nbytes = num_parameters_bytes(encoder)

    # -- tokens

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's token ids with the model's special tokens (``[CLS] … [SEP]``), untruncated."""
        if len(texts) == 1:  # encode_batch's thread pool costs more than it saves for one
            return [self.tokenizer.encode(texts[0]).ids]
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def wrap(self, token_ids: Sequence[int]) -> list[int]:
        """Token ids a client sent (the tokenizer's ids for its text, without special tokens) as
        the model reads them: the same ids ``tokenize`` gives for that text."""
        return [*self.prefix, *token_ids, *self.suffix]

    @property
    def num_special_tokens(self) -> int:
        return len(self.prefix) + len(self.suffix)

    def truncate(self, ids: list[int]) -> list[int]:
        """``ids`` cut to ``max_length``, keeping the trailing special tokens (sentence-transformers'
        truncation)."""
        if len(ids) <= self.max_length:
            return ids
        keep = self.max_length - len(self.suffix)
        return ids[:keep] + ids[len(ids) - len(self.suffix) :] if self.suffix else ids[: self.max_length]

    # -- the forward

    @torch.inference_mode()
    def embed(self, inputs: Sequence[Sequence[int]]) -> Tensor:
        """``[B, dimensions]`` float32 for ``B`` inputs of token ids (each ≤ ``max_length``) in one
        forward; the caller groups inputs of similar length (``scheduler.py``)."""
        lengths = torch.tensor([len(ids) for ids in inputs], dtype=torch.long)
        seq_len = int(lengths.max())
        pad = self.config.pad_token_id
        input_ids = torch.tensor([[*ids, *([pad] * (seq_len - len(ids)))] for ids in inputs], dtype=torch.long)
        batch = Batch(input_ids, lengths)
        hidden = self.encoder(batch)  # [T, H]
        return pool(hidden, lengths, batch.segment_ids(), self.pooling)


def _special_tokens(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """The ids the post-processor puts before and after a single input's tokens."""
    plain = tokenizer.encode("hello", add_special_tokens=False).ids
    full = tokenizer.encode("hello", add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []
