"""``EncoderModel``: a loaded encoder with its tokenizer and sentence-transformers pipeline —
token ids in, one pooled (and normalised, where the model says so) vector per input out."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tokenizers import Tokenizer
from torch import Tensor

from backends.engine.encoder.model import Batch, ClassificationHead, Encoder, num_parameters_bytes
from backends.engine.encoder.pooling import PoolingConfig, pool


#: A text longer than this many characters per token of ``max_length`` is first tokenized by a
#: prefix (``tokenize``): a 3.9 MB input took seconds to tokenize whole, to be refused or cut.
_PREFIX_CHARS_PER_TOKEN = 64


class AtLeast(list):  # type: ignore[type-arg]
    """Token ids of a prefix of a text, cut at whitespace, already over ``max_length``: the whole
    text has at least as many, and its first ids are these (words are tokenized apart, so a cut
    between them changes nothing before it)."""

    at_least = True


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
        head: ClassificationHead | None = None,
    ) -> None:
        self.encoder = encoder
        self.config = encoder.config
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = max_length  # tokens per input, special tokens included
        self.quantization = quantization
        self.dtype = dtype
        self.dimensions = encoder.config.hidden_size
        self.head = head
        self.labels = encoder.config.labels
        #: what ``embed`` gives per input: the pooled vector, or a classifier's logits
        self.output_size = len(self.labels) if head is not None else self.dimensions
        self.prefix, self.suffix = _special_tokens(tokenizer)
        self._pair_tokenizer: Tokenizer | None = None
        self.nbytes = num_parameters_bytes(encoder) + (0 if head is None else num_parameters_bytes(head))

    # -- tokens

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's token ids with the model's special tokens (``[CLS] … [SEP]``), untruncated;
        for a text far over ``max_length``, those of a prefix when they are already over it
        (``AtLeast``). Safe off the event loop: a long text is encoded with ``encode_batch``,
        which releases the GIL (``encode`` holds it throughout)."""
        limit = self.max_length * _PREFIX_CHARS_PER_TOKEN
        prefixes = {i: _whitespace_prefix(text, limit) for i, text in enumerate(texts) if len(text) > limit}
        out = self._encode([prefixes.get(i) or text for i, text in enumerate(texts)])
        for i, prefix in prefixes.items():
            if prefix is None:
                continue
            if len(out[i]) > self.max_length:
                out[i] = AtLeast(out[i])
            else:  # few tokens for many characters (long whitespace runs): the whole text after all
                out[i] = self._encode([texts[i]])[0]
        return out

    def _encode(self, texts: list[str]) -> list[list[int]]:
        if len(texts) == 1 and len(texts[0]) < 4096:  # encode_batch's thread pool costs more than it saves
            return [self.tokenizer.encode(texts[0]).ids]
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def tokenize_pairs(self, pairs: Sequence[tuple[str, str]], *, truncate: bool) -> tuple[list[list[int]], list[int]]:
        """Each pair as one input (``[CLS] a [SEP] b [SEP]``: the tokenizer's pair template), and
        where its second text (token type 1) starts. ``truncate``: a pair over ``max_length`` is
        cut from the longer text's end (the tokenizer's ``longest_first``, as transformers and
        sentence-transformers' ``CrossEncoder`` cut), else left whole for the caller to refuse."""
        tokenizer = self.tokenizer
        if truncate:
            if self._pair_tokenizer is None:
                self._pair_tokenizer = Tokenizer.from_str(self.tokenizer.to_str())
                self._pair_tokenizer.enable_truncation(self.max_length, strategy="longest_first")
            tokenizer = self._pair_tokenizer
        encodings = tokenizer.encode_batch([tuple(p) for p in pairs])
        starts = [next((i for i, t in enumerate(e.type_ids) if t), len(e.ids)) for e in encodings]
        return [e.ids for e in encodings], starts

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
    def embed(self, inputs: Sequence[Sequence[int]], seconds: Sequence[int | None] | None = None) -> Tensor:
        """``[B, output_size]`` float32 for ``B`` inputs of token ids (each ≤ ``max_length``) in
        one forward: pooled vectors, or a classifier's logits. ``seconds``: per input, where a
        pair's second text starts (token type 1), None for a single text. The caller groups
        inputs of similar length (``scheduler.py``)."""
        lengths = torch.tensor([len(ids) for ids in inputs], dtype=torch.long)
        seq_len = int(lengths.max())
        pad = self.config.pad_token_id
        input_ids = torch.tensor([[*ids, *([pad] * (seq_len - len(ids)))] for ids in inputs], dtype=torch.long)
        types = None
        if seconds is not None and any(s is not None for s in seconds):
            at = torch.tensor([seq_len if s is None else s for s in seconds], dtype=torch.long)
            types = (torch.arange(seq_len).unsqueeze(0) >= at.unsqueeze(1)).long()
        batch = Batch(input_ids, lengths, types)
        hidden = self.encoder(batch)  # [T, H]
        if self.head is not None:  # the first token of each input: its row in the flat [T, H]
            firsts = torch.cumsum(lengths, 0) - lengths
            return self.head(hidden.index_select(0, firsts))
        return pool(hidden, lengths, batch.segment_ids(), self.pooling)


def _special_tokens(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """The ids the post-processor puts before and after a single input's tokens."""
    plain = tokenizer.encode("hello", add_special_tokens=False).ids
    full = tokenizer.encode("hello", add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []


def _whitespace_prefix(text: str, limit: int) -> str | None:
    """``text`` up to its last whitespace within ``limit`` characters; None without one."""
    cut = max(text.rfind(" ", 0, limit), text.rfind("\n", 0, limit), text.rfind("\t", 0, limit))
    return text[:cut] if cut > 0 else None
