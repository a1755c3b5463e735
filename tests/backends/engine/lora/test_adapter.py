"""Reading PEFT adapters: the fused layout (checked against the module-by-module LoRA), and every
adapter the engine cannot apply refused with an error naming the file and the tensor."""

from __future__ import annotations

import pytest
import torch

from backends.engine.lora.adapter import AdapterError, load_peft, module_shapes
from backends.engine.model.config import ModelConfig
from tests.backends.engine.lora.lora_helpers import write_adapter_files

CONFIG = ModelConfig(
    architecture="llama", vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
    tie_word_embeddings=True,
)  # fmt: skip
SHAPES = module_shapes(CONFIG)
ALL = list(SHAPES)


def load(path, **kwargs):  # type: ignore[no-untyped-def]
    return load_peft(path, CONFIG, name="a", lora_id=1, max_rank=kwargs.pop("max_rank", 64), dtype=torch.float32)


def test_fused_layout_is_the_sum_of_the_module_terms(tmp_path) -> None:
    from safetensors.torch import load_file

    path = write_adapter_files(tmp_path / "a", SHAPES, 2, targets=ALL, r=4, alpha=8, config={"use_rslora": True})
    adapter = load(path)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    scale = 8 / 4**0.5  # rsLoRA
    x = torch.randn(3, 64)
    for kind, modules in {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}.items():
        a, bt = adapter.layers[1][kind]
        block = "self_attn" if kind == "qkv" else "mlp"
        expected = torch.cat([
            x @ tensors[f"base_model.model.model.layers.1.{block}.{m}.lora_A.weight"].t()
            @ tensors[f"base_model.model.model.layers.1.{block}.{m}.lora_B.weight"].t() * scale
            for m in modules
        ], dim=1)  # fmt: skip
        torch.testing.assert_close((x @ a.t()) @ bt, expected)
    assert adapter.ranks == {"qkv": 12, "o": 4, "gate_up": 8, "down": 4}


def test_a_layer_without_the_module_adds_nothing(tmp_path) -> None:
    path = write_adapter_files(tmp_path / "a", SHAPES, 1, targets=["q_proj"], r=4)  # layer 0 only
    adapter = load(path)
    assert set(adapter.ranks) == {"qkv"}
    a, bt = adapter.layers[1]["qkv"]
    assert not a.any() and not bt.any()


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("other_base", "q_proj.lora_A.weight' has shape [8, 32]; the base model needs [r, 64]"),
        ("unknown_module", "targets 'lm_head2'"),
        ("rank", "rank 8, over max_lora_rank = 4"),
        ("missing_b", "has no lora_B partner"),
        ("too_many_layers", "is for layer 2; the base model has 2"),
        ("dora", "use_dora = True is not supported"),
        ("not_lora", "lora_embedding_A"),
    ],
)
def test_bad_adapters_are_refused_naming_file_and_tensor(tmp_path, case: str, expect: str) -> None:
    shapes, extra, config, max_rank, layers = dict(SHAPES), {}, {}, 64, 2
    pre = "base_model.model.model.layers.0.self_attn"
    if case == "other_base":
        shapes["q_proj"] = (32, 64)
    elif case == "unknown_module":
        extra = {f"{pre}.lm_head2.lora_A.weight": torch.zeros(8, 64), f"{pre}.lm_head2.lora_B.weight": torch.zeros(64, 8)}
    elif case == "rank":
        max_rank = 4
    elif case == "missing_b":
        extra = {"base_model.model.model.layers.1.mlp.up_proj.lora_A.weight": torch.zeros(8, 64)}
    elif case == "too_many_layers":
        layers = 6
    elif case == "dora":
        config = {"use_dora": True}
    elif case == "not_lora":
        extra = {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(8, 256)}
    path = write_adapter_files(tmp_path / case, shapes, layers, targets=["q_proj"], r=8, extra=extra, config=config)
    with pytest.raises(AdapterError) as err:
        load(path, max_rank=max_rank)
    message = str(err.value)
    assert expect in message
    file = "adapter_config.json" if case == "dora" else "adapter_model.safetensors"
    assert str(path / file) in message


def test_missing_files_are_named(tmp_path) -> None:
    with pytest.raises(AdapterError, match="not a directory"):
        load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match=r"empty/adapter_config\.json: missing"):
        load(tmp_path / "empty")
