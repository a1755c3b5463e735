"""The engine's canonical tensor names (``embed``, ``lm_head``, ``norm``, ``layers.{i}.q`` … see
``loader.py``) and how a file format's names map onto them (``gguf_loader``, ``hf_loader``)."""

from __future__ import annotations

from collections.abc import Mapping

import msgspec


class TensorNames(msgspec.Struct, frozen=True, kw_only=True):
    """One format's naming: ``whole_model`` maps full names (``output_norm.weight`` -> ``norm``);
    a layer's tensor is ``{layer_prefix}{i}.{suffix}`` with ``per_layer`` mapping the suffix."""

    whole_model: Mapping[str, str]
    layer_prefix: str
    per_layer: Mapping[str, str]

    def canonical(self, name: str) -> str | None:
        """The canonical name of file tensor ``name``; None for a tensor the engine does not use."""
        if name in self.whole_model:
            return self.whole_model[name]
        if name.startswith(self.layer_prefix):
            layer, rest = name[len(self.layer_prefix) :].split(".", 1)
            short = self.per_layer.get(rest)
            if short is not None:
                return f"layers.{layer}.{short}"
        return None
