"""A LoRA adapter read from a PEFT directory, checked against the base model, in the engine's
fused projection layout.

A PEFT directory holds ``adapter_config.json`` (rank ``r``, ``lora_alpha``, ``use_rslora``,
``rank_pattern`` / ``alpha_pattern``) and ``adapter_model.safetensors`` with, per adapted module,
``…layers.{i}.self_attn.q_proj.lora_A.weight`` ``[r, in]`` and ``….lora_B.weight`` ``[out, r]``.
The module computes ``y = W x + scale * B (A x)`` with ``scale = alpha / r`` (``alpha / sqrt(r)``
with rsLoRA).

The engine fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``, so an adapter is kept
per layer and per fused projection (``KINDS``): ``a`` ``[R, in]`` is the parts' A stacked, and
``bt`` ``[R, out]`` the parts' B transposed, scaled and placed at the part's output columns (zero
elsewhere), so that ``delta = (x @ a.T) @ bt`` is the whole fused projection's LoRA term. ``R``
is the kind's rank summed over its parts, the same in every layer (a layer with a smaller rank or
no adapter on the part is padded with zeros), which lets one mask per step serve every layer.

Anything the engine cannot apply exactly is refused with ``AdapterError`` naming the file and
the tensor or key: another base model's shapes, unknown target modules, a rank over
``max_lora_rank``, DoRA, trained biases, a missing file.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import Tensor

from backends.engine.model.config import ModelConfig

#: The fused projections of a decoder layer, and the PEFT modules each is made of, in output order.
KINDS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
MODULES = {module: kind for kind, modules in KINDS.items() for module in modules}
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")


class AdapterError(ValueError):
    """An adapter the engine refuses; the message names the file and the tensor or key."""


def module_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """``(in_features, out_features)`` of each adaptable module of ``config``'s decoder layers."""
    hidden, inter = config.hidden_size, config.intermediate_size
    return {
        "q_proj": (hidden, config.q_size), "k_proj": (hidden, config.kv_size), "v_proj": (hidden, config.kv_size),
        "o_proj": (config.q_size, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }  # fmt: skip


def kind_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """``(in_features, out_features)`` of each fused projection (``KINDS``) of ``config``'s layers."""
    shapes = module_shapes(config)
    return {kind: (shapes[modules[0]][0], sum(shapes[m][1] for m in modules)) for kind, modules in KINDS.items()}


class LoRAAdapter:
    """One adapter's weights in the fused layout (module doc): ``layers[i][kind] = (a, bt)`` for
    the kinds it adapts, ``ranks[kind]`` the kind's stacked rank ``R``. ``lora_id`` is unique per
    load in this process (a name loaded again gets a new one), so the prefix cache keyed by it never
    serves one adapter's keys and values to another."""

    def __init__(
        self, name: str, path: Path, lora_id: int, ranks: dict[str, int], layers: list[dict[str, tuple[Tensor, Tensor]]]
    ) -> None:
        self.name = name
        self.path = path
        self.lora_id = lora_id
        self.ranks = ranks
        self.layers = layers

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for pair in layer.values() for t in pair)

    def __repr__(self) -> str:
        return f"LoRAAdapter({self.name!r}, id={self.lora_id}, ranks={self.ranks})"


def _read_config(path: Path) -> dict:
    file = path / CONFIG_FILE
    if not file.is_file():
        raise AdapterError(f"{file}: missing (a PEFT adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        cfg = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{file}: unreadable: {exc}") from exc
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{file}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for key, ok in (("use_dora", False), ("fan_in_fan_out", False), ("lora_bias", False)):
        if cfg.get(key, ok) != ok:
            raise AdapterError(f"{file}: {key} = {cfg[key]!r} is not supported")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{file}: bias = {cfg['bias']!r} is not supported (trained biases)")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"{file}: modules_to_save {cfg['modules_to_save']!r} is not supported")
    return cfg


def _checked_pair(
    file: Path, parts: dict, a_name: str, b_name: str, shape: tuple[int, int], max_rank: int
) -> tuple[Tensor, Tensor]:
    """One module's ``(A [r, in], B [out, r])`` from ``parts`` (each tensor under its part name,
    its file key under ``name + "_key"``), checked against the base's ``(in, out)`` and the rank limit."""
    if a_name not in parts or b_name not in parts:
        have = parts.get(f"{a_name}_key") or parts.get(f"{b_name}_key")
        raise AdapterError(f"{file}: tensor {have!r} has no lora_{b_name if a_name in parts else a_name} partner")
    a, b = parts[a_name], parts[b_name]
    in_f, out_f = shape
    rank = a.shape[0]
    if a.ndim != 2 or a.shape[1] != in_f:
        raise AdapterError(f"{file}: tensor {parts[a_name + '_key']!r} has shape {list(a.shape)}; the base model needs [r, {in_f}]")
    if b.ndim != 2 or tuple(b.shape) != (out_f, rank):
        raise AdapterError(f"{file}: tensor {parts[b_name + '_key']!r} has shape {list(b.shape)}; the base model needs [{out_f}, {rank}]")
    if rank > max_rank:
        raise AdapterError(f"{file}: tensor {parts[a_name + '_key']!r} has rank {rank}, over max_lora_rank = {max_rank}")
    return a, b


