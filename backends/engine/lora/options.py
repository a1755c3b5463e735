"""``LoRAOptions``: an engine model's ``options.lora`` table (torch-free: read with the config)."""

from __future__ import annotations

from typing import Annotated

import msgspec

Positive = Annotated[int, msgspec.Meta(ge=1)]


class LoRAOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``options.lora = { max_loras = 8, max_lora_rank = 64, max_cpu_loras = 64, adapters = {…} }``.

    - ``max_loras``: adapters one step can use (its weight slots); a request whose adapter finds
      none free waits in the queue until one is;
    - ``max_lora_rank``: the largest rank accepted (a larger adapter is refused at load);
    - ``max_cpu_loras``: adapters kept in memory; the least recently used beyond it are read
      from their files again when next asked for;
    - ``adapters``: ``name = "path"`` of PEFT adapter directories, each served as model ``name``.
    """

    max_loras: Positive = 8
    max_lora_rank: Positive = 64
    max_cpu_loras: Positive = 64
    adapters: dict[str, str] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be at least max_loras")
