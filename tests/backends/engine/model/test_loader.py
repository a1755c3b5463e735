"""``load_model``: configs from GGUF metadata and config.json, what ``LoadedModel`` carries, clear
errors for what the engine cannot load, and (slow) the memory bounds on the real default model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from backends.engine.model.config import ConfigError, ModelConfig, UnsupportedModelError
from backends.engine.model.loader import load_model
from backends.engine.model.quant import DenseLinear, Int4Linear, Int8Linear
from tests.backends.engine.engine_helpers import make_hf_model, save_hf, write_gguf

REPO = Path(__file__).resolve().parents[4]


def test_hf_config_transformers4_and_5_spellings() -> None:
    v4 = {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": True,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    }  # fmt: skip
    v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {**v4["rope_scaling"], "rope_theta": 500000.0}
    a, b = ModelConfig.from_hf_config(v4), ModelConfig.from_hf_config(v5)
    assert a == b
    assert a.head_dim == 64 and a.num_kv_heads == 8 and a.rope_theta == 500000.0
    assert a.rope_scaling is not None and a.rope_scaling.factor == 32.0


def test_unsupported_architecture_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="model_type 'gpt2'"):
        ModelConfig.from_hf_config({"model_type": "gpt2"})
    with pytest.raises(UnsupportedModelError, match="architecture 'gpt2'"):
        ModelConfig.from_gguf_metadata({"general.architecture": "gpt2"}, has_output_tensor=True)


def test_phi3_variants_the_engine_cannot_run_exactly_are_refused() -> None:
    base = {"model_type": "phi3", "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 32, "intermediate_size": 128,
            "num_hidden_layers": 1}  # fmt: skip
    assert ModelConfig.from_hf_config(base).architecture == "phi3"
    longrope = {**base, "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}}
    with pytest.raises(UnsupportedModelError, match="rope scaling 'longrope'"):
        ModelConfig.from_hf_config(longrope)
    with pytest.raises(UnsupportedModelError, match="partial_rotary_factor"):
        ModelConfig.from_hf_config({**base, "partial_rotary_factor": 0.5})
    gguf_meta = {"general.architecture": "phi3", "phi3.rope.scaling.original_context_length": 4096}
    with pytest.raises(UnsupportedModelError, match="longrope"):
        ModelConfig.from_gguf_metadata(gguf_meta, has_output_tensor=True)


def test_loaded_model_fields_hf(tmp_path) -> None:
    path = save_hf(make_hf_model("qwen2"), tmp_path / "m")
    loaded = load_model(path, dtype=torch.float32)
    assert loaded.format == "hf" and loaded.path == path
    assert loaded.metadata["model_type"] == "qwen2"
    assert loaded.dtype == torch.float32 and loaded.device == torch.device("cpu")
    assert loaded.model.lm_head is loaded.model.embed_tokens  # tied
    assert isinstance(loaded.model.layers[0].self_attn.qkv_proj, DenseLinear)
    assert loaded.model.layers[0].self_attn.qkv_proj.bias is not None  # qwen2 q/k/v bias, fused
    assert not any(t.is_meta for t in loaded.model.buffers())


def test_quantization_choices_pick_modules(tmp_path) -> None:
    path = save_hf(make_hf_model("llama"), tmp_path / "m")
    m4 = load_model(path, quantization="int4").model
    assert isinstance(m4.layers[0].mlp.gate_up_proj, Int4Linear)
    assert isinstance(m4.embed_tokens, Int8Linear) and m4.embed_tokens.per_channel
    m8 = load_model(path, quantization="int8").model
    assert isinstance(m8.layers[0].mlp.down_proj, Int8Linear)
    gg = write_gguf(make_hf_model("llama"), tmp_path / "q.gguf", QT.Q4_0)
    assert isinstance(load_model(gg, quantization="none").model.layers[1].self_attn.o_proj, DenseLinear)
    with pytest.raises(UnsupportedModelError, match="quantization"):
        load_model(path, quantization="int3")


def test_unsupported_tensor_type_names_tensor_and_type(tmp_path) -> None:
    # ternary TQ2_0 (super-blocks of 256: a model 256 wide), a type the engine does not decode
    hf = make_hf_model("llama", hidden_size=256, intermediate_size=512, tie_word_embeddings=True)
    path = write_gguf(hf, tmp_path / "tq2.gguf", QT.TQ2_0, embed_type=QT.Q8_0)
    with pytest.raises(UnsupportedModelError, match=r"'blk\.0\.attn_q\.weight' has type TQ2_0"):
        load_model(path)


def test_missing_tensor_and_missing_path(tmp_path) -> None:
    w = gguf.GGUFWriter(str(tmp_path / "empty.gguf"), "llama")
    for key, value in (("block_count", 1), ("context_length", 64), ("embedding_length", 64),
                       ("feed_forward_length", 128), ("attention.head_count", 2)):  # fmt: skip
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_tensor("token_embd.weight", np.zeros((32, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="lacks tensor 'layers.0"):
        load_model(tmp_path / "empty.gguf")
    with pytest.raises(UnsupportedModelError, match="does not exist"):
        load_model(tmp_path / "nope.gguf")


# -- the real default model ------------------------------------------------------------------------

MEASURE = textwrap.dedent(
    """
    import json, sys
    import psutil, torch
    from backends.engine.model.loader import load_model
    from backends.engine.builder import EngineOptions, load_kernels
    def high_water():  # VmHWM is this process's own peak; ru_maxrss can carry the parent's over exec
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    proc = psutil.Process()
    kernels = load_kernels(EngineOptions())  # built or cached before measuring: the engine's layouts
    before = proc.memory_info().rss
    loaded = load_model(sys.argv[1], dtype=torch.bfloat16, threads=2, kernels=kernels)
    after = proc.memory_info().rss
    print(json.dumps({"before": before, "after": after, "peak": high_water()}))
    """
)


@pytest.mark.slow
def test_smollm2_gguf_config(smollm2_path) -> None:
    from backends.engine.model.gguf_loader import GGUFSource

    source = GGUFSource(smollm2_path)
    cfg = source.config
    source.close()
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == ("llama", 30, 576, 9, 3)
    assert (cfg.head_dim, cfg.intermediate_size, cfg.vocab_size, cfg.rope_theta) == (64, 1536, 49152, 100000.0)
    assert cfg.tie_word_embeddings
    assert source.tensor_types["layers.0.q"] == "Q4_1" and source.tensor_types["embed"] == "Q8_0"
    assert len(source.metadata["tokenizer.ggml.tokens"]) == 49152  # long arrays read on demand


@pytest.mark.slow
def test_smollm2_load_memory_bounds(smollm2_path) -> None:
    """In a fresh process, relative to its RSS just before ``load_model`` (torch imported):
    peak while loading <= 2x the file size, resident after load <= 1.3x."""
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(smollm2_path)], capture_output=True, text=True, cwd=REPO, check=True
    )
    m = json.loads(out.stdout.strip().splitlines()[-1])
    size = smollm2_path.stat().st_size
    assert m["peak"] - m["before"] <= 2.0 * size, m
    assert m["after"] - m["before"] <= 1.3 * size, m
