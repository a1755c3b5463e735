from __future__ import annotations

import pytest


@pytest.fixture(scope="session", params=["native", "avx2"])
def native_kernels(request):  # type: ignore[no-untyped-def]
    """The native kernels in both of this machine's x86 builds: ``native`` (AVX-512 BF16 where the
    CPU has it) and ``avx2`` (``native_target = "avx2"``: AVX2 + FMA, what a CPU without AVX-512
    runs), so every test here checks both variants. Skips where a build is unavailable (no C
    compiler, not x86) or ``avx2`` would be the same variant as ``native``."""
    from backends.engine.builder import EngineOptions, load_kernels

    loaded = load_kernels(EngineOptions(native_target=request.param))
    if loaded is None:
        pytest.skip(f"no {request.param} build of the native kernels on this machine")
    if request.param == "avx2":
        native = load_kernels(EngineOptions())
        if native is not None and native.variant == loaded.variant:
            pytest.skip(f"this machine's native build is already the {loaded.variant} variant")
    return loaded
