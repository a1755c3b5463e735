"""Helpers for the LoRA tests: random-weight PEFT adapters written with ``peft`` itself, and a
paged runner whose steps carry an adapter per sequence."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from backends.engine.lora.adapter import LoRAAdapter, load_peft
from backends.engine.lora.layers import apply_lora
from backends.engine.lora.slots import LoRASlots
from tests.backends.engine.engine_helpers import PagedRunner


def write_peft_adapter(
    base: torch.nn.Module, path: Path, *, targets: Sequence[str], r: int, alpha: float, seed: int,
    use_rslora: bool = False, std: float = 1.0, layers: Sequence[int] | None = None,
) -> Path:  # fmt: skip
    """A PEFT LoRA adapter for the HF model ``base`` with seeded random A and B (PEFT's own init
    leaves B zero, an adapter that changes nothing), saved with ``save_pretrained``. ``std``
    scales B: how far the adapter moves the model. ``base`` is left as it was."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=use_rslora, lora_dropout=0.0,
        layers_to_transform=None if layers is None else list(layers),
    )  # fmt: skip
    model = get_peft_model(base, config, adapter_name="default")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std / p.shape[1] ** 0.5 * 0.1)
    model.save_pretrained(str(path))
    model.unload()  # the base model's modules back as they were
    return path


def peft_model(base: torch.nn.Module, path: Path) -> torch.nn.Module:
    """``base`` with the adapter at ``path`` applied by ``peft`` (the reference); ``.unload()`` it after."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(path)).eval()


def load_adapter(path: Path, config, lora_id: int, dtype: torch.dtype, max_rank: int = 64) -> LoRAAdapter:  # type: ignore[no-untyped-def]
    return load_peft(path, config, name=path.name, lora_id=lora_id, max_rank=max_rank, dtype=dtype)


def with_lora(loaded, max_loras: int) -> LoRASlots:  # type: ignore[no-untyped-def]
    """``apply_lora`` on ``loaded.model`` (once per model) with fresh slots."""
    slots = LoRASlots(loaded.config.num_layers, max_loras=max_loras, dtype=torch.float32)
    apply_lora(loaded.model, slots)
    return slots


class LoRARunner(PagedRunner):
    """A ``PagedRunner`` over a model with ``apply_lora`` (``slots``): each sequence runs with its
    adapter. Each runner has a fresh KV cache."""

    def __init__(self, loaded, slots: LoRASlots, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(loaded.model, loaded.config, dtype=loaded.dtype, **kwargs)
        self.slots = slots
        self.adapters: dict[int, LoRAAdapter | None] = {}

    def step(self, batch: Sequence[tuple[int, Sequence[int]]]) -> list[torch.Tensor]:
        self.slots.prepare([self.adapters.get(seq_id) for seq_id, tokens in batch for _ in tokens])
        return super().step(batch)

    def greedy(self, seqs: dict[int, tuple[list[int], LoRAAdapter | None]], steps: int) -> dict[int, list[int]]:
        """Greedy continuations of every ``seq_id: (prompt, adapter)``, all in one batch."""
        self.adapters.update({i: adapter for i, (_, adapter) in seqs.items()})
        batch = [(i, prompt) for i, (prompt, _) in seqs.items()]
        outs: dict[int, list[int]] = {i: [] for i in seqs}
        for _ in range(steps):
            logits = self.step(batch)
            batch = []
            for (i, _), rows in zip([(i, None) for i in seqs], logits, strict=True):
                token = int(rows[-1].argmax())
                outs[i].append(token)
                batch.append((i, [token]))
        return outs

    def teacher_forced(self, seqs: dict[int, tuple[list[int], list[int], LoRAAdapter | None]]) -> dict[int, torch.Tensor]:
        """Logits ``[len(continuation), V]`` predicting each continuation token, all in one step."""
        self.adapters.update({i: adapter for i, (_, _, adapter) in seqs.items()})
        logits = self.step([(i, p + c) for i, (p, c, _) in seqs.items()])
        return {i: rows[len(p) - 1 : -1] for (i, (p, _, _)), rows in zip(seqs.items(), logits, strict=True)}


def write_adapter_files(
    path: Path, shapes: dict[str, tuple[int, int]], num_layers: int, *, targets: Sequence[str], r: int = 8,
    alpha: float = 16, seed: int = 0, std: float = 0.02, extra: dict[str, torch.Tensor] | None = None,
    config: dict | None = None,
) -> Path:  # fmt: skip
    """A random-weight adapter in PEFT's files (``adapter_config.json``, ``adapter_model.safetensors``,
    PEFT's tensor names), written directly: no HF model to load. ``shapes``: ``module -> (in, out)``
    (``adapter.module_shapes``); ``extra`` tensors and ``config`` keys go in as given."""
    import json

    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(num_layers):
        for module in targets:
            in_f, out_f = shapes[module]
            block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{i}.{block}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, in_f, generator=gen) * std
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, r, generator=gen) * std
    tensors.update(extra or {})
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(targets), "bias": "none", **(config or {})}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path
