"""Native CPU kernels: C sources in ``kernels/``, built on first use, called through ctypes.

Torch's CPU ops cover almost everything the engine needs; where one does far more work than the
engine asks of it, a small C kernel takes over: attention over the paged cache (decode: torch's
SDPA pays for tiling machinery on a single query row and needs the K/V gathered into a copy
first; prefill: torch's CPU flash attention runs at ~35 GMAC/s on SmolLM2's heads, the kernel at
~130), the int4/int8 matmuls and the fused decoder layer (``fused.py``).

The source is compiled with the system C compiler (``$CC``, default ``cc``) for this machine
(``-march=native``) into ``$TAXIWAY_HOME/kernels/``, keyed by a hash of the source, the flags,
the CPU's features and the compiler's version, so a build happens once per machine; a cached
library that fails to load is rebuilt once. The OpenMP runtime is the one torch already
loaded (same ``libgomp.so.1``), so the kernel's threads are torch's threads. Without a compiler,
or when the build fails, ``load()`` returns ``None`` and the engine keeps torch's path; either
way the choice is logged once. ``TAXIWAY_NATIVE_KERNELS=0`` turns the kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from functools import cache
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

_SOURCES = sorted((Path(__file__).with_name("csrc")).glob("*.c"))
_FLAGS = [
    "-O3", "-march=native", "-fPIC", "-shared", "-fopenmp",
    "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math", "-ffp-contract=fast",
]  # fmt: skip
_BUILD_TIMEOUT_S = 120
_lock = threading.Lock()


def _home() -> Path:
    return Path(os.environ.get("TAXIWAY_HOME", Path.home() / ".cache" / "taxiway"))


def _machine_id(compiler: list[str]) -> str:
    """What a ``-march=native`` build depends on: the CPU's features and the compiler."""
    parts = [platform.machine()]
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    parts += sorted({line for line in text.splitlines() if line.startswith(("flags", "Features", "CPU part"))})
    try:
        done = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30, check=False)
        parts.append(done.stdout)
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "\n".join(parts)


def _build(compiler: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        try:
            done = subprocess.run(
                [*compiler, *_FLAGS, *map(str, _SOURCES), "-o", str(out), "-lm"],
                capture_output=True, text=True, check=False, timeout=_BUILD_TIMEOUT_S,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"{' '.join(compiler)} took over {_BUILD_TIMEOUT_S} s") from exc
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(compiler)} failed: {done.stderr.strip()[-2000:]}")
        os.replace(out, target)  # atomic: concurrent builders (test workers, TP ranks) agree


_i64, _i32, _ptr, _f32 = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p, ctypes.c_float
#: each entry point's C signature (every one returns an int status)
_SIGNATURES: dict[str, list[type]] = {
    "decode_attention_bf16": [_ptr, _i64, _ptr, _ptr, _ptr, _i64, _ptr, _i32, _i32, _i32, _i32, _i32, _i32, _f32, _ptr, _i64, _i32],
    "prefill_attention_bf16": [
        _ptr, _i64, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _ptr, _i32, _i32, _i32, _i32, _i32, _i32, _f32, _ptr, _i64, _i32,
    ],
    "int4_matmul_bf16": [_ptr, _i64, _i64, _ptr, _ptr, _i64, _i64, _i64, _ptr, _i64, _i32, _ptr, _ptr, _i64, _i32],
    "int8_matmul_bf16": [_ptr, _i64, _i64, _ptr, _ptr, _i64, _i64, _i64, _ptr, _i64, _i32],
    "rms_norm_bf16": [_ptr, _i64, _i64, _i64, _ptr, _f32, _ptr, _i64, _i32],
    "rope_kv_bf16": [_ptr, _i64, _i64, _i32, _i32, _i32, _ptr, _ptr, _i64, _ptr, _ptr, _ptr, _i64, _i32],
    "decode_layers_bf16": [
        _ptr, _i32, _ptr, _i64, _i64, _i32, _i32, _i32, _i64, _f32, _f32,
        _ptr, _ptr, _ptr, _i64, _ptr, _i64, _ptr, _i32, _i32, _ptr, _ptr, _ptr, _ptr, _i32,
    ],
}  # fmt: skip


class Kernels:
    """The loaded library with typed entry points (``_SIGNATURES``, as attributes)."""

    decode_attention_bf16: Callable[..., int]
    prefill_attention_bf16: Callable[..., int]
    int4_matmul_bf16: Callable[..., int]
    int8_matmul_bf16: Callable[..., int]
    rms_norm_bf16: Callable[..., int]
    rope_kv_bf16: Callable[..., int]
    decode_layers_bf16: Callable[..., int]

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
            setattr(self, name, fn)
        # whether this machine's build has the fast paths (AVX-512 BF16); without them the
        # kernels refuse every call and the engine keeps torch's ops
        self.has_prefill_attention = bool(lib.prefill_attention_supported())
        self.has_int4_matmul = bool(lib.int4_matmul_supported())
        self.has_int8_matmul = bool(lib.int8_matmul_supported())


@cache
def load() -> Kernels | None:
    """The native kernels for this machine, built if needed; ``None`` when unavailable."""
    if os.environ.get("TAXIWAY_NATIVE_KERNELS", "1") == "0":
        log.info("engine.native_kernels", status="off (TAXIWAY_NATIVE_KERNELS=0)")
        return None
    compiler = shlex.split(os.environ.get("CC", "cc")) or ["cc"]
    if shutil.which(compiler[0]) is None:
        log.info("engine.native_kernels", status=f"unavailable: no C compiler ({compiler[0]})")
        return None
    headers = sorted(_SOURCES[0].parent.glob("*.h"))
    parts = [*(s.read_bytes() for s in [*_SOURCES, *headers]), " ".join(_FLAGS).encode(), _machine_id(compiler).encode()]
    digest = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    target = _home() / "kernels" / f"taxiway_kernels-{digest}.so"
    kernels = None
    error: Exception | None = None
    with _lock:
        for attempt in range(2):  # a cached library that does not load is rebuilt once
            try:
                if attempt or not target.exists():
                    _build(compiler, target)
                kernels = Kernels(ctypes.CDLL(str(target)), target)
                break
            except (OSError, RuntimeError, AttributeError) as exc:
                error = exc
                if isinstance(exc, RuntimeError):
                    break  # the compiler itself failed: building again gives the same
    if kernels is None:
        log.warning("engine.native_kernels", status=f"unavailable: {error}")
        return None
    log.info("engine.native_kernels", status="on", path=str(target))
    return kernels
