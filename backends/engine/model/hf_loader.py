"""Weights from a Hugging Face model directory: ``config.json`` plus ``*.safetensors``.

Tensors are read one at a time through ``safetensors.safe_open`` (memory-mapped); quantization,
when asked for, happens per tensor in ``loader.py``. Names are mapped to the engine's canonical
ones (``embed``, ``layers.{i}.q`` … see ``loader.py``). A pre-quantized checkpoint (AWQ, GPTQ: a
``quantization_config`` in config.json, ``prequant_config.py``) hands out its packed linears as
``Int4Data`` (or ``InputPermutedData``), unpacked by ``quant/prequant.py``. Gemma checkpoints store
each norm's weight as an offset from 1 (the norm multiplies by ``1 + weight``): their norms are
handed out as ``1 + weight`` in float32, the multiplier, as llama.cpp's converter stores them in GGUF.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
from safetensors import safe_open
from torch import Tensor

from backends.engine.model.config import GEMMA, ModelConfig, UnsupportedModelError
from backends.engine.model.prequant_config import PrequantConfig, packed_name
from backends.engine.model.quant.prequant import unpack_layer
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
        self.prequant = PrequantConfig.from_hf(self.metadata)
        self._packed: dict[str, dict[str, tuple[Path, str]]] = {}  # canonical name -> part -> where
        for file in files:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    name = names.canonical(key)
                    if name is not None:
                        self._where[name] = (file, key)
                    elif self.prequant is not None and (packed := packed_name(key)) is not None:
                        self._packed.setdefault(packed[0], {})[packed[1]] = (file, key)
        for name in ("embed", "lm_head"):
            if name in self._packed:
                raise UnsupportedModelError(f"model directory '{self.path}': a quantized {name} is not supported")
        if self.config.tie_word_embeddings:
            self._where.pop("lm_head", None)
        elif "lm_head" not in self._where:  # some checkpoints tie without saying so
            self.config = _with_tied(self.config)
        self.tensor_types = {name: "safetensors" for name in self._where}
        self.tensor_types.update({name: self.prequant.method for name in self._packed if self.prequant})

    def has(self, name: str) -> bool:
        return name in self._where or name in self._packed

    def _handle(self, name: str) -> tuple[Any, str]:
        if name not in self._where:
            raise UnsupportedModelError(f"model directory '{self.path}' lacks tensor '{name}'")
        file, key = self._where[name]
        return self._open(file), key

    def _open(self, file: Path) -> Any:
        handle = self._files.get(str(file))
        if handle is None:
            handle = self._files[str(file)] = safe_open(file, framework="pt")
        return handle

    def num_rows(self, name: str) -> int:
        handle, key = self._handle(name)
        return int(handle.get_slice(key).get_shape()[0])

    def get(self, name: str, rows: slice | None = None) -> Any:
        """Tensor ``name``, or only its row range ``rows``; a packed linear's unpacked weight."""
        if name in self._packed and self.prequant is not None:
            parts = self._packed[name]
            layer = parts["qweight"][1].rpartition(".")[0] if "qweight" in parts else name
            return unpack_layer(self.prequant, layer, lambda part: self._read(parts[part]) if part in parts else None)
        handle, key = self._handle(name)
        if rows is None:
            tensor = handle.get_tensor(key)
            return tensor.float() + self._norm_offset if self._norm_offset and name.endswith("norm") else tensor
        return handle.get_slice(key)[rows.start : rows.stop]

    def _read(self, where: tuple[Path, str]) -> Tensor:
        file, key = where
        return self._open(file).get_tensor(key)

    def close(self) -> None:
        self._files.clear()


def _with_tied(config: ModelConfig) -> ModelConfig:
    return msgspec.structs.replace(config, tie_word_embeddings=True)
