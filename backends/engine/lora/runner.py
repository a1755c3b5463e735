"""``LoRAModelRunner``: the model runner whose steps carry an adapter per row.

Before each forward it hands ``LoRASlots.prepare`` one adapter (or None, the base model) per token
of the flattened batch, in the order ``ModelRunner.execute`` lays the tokens out: each scheduled
sequence's new tokens in turn, with its request's adapter (``SequenceGroup.lora``).
"""

from __future__ import annotations

from typing import Any

import torch

from backends.engine.lora.slots import LoRASlots
from backends.engine.runner.model_runner import ModelRunner
from backends.engine.sched.output import SchedulerOutput


class LoRAModelRunner(ModelRunner):
    def __init__(self, *args: Any, slots: LoRASlots, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lora_slots = slots

    def execute(self, out: SchedulerOutput) -> torch.Tensor | None:
        rows: list[Any] = []
        for sched in out.scheduled:
            group = sched.seq.group
            rows.extend([None if group is None else group.lora] * sched.num_new_tokens)
        self.lora_slots.prepare(rows)
        return super().execute(out)


def lora_runner(model: Any, config: Any, options: Any) -> Any:
    """The runner class for an engine serving adapters: ``apply_lora`` on ``model`` with fresh
    slots (``options``: ``LoRAOptions``), then ``LoRAModelRunner`` bound to them."""
    import functools

    from backends.engine.lora.layers import apply_lora
    from backends.engine.model.config import UnsupportedModelError

    if config.is_moe:  # adapters target the dense MLP's gate/up/down, which such a model lacks
        raise UnsupportedModelError(f"LoRA adapters on a mixture of experts ({config.architecture}) are not supported")
    slots = LoRASlots(config.num_layers, max_loras=options.max_loras, dtype=torch.float32, device=model.device)
    apply_lora(model, slots)
    return functools.partial(LoRAModelRunner, slots=slots)
