"""Weights from a Hugging Face model directory: ``config.json`` plus ``*.safetensors``.

Tensors are read one at a time through ``safetensors.safe_open`` (memory-mapped); quantization,
when asked for, happens per tensor in ``loader.py``. Names are mapped to the engine's canonical
ones (``embed``, ``layers.{i}.q`` … see ``loader.py``). Gemma checkpoints store each norm's
weight as an offset from 1 (the norm multiplies by ``1 + weight``): their norms are handed out as
``1 + weight`` in float32, the multiplier, as llama.cpp's converter stores them in GGUF.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
from safetensors import safe_open
from torch import Tensor

from backends.engine.model.config import GEMMA, ModelConfig, UnsupportedModelError
from backends.engine.model.tensor_names import hf_names



class HFSource:
    """An HF model directory: ``config``, ``metadata`` (config.json) and ``get(name)``."""

    format = "hf"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise UnsupportedModelError(f"model directory '{self.path}' has no config.json")
        self.metadata: dict[str, Any] = json.loads(config_path.read_text())
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise UnsupportedModelError(f"model directory '{self.path}' has no *.safetensors files")
        self._files: dict[str, Any] = {}
        self._where: dict[str, tuple[Path, str]] = {}
        self.config = ModelConfig.from_hf_config(self.metadata)
        names = hf_names(self.config.architecture)
        self._norm_offset = 1.0 if self.config.architecture in GEMMA else 0.0
        for file in files:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    name = names.canonical(key)
                    if name is not None:
                        self._where[name] = (file, key)
        if self.config.tie_word_embeddings:
            self._where.pop("lm_head", None)
        elif "lm_head" not in self._where:  # some checkpoints tie without saying so
            self.config = _with_tied(self.config)
        self.tensor_types = {name: "safetensors" for name in self._where}

    def has(self, name: str) -> bool:
        return name in self._where

    def _handle(self, name: str) -> tuple[Any, str]:
        if name not in self._where:
            raise UnsupportedModelError(f"model directory '{self.path}' lacks tensor '{name}'")
        file, key = self._where[name]
        handle = self._files.get(str(file))
        if handle is None:
            handle = self._files[str(file)] = safe_open(file, framework="pt")
        return handle, key

    def num_rows(self, name: str) -> int:
        handle, key = self._handle(name)
        return int(handle.get_slice(key).get_shape()[0])

    def get(self, name: str, rows: slice | None = None) -> Tensor:
        """Tensor ``name``, or only its row range ``rows``."""
        handle, key = self._handle(name)
        if rows is None:
            tensor = handle.get_tensor(key)
            return tensor.float() + self._norm_offset if self._norm_offset and name.endswith("norm") else tensor
        return handle.get_slice(key)[rows.start : rows.stop]

    def close(self) -> None:
        self._files.clear()


def _with_tied(config: ModelConfig) -> ModelConfig:
    return msgspec.structs.replace(config, tie_word_embeddings=True)