def _pattern(patterns: dict, module_key: str, default: float) -> float:
    """PEFT's ``rank_pattern`` / ``alpha_pattern``: the value of the first key the module's name
    ends with (keys may be regular expressions)."""
    for key, value in (patterns or {}).items():
        if module_key.endswith(key) or re.search(rf"(^|\.){key}$", module_key):
            return value
    return default


def load_peft(
    path: str | Path, config: ModelConfig, *, name: str, lora_id: int, max_rank: int, dtype: torch.dtype
) -> LoRAAdapter:
    """Read and check the PEFT adapter at ``path`` against ``config``; weights in ``dtype``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if not path.is_dir():
        raise AdapterError(f"{path}: not a directory (a PEFT adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    cfg = _read_config(path)
    file = path / WEIGHTS_FILE
    if not file.is_file():
        raise AdapterError(f"{file}: missing")
    try:
        tensors = load_file(str(file))
    except (OSError, SafetensorError) as exc:
        raise AdapterError(f"{file}: unreadable: {exc}") from exc
    shapes = module_shapes(config)
    found: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.search(key)
        if match is None:
            raise AdapterError(f"{file}: tensor {key!r} is not a LoRA A/B weight of a decoder layer's projection")
        layer, module, part = int(match[1]), match[2], match[3]
        if module not in shapes:
            raise AdapterError(f"{file}: tensor {key!r} targets {module!r}, not one of {sorted(shapes)}")
        if layer >= config.num_layers:
            raise AdapterError(f"{file}: tensor {key!r} is for layer {layer}; the base model has {config.num_layers}")
        found.setdefault((layer, module), {})[part] = tensor
        found[(layer, module)][part + "_key"] = key  # type: ignore[assignment]
    if not found:
        raise AdapterError(f"{file}: no LoRA tensors")

    # check every pair and scale B: (a [r, in], b_scaled [out, r]) per (layer, module)
    pairs: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}
    for (layer, module), parts in found.items():
        a, b = _checked_pair(file, parts, "A", "B", shapes[module], max_rank)
        module_key = str(parts["A_key"]).rsplit(".lora_A", 1)[0].removeprefix("base_model.model.")
        r = _pattern(cfg.get("rank_pattern"), module_key, cfg.get("r", a.shape[0]))
        alpha = _pattern(cfg.get("alpha_pattern"), module_key, cfg.get("lora_alpha", r))
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        pairs[(layer, module)] = (a.float(), b.float() * scale)

    return LoRAAdapter(name, path, lora_id, *_fuse(pairs, config, dtype))


def _fuse(
    pairs: dict[tuple[int, str], tuple[Tensor, Tensor]], config: ModelConfig, dtype: torch.dtype
) -> tuple[dict[str, int], list[dict[str, tuple[Tensor, Tensor]]]]:
    """``(a [r, in], scale * b [out, r])`` per (layer, module) -> the fused layout (module doc):
    ``(ranks, layers)``."""
    shapes, kinds = module_shapes(config), kind_shapes(config)
    # the fused layout: per kind, each part padded to its largest rank over the layers
    part_rank = {m: max((p[0].shape[0] for (_, mod), p in pairs.items() if mod == m), default=0) for m in MODULES}
    ranks = {kind: sum(part_rank[m] for m in modules) for kind, modules in KINDS.items() if any(part_rank[m] for m in modules)}
    layers: list[dict[str, tuple[Tensor, Tensor]]] = []
    for layer in range(config.num_layers):
        fused: dict[str, tuple[Tensor, Tensor]] = {}
        for kind, total in ranks.items():
            in_f, out_total = kinds[kind]
            a_cat = torch.zeros(total, in_f)
            bt_cat = torch.zeros(total, out_total)
            row = col = 0
            for module in KINDS[kind]:
                out_f = shapes[module][1]
                pair = pairs.get((layer, module))
                if pair is not None:
                    a, b = pair
                    a_cat[row : row + a.shape[0]] = a
                    bt_cat[row : row + a.shape[0], col : col + out_f] = b.t()
                row += part_rank[module]
                col += out_f
            fused[kind] = (a_cat.to(dtype).contiguous(), bt_cat.to(dtype).contiguous())
        layers.append(fused)
    return ranks, layers


#: llama.cpp's tensor name of each adaptable module (``blk.{i}.<name>.weight.lora_a`` / ``lora_b``)
GGUF_MODULES = {
    "attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
    "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj",
}  # fmt: skip
_GGUF_KEY = re.compile(r"^blk\.(\d+)\.(\w+)\.weight\.lora_([ab])$")


def load_gguf_adapter(
    path: str | Path, config: ModelConfig, *, name: str, lora_id: int, max_rank: int, dtype: torch.dtype
) -> LoRAAdapter:
    """Read and check a llama.cpp LoRA adapter (``convert_lora_to_gguf.py``'s output:
    ``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``, per adapted
    tensor ``blk.{i}.attn_q.weight.lora_a`` ``[r, in]`` and ``….lora_b`` ``[out, r]``). The scale
    is llama.cpp's, ``alpha / r`` (1 where alpha is 0 or absent). For ``llama`` the converter
    permuted the rows of q's and k's B as it permutes the base's ``attn_q``/``attn_k``; they are
    permuted back as the base model's are (``gguf_loader``)."""
    import gguf
    import numpy as np

    file = Path(path).expanduser()
    try:
        reader = gguf.GGUFReader(str(file))
    except Exception as exc:  # noqa: BLE001 - the reader fails on a bad file with whatever it hits first
        raise AdapterError(f"{file}: not a readable GGUF file: {type(exc).__name__}: {exc}") from exc

    def field(key: str) -> object:
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    if field("general.type") != "adapter" or field("adapter.type") != "lora":
        raise AdapterError(
            f"{file}: general.type = {field('general.type')!r}, adapter.type = {field('adapter.type')!r}; "
            f"a LoRA adapter has 'adapter' and 'lora'"
        )
    arch = field("general.architecture")
    if arch != config.architecture:
        raise AdapterError(f"{file}: general.architecture = {arch!r}; the base model is {config.architecture!r}")
    alpha = float(field("adapter.lora.alpha") or 0.0)
    shapes = module_shapes(config)
    found: dict[tuple[int, str], dict[str, Tensor]] = {}
    for tensor in reader.tensors:
        match = _GGUF_KEY.match(tensor.name)
        if match is None or match[2] not in GGUF_MODULES:
            raise AdapterError(f"{file}: tensor {tensor.name!r} is not a LoRA A/B weight of a decoder layer's projection "
                               f"(blk.N.{{{','.join(GGUF_MODULES)}}}.weight.lora_a/lora_b)")  # fmt: skip
        layer, module = int(match[1]), GGUF_MODULES[match[2]]
        if layer >= config.num_layers:
            raise AdapterError(f"{file}: tensor {tensor.name!r} is for layer {layer}; the base model has {config.num_layers}")
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        shape = tuple(int(d) for d in reversed(list(tensor.shape)))
        found.setdefault((layer, module), {})[match[3]] = torch.from_numpy(np.array(values, np.float32).reshape(shape))
        found[(layer, module)][match[3] + "_key"] = tensor.name  # type: ignore[assignment]
    if not found:
        raise AdapterError(f"{file}: no LoRA tensors")
    pairs: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}
    for (layer, module), parts in found.items():
        a, b = _checked_pair(file, parts, "a", "b", shapes[module], max_rank)
        out_f, rank = b.shape
        if config.architecture == "llama" and module in ("q_proj", "k_proj"):
            heads = config.num_heads if module == "q_proj" else config.num_kv_heads
            b = b[torch.arange(out_f).view(heads, -1, 2).transpose(1, 2).reshape(-1)]
        pairs[(layer, module)] = (a.float(), b.float() * (alpha / rank if alpha else 1.0))
    return LoRAAdapter(name, file, lora_id, *_fuse(pairs, config, dtype))


def load_adapter(
    path: str | Path, config: ModelConfig, *, name: str, lora_id: int, max_rank: int, dtype: torch.dtype
) -> LoRAAdapter:
    """A PEFT directory, or a llama.cpp GGUF adapter file (``.gguf``)."""
    p = Path(path).expanduser()
    loader = load_gguf_adapter if p.suffix.lower() == ".gguf" or (p.is_file() and _is_gguf(p)) else load_peft
    return loader(p, config, name=name, lora_id=lora_id, max_rank=max_rank, dtype=dtype)


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False
