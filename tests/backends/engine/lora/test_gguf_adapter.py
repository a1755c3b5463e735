"""llama.cpp's GGUF LoRA adapters (``general.type = adapter``): the same adapter read from its PEFT
directory and from the GGUF file ``convert_lora_to_gguf.py`` would write for it gives the same
fused weights; bad files are refused naming the file and the tensor.

``to_gguf`` below writes what that converter writes, with the ``gguf`` package's writer: tensor
names ``blk.{i}.attn_q.weight.lora_a`` ``[r, in]`` / ``….lora_b`` ``[out, r]``, ``adapter.lora.alpha``,
and for ``llama`` the rows of q's and k's B permuted as the converter permutes the base's
``attn_q``/``attn_k`` (each head's rotary halves interleaved)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from backends.engine.lora.adapter import AdapterError, load_adapter, load_peft
from tests.backends.engine.lora.lora_helpers import write_adapter_files
from tests.backends.engine.lora.test_adapter import ALL, CONFIG, SHAPES

_GGUF = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}  # fmt: skip


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter on q/k rows: per head, the two rotary halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf(peft_dir: Path, target: Path, *, arch: str = "llama", dtype: type = np.float32,
            general_type: str = "adapter", skip: str | None = None, heads: tuple[int, int] | None = None) -> Path:  # fmt: skip
    """The GGUF file llama.cpp's converter writes for ``peft_dir``; ``heads``: the base's (q, kv) heads."""
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    writer = gguf.GGUFWriter(str(target), arch)
    writer.add_string("general.type", general_type)
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(cfg["lora_alpha"]))
    for key, tensor in sorted(load_file(str(peft_dir / "adapter_model.safetensors")).items()):
        layer, module, part = re.search(r"layers\.(\d+)\.\w+\.(\w+)\.lora_([AB])", key).groups()  # type: ignore[union-attr]
        w = tensor.float().numpy()
        if part == "B" and arch == "llama" and module in ("q_proj", "k_proj"):
            q_heads, kv_heads = heads or (CONFIG.num_heads, CONFIG.num_kv_heads)
            w = _permute(w, q_heads if module == "q_proj" else kv_heads)
        name = f"blk.{layer}.{_GGUF[module]}.weight.lora_{part.lower()}"
        if name != skip:
            writer.add_tensor(name, np.ascontiguousarray(w.astype(dtype)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def _load(path: Path, max_rank: int = 64):  # type: ignore[no-untyped-def]
    return load_adapter(path, CONFIG, name="a", lora_id=1, max_rank=max_rank, dtype=torch.float32)


def test_a_gguf_adapter_is_its_peft_directory(tmp_path: Path) -> None:
    peft_dir = write_adapter_files(tmp_path / "peft", SHAPES, 2, targets=ALL, r=4, alpha=8)
    from_peft = load_peft(peft_dir, CONFIG, name="a", lora_id=1, max_rank=64, dtype=torch.float32)
    from_gguf = _load(to_gguf(peft_dir, tmp_path / "a.gguf"))
    assert from_gguf.ranks == from_peft.ranks
    for ours, theirs in zip(from_gguf.layers, from_peft.layers, strict=True):
        assert ours.keys() == theirs.keys()
        for kind in ours:
            torch.testing.assert_close(ours[kind], theirs[kind], rtol=0, atol=0)
    # stored as float16 (the converter's default outtype): the same, to float16's precision
    half = _load(to_gguf(peft_dir, tmp_path / "a16.gguf", dtype=np.float16))
    for ours, theirs in zip(half.layers, from_peft.layers, strict=True):
        for kind in ours:
            torch.testing.assert_close(ours[kind], theirs[kind], rtol=2e-3, atol=2e-3)


def test_a_qwen2_adapter_keeps_its_rows(tmp_path: Path) -> None:
    """qwen2 GGUFs are written unpermuted: so are their adapters."""
    import msgspec

    config = msgspec.structs.replace(CONFIG, architecture="qwen2")
    peft_dir = write_adapter_files(tmp_path / "peft", SHAPES, 2, targets=["q_proj", "k_proj"], r=4, alpha=4)
    from_peft = load_peft(peft_dir, config, name="a", lora_id=1, max_rank=64, dtype=torch.float32)
    from_gguf = load_adapter(to_gguf(peft_dir, tmp_path / "a.gguf", arch="qwen2"), config, name="a", lora_id=1,
                             max_rank=64, dtype=torch.float32)  # fmt: skip
    torch.testing.assert_close(from_gguf.layers[1]["qkv"], from_peft.layers[1]["qkv"], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("arch", "general.architecture = 'qwen2'; the base model is 'llama'"),
        ("type", "general.type = 'model'"),
        ("partner", "'blk.1.attn_v.weight.lora_a' has no lora_b partner"),
        ("shape", "'blk.0.attn_q.weight.lora_a' has shape [4, 32]; the base model needs [r, 64]"),
        ("rank", "rank 4, over max_lora_rank = 2"),
        ("garbage", "not a readable GGUF file"),
    ],
)
def test_bad_gguf_adapters_are_refused_naming_file_and_tensor(tmp_path: Path, case: str, expect: str) -> None:
    peft_dir = write_adapter_files(tmp_path / "peft", SHAPES, 2, targets=["q_proj", "v_proj"], r=4, alpha=8)
    target = tmp_path / "bad.gguf"
    if case == "arch":
        to_gguf(peft_dir, target, arch="qwen2")
    elif case == "type":
        to_gguf(peft_dir, target, general_type="model")
    elif case == "partner":
        to_gguf(peft_dir, target, skip="blk.1.attn_v.weight.lora_b")
    elif case == "shape":
        other = write_adapter_files(tmp_path / "other", {**SHAPES, "q_proj": (32, 64)}, 2, targets=["q_proj"], r=4, alpha=8)
        to_gguf(other, target)
    elif case == "rank":
        to_gguf(peft_dir, target)
    else:
        target.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    with pytest.raises(AdapterError) as error:
        _load(target, max_rank=2 if case == "rank" else 64)
    assert str(target) in str(error.value) and expect in str(error.value)
