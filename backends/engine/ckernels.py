"""Native CPU kernels: C sources in ``kernels/``, built on first use, called through ctypes.

Torch's CPU ops cover almost everything the engine needs; where one does far more work than the
engine asks of it, a small C kernel takes over. Today that is decode attention: torch's SDPA
pays for tiling machinery on a single query row and needs the paged K/V gathered into a copy
first (SmolLM2, 16 sequences of ~500 keys: ~0.9 ms per layer gathered and attended).

The source is compiled with the system C compiler (``$CC``, default ``cc``) for this machine
(``-march=native``) into ``$TAXIWAY_HOME/kernels/``, keyed by a hash of the source, the flags
and the CPU, so a build happens once per machine. The OpenMP runtime is the one torch already
loaded (same ``libgomp.so.1``), so the kernel's threads are torch's threads. Without a compiler,
or when the build fails, ``load()`` returns ``None`` and the engine keeps torch's path; either
way the choice is logged once. ``TAXIWAY_NATIVE_KERNELS=0`` turns the kernels off.
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
from functools import cache
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

_SOURCE = Path(__file__).with_name("kernels") / "decode_attention.c"
_FLAGS = [
    "-O3", "-march=native", "-fPIC", "-shared", "-fopenmp",
    "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math", "-ffp-contract=fast",
]  # fmt: skip
_lock = threading.Lock()


def _home() -> Path:
    return Path(os.environ.get("TAXIWAY_HOME", Path.home() / ".cache" / "taxiway"))


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    for line in text.splitlines():
        if line.startswith("flags"):
            return line
    return platform.machine()


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        done = subprocess.run(
            [compiler, *_FLAGS, str(_SOURCE), "-o", str(out), "-lm"], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
        os.replace(out, target)  # atomic: concurrent builders (test workers, TP ranks) agree


class Kernels:
    """The loaded library with typed entry points."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        fn = lib.decode_attention_bf16
        i64, i32, ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
        fn.argtypes = [ptr, i64, ptr, ptr, ptr, i64, ptr, i32, i32, i32, i32, i32, ctypes.c_float, ptr, i64, i32]
        fn.restype = ctypes.c_int
        self.decode_attention_bf16 = fn


@cache
def load() -> Kernels | None:
    """The native kernels for this machine, built if needed; ``None`` when unavailable."""
    if os.environ.get("TAXIWAY_NATIVE_KERNELS", "1") == "0":
        log.info("engine.native_kernels", status="off (TAXIWAY_NATIVE_KERNELS=0)")
        return None
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        log.info("engine.native_kernels", status=f"unavailable: no C compiler ({compiler})")
        return None
    key = hashlib.sha256(b"\0".join([_SOURCE.read_bytes(), " ".join(_FLAGS).encode(), _cpu_id().encode()]))
    target = _home() / "kernels" / f"decode_attention-{key.hexdigest()[:16]}.so"
    try:
        with _lock:
            if not target.exists():
                _build(compiler, target)
        kernels = Kernels(ctypes.CDLL(str(target)), target)
    except (OSError, RuntimeError) as exc:
        log.warning("engine.native_kernels", status=f"unavailable: {exc}")
        return None
    log.info("engine.native_kernels", status="on", path=str(target))
    return kernels
