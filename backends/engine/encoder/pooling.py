"""Sentence-transformers' pipeline after the transformer: pooling, then optional normalisation.

Read from a model directory's ``modules.json``: a ``Pooling`` module (its ``config.json`` names the
mode) and an optional ``Normalize``. Modules this engine does not implement (``Dense``, ``LayerNorm``
…) make the load fail naming them, rather than silently serving different vectors.
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import torch
import torch.nn.functional as F
from torch import Tensor

from gateway.errors import ConfigError

POOLING_MODES = ("mean", "cls", "lasttoken", "max", "mean_sqrt_len")

_KNOWN_MODULES = {
    "sentence_transformers.models.Transformer": "transformer",
    "sentence_transformers.models.Pooling": "pooling",
    "sentence_transformers.models.Normalize": "normalize",
    # sentence-transformers >= 5 names
    "sentence_transformers.base.modules.transformer.Transformer": "transformer",
    "sentence_transformers.sentence_transformer.modules.pooling.Pooling": "pooling",
    "sentence_transformers.sentence_transformer.modules.normalize.Normalize": "normalize",
}


_MODE_NAMES = {
    "mean_tokens": "mean", "cls_token": "cls", "max_tokens": "max", "mean_sqrt_len_tokens": "mean_sqrt_len",
    "last": "lasttoken", "lasttoken": "lasttoken",
}  # fmt: skip


class PoolingConfig(msgspec.Struct, frozen=True, kw_only=True):
    mode: str = "mean"  # one of POOLING_MODES
    normalize: bool = False
    include_prompt: bool = True


def read_pipeline(model_dir: Path) -> PoolingConfig:
    """The pooling and normalisation of ``model_dir``'s ``modules.json``; a directory without one
    (a plain Hugging Face encoder) pools by mean without normalising, as sentence-transformers
    would wrap it."""
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        return PoolingConfig()
    modules = json.loads(modules_file.read_text(encoding="utf-8"))
    mode, normalize = "mean", False
    include_prompt = True
    for module in modules:
        kind = _KNOWN_MODULES.get(module.get("type", ""))
        if kind is None:
            raise ConfigError(
                f"{modules_file}: module {module.get('type')!r} is not supported by the engine's encoder "
                f"(supported: Transformer, Pooling, Normalize)"
            )
        if kind == "pooling":
            cfg = json.loads((model_dir / module["path"] / "config.json").read_text(encoding="utf-8"))
            mode = _pooling_mode(cfg, modules_file)
            include_prompt = bool(cfg.get("include_prompt", True))
        elif kind == "normalize":
            normalize = True
    return PoolingConfig(mode=mode, normalize=normalize, include_prompt=include_prompt)


def _pooling_mode(cfg: dict[str, object], where: Path) -> str:
    if isinstance(cfg.get("pooling_mode"), str):  # newer sentence-transformers write the mode itself
        mode = _MODE_NAMES.get(str(cfg["pooling_mode"]), str(cfg["pooling_mode"]))
    else:
        flags = {
            "cls": cfg.get("pooling_mode_cls_token"),
            "mean": cfg.get("pooling_mode_mean_tokens"),
            "max": cfg.get("pooling_mode_max_tokens"),
            "mean_sqrt_len": cfg.get("pooling_mode_mean_sqrt_len_tokens"),
            "lasttoken": cfg.get("pooling_mode_lasttoken"),
        }
        chosen = [name for name, on in flags.items() if on]
        if len(chosen) != 1:
            raise ConfigError(f"{where}: exactly one pooling mode must be set, found {chosen or 'none'}")
        mode = chosen[0]
    if mode not in POOLING_MODES:
        raise ConfigError(f"{where}: pooling mode {mode!r} is not supported (supported: {', '.join(POOLING_MODES)})")
    return mode


def pool(hidden: Tensor, lengths: Tensor, segment_ids: Tensor, config: PoolingConfig) -> Tensor:
    """``hidden[T, H]`` (each input's tokens in order, ``lengths[B]`` of them) → ``[B, H]`` float32."""
    b = lengths.shape[0]
    ends = torch.cumsum(lengths, 0)
    starts = ends - lengths
    if config.mode == "cls":
        out = hidden.index_select(0, starts)
    elif config.mode == "lasttoken":
        out = hidden.index_select(0, ends - 1)
    elif config.mode == "max":
        out = torch.stack([part.amax(0) for part in hidden.split(lengths.tolist())])
    else:  # mean, mean_sqrt_len: a sum per input, divided
        sums = hidden.new_zeros(b, hidden.shape[1]).index_add_(0, segment_ids, hidden)
        divisor = lengths.to(hidden.dtype).unsqueeze(1)
        out = sums / (divisor.sqrt() if config.mode == "mean_sqrt_len" else divisor)
    out = out.float()
    if config.normalize:
        out = F.normalize(out, p=2.0, dim=1)
    return out
