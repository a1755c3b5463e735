"""Native CPU kernels: C sources in ``csrc/``, built on first use, called through ctypes.

Torch's CPU ops cover almost everything the engine needs; where one does far more work than the
engine asks of it, a small C kernel takes over: attention over the paged cache (decode: torch's
SDPA pays for tiling machinery on a single query row and needs the K/V gathered into a copy
first; prefill: torch's CPU flash attention runs at ~35 GMAC/s on SmolLM2's heads, the kernel at
~130), the int4/int8 matmuls and the fused decoder layer (``fused.py``).

``load(KernelBuild(...))`` compiles the sources with the given compiler (the engine passes
``$CC``, default ``cc``) for this machine (``-march=native``) into the given cache directory (the
engine passes ``$TAXIWAY_HOME/kernels/``), keyed by a hash of the source, the flags, the CPU's
features and the compiler's version, so a build happens once per machine; a cached library that
fails to load is rebuilt once. The variant of the kernels follows the instruction set the
compiler targets (``csrc/simd.h``): AVX-512 BF16 where the CPU has it, else AVX2 + FMA, else
scalar code without the matmuls. ``target="avx2"`` (the engine option ``native_target``) builds
for ``-march=x86-64-v3`` instead: the AVX2 variant on any x86-64 CPU with AVX2, what a CPU without
AVX-512 runs, for testing and benchmarking it on one that has it. The variant is logged with the
load (``engine.native_kernels variant=...``). The OpenMP runtime is the one torch already loaded (same
``libgomp.so.1``), so the kernel's threads are torch's threads. Without a compiler, or when the
build fails, ``load`` returns ``None`` and the engine keeps torch's path; either way the choice
is logged once. ``TAXIWAY_NATIVE_KERNELS=0`` (or the engine option ``native_kernels = false``)
turns the kernels off: ``enabled=False``. The environment is read by the engine's options
(``builder.load_kernels``), not here.

Every entry point takes one struct (``csrc/abi.h``, mirrored in ``abi.py``); the mirrors are
checked against the library's own layout table when it loads (``abi.AbiMismatchError``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Literal

import msgspec
import structlog

from backends.engine.native import abi

log = structlog.get_logger(__name__)

_SOURCES = sorted((Path(__file__).with_name("csrc")).glob("*.c"))
_FLAGS = [
    "-O3", "-fPIC", "-shared", "-fopenmp",
    "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math", "-ffp-contract=fast",
]  # fmt: skip
#: the instruction set each ``KernelBuild.target`` compiles for
_MARCH = {"native": "-march=native", "avx2": "-march=x86-64-v3"}
_BUILD_TIMEOUT_S = 120
_lock = threading.Lock()


class KernelBuild(msgspec.Struct, frozen=True, kw_only=True):
    """How to get the kernels: where the built library is cached, which compiler builds it
    (a command line, e.g. ``("ccache", "gcc")``), for which instruction set (``target``: this
    CPU's, or AVX2 + FMA only), or not at all (``enabled=False``)."""

    cache_dir: Path
    compiler: tuple[str, ...] = ("cc",)
    target: Literal["native", "avx2"] = "native"
    enabled: bool = True

    @property
    def flags(self) -> list[str]:
        return [_MARCH[self.target], *_FLAGS]


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


def cpu_runs(target: str) -> bool:
    """Whether this CPU runs a build for ``target`` (``"native"`` always does)."""
    if target == "native":
        return True
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return {"avx2", "fma", "f16c", "bmi2", "movbe"} <= set(flags)


def _build(compiler: list[str], flags: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        try:
            done = subprocess.run(
                [*compiler, *flags, *map(str, _SOURCES), "-o", str(out), "-lm"],
                capture_output=True, text=True, check=False, timeout=_BUILD_TIMEOUT_S,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"{' '.join(compiler)} took over {_BUILD_TIMEOUT_S} s") from exc
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(compiler)} failed: {done.stderr.strip()[-2000:]}")
        os.replace(out, target)  # atomic: concurrent builders (test workers, TP ranks) agree


#: each entry point and the struct it takes (every one returns an int status)
_ENTRY_POINTS: dict[str, type[ctypes.Structure]] = {
    "decode_attention_bf16": abi.PagedAttentionArgs,
    "prefill_attention_bf16": abi.PagedAttentionArgs,
    "int4_matmul_bf16": abi.Int4MatmulArgs,
    "int8_matmul_bf16": abi.Int8MatmulArgs,
    "rms_norm_bf16": abi.RmsNormArgs,
    "rope_kv_bf16": abi.RopeKvArgs,
    "decode_layers_bf16": abi.DecodeLayersArgs,
    "projection_matmul_bf16": abi.ProjectionMatmulArgs,
    "lora_add_bf16": abi.LoraAddArgs,
}


class Kernels:
    """The loaded library: each entry point of ``_ENTRY_POINTS`` as an attribute taking its struct
    (``kernels.int4_matmul_bf16(abi.Int4MatmulArgs(x=..., ...))``). Built only from a library whose
    layout table matches ``abi.py`` (``abi.AbiMismatchError`` otherwise)."""

    decode_attention_bf16: Callable[[abi.PagedAttentionArgs], int]
    prefill_attention_bf16: Callable[[abi.PagedAttentionArgs], int]
    int4_matmul_bf16: Callable[[abi.Int4MatmulArgs], int]
    int8_matmul_bf16: Callable[[abi.Int8MatmulArgs], int]
    rms_norm_bf16: Callable[[abi.RmsNormArgs], int]
    rope_kv_bf16: Callable[[abi.RopeKvArgs], int]
    decode_layers_bf16: Callable[[abi.DecodeLayersArgs], int]
    projection_matmul_bf16: Callable[[abi.ProjectionMatmulArgs], int]
    lora_add_bf16: Callable[[abi.LoraAddArgs], int]

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        fields = lib.taxiway_abi_fields
        fields.argtypes = []
        fields.restype = ctypes.POINTER(abi.AbiField)
        self.layout = abi.read_layout(fields())
        abi.check_layout(self.layout)
        for name, struct in _ENTRY_POINTS.items():
            fn = getattr(lib, name)
            fn.argtypes = [ctypes.POINTER(struct)]
            fn.restype = ctypes.c_int
            setattr(self, name, fn)
        variant = lib.taxiway_kernel_variant
        variant.argtypes = []
        variant.restype = ctypes.c_char_p
        #: which code the build runs (csrc/simd.h): "avx512-bf16", "avx2-fma" or "generic"
        self.variant: str = variant().decode()
        # whether this build has the fast paths (AVX-512 BF16 or AVX2 for the matmuls, AVX-512
        # BF16 for prefill attention); without one a kernel refuses every call and the engine
        # keeps torch's op
        self.has_prefill_attention = bool(lib.prefill_attention_supported())
        self.has_int4_matmul = bool(lib.int4_matmul_supported())
        self.has_int8_matmul = bool(lib.int8_matmul_supported())
        self.has_int5_matmul = bool(lib.projection_matmul_supported())


@cache
def load(build: KernelBuild) -> Kernels | None:
    """The native kernels for this machine, built if needed; ``None`` when off or unavailable.
    Once per ``build`` (cached): every caller with the same settings shares one ``Kernels``."""
    if not build.enabled:
        log.info("engine.native_kernels", status="off")
        return None
    compiler = list(build.compiler) or ["cc"]
    if shutil.which(compiler[0]) is None:
        log.info("engine.native_kernels", status=f"unavailable: no C compiler ({compiler[0]})")
        return None
    if not cpu_runs(build.target):
        log.warning("engine.native_kernels", status=f"unavailable: this CPU cannot run the {build.target} build")
        return None
    headers = sorted(_SOURCES[0].parent.glob("*.h"))
    flags = build.flags
    parts = [*(s.read_bytes() for s in [*_SOURCES, *headers]), " ".join(flags).encode(), _machine_id(compiler).encode()]
    digest = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    target = build.cache_dir / f"taxiway_kernels-{digest}.so"
    kernels = None
    error: Exception | None = None
    with _lock:
        for attempt in range(2):  # a cached library that does not load is rebuilt once
            try:
                if attempt or not target.exists():
                    _build(compiler, flags, target)
                kernels = Kernels(ctypes.CDLL(str(target)), target)
                break
            except (OSError, RuntimeError, AttributeError) as exc:
                error = exc
                if isinstance(exc, RuntimeError):
                    break  # the compiler itself failed: building again gives the same
    if kernels is None:
        log.warning("engine.native_kernels", status=f"unavailable: {error}")
        return None
    log.info(
        "engine.native_kernels", status="on", variant=kernels.variant, target=build.target,
        int4_matmul=kernels.has_int4_matmul, int8_matmul=kernels.has_int8_matmul,
        prefill_attention=kernels.has_prefill_attention, path=str(target),
    )  # fmt: skip
    return kernels
