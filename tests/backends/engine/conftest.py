from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real default model, through the catalogue (the model cache); skips when it cannot be fetched."""
    from backends.engine.catalogue import PullError, default_home, pull

    try:
        return pull("smollm2-135m-instruct", home=default_home(os.environ), progress=False)
    except PullError as exc:  # offline, with nothing in the cache
        pytest.skip(f"SmolLM2-135M-Instruct GGUF is not available: {exc}")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_path: Path):  # type: ignore[no-untyped-def]
    """HF transformers' tokenizer and float32 model (``eval()``) loaded from the real default
    model's GGUF, dequantised: the reference of the accuracy and LoRA tests, loaded once (~14 s
    each time). Tests only read it; one that wraps it with ``peft`` unloads the adapter after."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = smollm2_path.parent, smollm2_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    return tokenizer, model


@pytest.fixture(scope="session")
def native_kernels():  # type: ignore[no-untyped-def]
    """The native kernels as the engine loads them by default; skips where this machine builds
    none (no C compiler)."""
    from tests.backends.engine.engine_helpers import default_kernels

    loaded = default_kernels()
    if loaded is None:
        pytest.skip("no C compiler here: the engine runs torch's ops (tested elsewhere)")
    return loaded


@pytest.fixture
def native_matmuls(native_kernels):  # type: ignore[no-untyped-def]
    """The native kernels with their int4 and int8 matmuls (``backends/engine/native``); skips
    where this machine builds none (no C compiler, or neither AVX2 nor AVX-512 BF16)."""
    if not (native_kernels.has_int4_matmul and native_kernels.has_int8_matmul):
        pytest.skip("no native int4/int8 matmul on this machine (needs a C compiler and AVX2 or AVX-512 BF16)")
    return native_kernels
