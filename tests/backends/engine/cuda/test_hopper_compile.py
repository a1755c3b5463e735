"""The GPU path's Triton kernels compile for the H100/H200 (sm_90) without register spills.

Triton's interpreter (``test_kernels.py``) checks what the kernels compute, not that the real
compiler takes them: a construct the interpreter runs and the compiler refuses, or a kernel that
spills registers to local memory, would first show on a device machine, whose minutes are few.
Triton compiles ahead of time without a GPU (its wheel carries ``ptxas``): each launch that
``GpuKernels`` makes at SmolLM2-135M's shapes (decode of 1 and 64 sequences, a 512-token prompt)
is recorded instead of run, then compiled for sm_90 with the same signature and specialisations
the JIT would give it, and its resources read from the cubin. Skipped where Triton is absent (CI).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))

from backends.engine.cuda import kernels as K  # noqa: E402

pytestmark = pytest.mark.skipif(not K.HAVE_TRITON, reason="needs Triton (the GPU image has it; CPU installs do not)")

KERNELS = ("add_rms_norm_kernel", "rope_write_kv_kernel", "decode_attention_kernel", "merge_splits_kernel",
           "silu_mul_kernel", "int8_matmul_kernel", "int4_matmul_kernel")  # fmt: skip
POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int64: "*i64",
                 torch.int32: "*i32", torch.int8: "*i8", torch.uint8: "*u8"}  # fmt: skip


class Launch:
    """One recorded launch: the kernel and its arguments as the JIT would specialise them."""

    def __init__(self, kernel: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.kernel = kernel
        self.options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        names = kernel.arg_names
        signature: dict[str, str] = {}
        constexprs: dict[str, Any] = {}
        attrs: dict[tuple[int, ...], list[list[Any]]] = {}
        for index, name in enumerate(names):
            value = args[index] if index < len(args) else kwargs[name]
            if name in kwargs or kernel.params[index].is_constexpr:
                signature[name], constexprs[name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[name] = POINTER_TYPES[value.dtype]
                if value.data_ptr() % 16 == 0:  # the JIT assumes 16-byte alignment where it holds
                    attrs[(index,)] = [["tt.divisibility", 16]]
            elif isinstance(value, bool):
                signature[name] = "i1"
            elif isinstance(value, int):
                if value == 1:  # the JIT turns an integer 1 into a constant
                    signature[name], constexprs[name] = "constexpr", 1
                    continue
                signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                if value % 16 == 0:
                    attrs[(index,)] = [["tt.divisibility", 16]]
            elif isinstance(value, float):
                signature[name] = "fp32"
            else:
                raise TypeError(f"{kernel.fn.__name__}: argument {name} of type {type(value).__name__}")
        self.signature, self.constexprs, self.attrs = signature, constexprs, attrs

    @property
    def key(self) -> tuple[str, ...]:
        return (self.kernel.fn.__name__, repr(self.signature), repr(sorted(self.constexprs.items())),
                repr(sorted(self.attrs.items())), repr(sorted(self.options.items())))  # fmt: skip


class Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` records the launch."""

    def __init__(self, kernel: Any, launches: list[Launch]) -> None:
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            self.launches.append(Launch(self.kernel, args, dict(kwargs)))

        return launch


def record_launches(monkeypatch: pytest.MonkeyPatch) -> list[Launch]:
    """Every launch of a SmolLM2-135M-shaped step (9 heads, 3 KV heads, head_dim 64, hidden 576,
    intermediate 1536; bfloat16 activations, float32 residual) for 1 and 64 decoding sequences and
    for a 512-token prompt's norm, rotary and MLP; the int8 vocabulary head (49152 rows) for 1 and
    64 rows, and a layer's under the int8 policy and through ``int4_matmul``."""
    launches: list[Launch] = []
    for name in KERNELS:
        monkeypatch.setattr(K.tk, name, Recorder(getattr(K.tk, name), launches))
    kernels = K.GpuKernels(use_triton=True)
    heads, kv_heads, head_dim, hidden, inter, block = 9, 3, 64, 576, 1536, 16
    num_blocks = 64 * 33 + 1
    k_cache = torch.empty(num_blocks, block, kv_heads, head_dim, dtype=torch.bfloat16)
    v_cache = torch.empty_like(k_cache)
    cos_sin = torch.empty(8192, head_dim)
    for tokens in (1, 64, 512):
        residual = torch.empty(tokens, hidden)
        x = torch.empty(tokens, hidden, dtype=torch.bfloat16)
        weight = torch.empty(hidden)
        kernels.add_rms_norm(None, residual, weight, 1e-5, torch.bfloat16)
        kernels.add_rms_norm(x, residual, weight, 1e-5, torch.bfloat16)
        kernels.add_rms_norm(x, residual, weight, 1e-5, torch.float32)
        qkv = torch.empty(tokens, (heads + 2 * kv_heads) * head_dim, dtype=torch.bfloat16)
        positions, slots = torch.zeros(tokens, dtype=torch.int64), torch.zeros(tokens, dtype=torch.int64)
        k_out = torch.empty(tokens, kv_heads, head_dim, dtype=torch.bfloat16) if tokens == 512 else None
        q = kernels.rope_write_kv(qkv, positions, cos_sin, k_cache, v_cache, slots, heads, kv_heads, k_out)
        kernels.silu_mul(torch.empty(tokens, 2 * inter, dtype=torch.bfloat16))
        head_q, head_s = torch.empty(49152, hidden, dtype=torch.int8), torch.empty(49152, dtype=torch.bfloat16)
        if tokens < 512:
            kernels.int8_matmul(x, head_q, head_s, torch.float32)
        layer_q = torch.empty(2 * inter, hidden, dtype=torch.int8)
        kernels.int8_matmul(x, layer_q, head_s[: 2 * inter], torch.bfloat16)
        packed = torch.empty(2 * inter, hidden // 2, dtype=torch.uint8)
        pairs = torch.empty(hidden // 32, 2 * inter, 2, dtype=torch.bfloat16)
        kernels.int4_matmul(x, packed, pairs, 32, torch.bfloat16)
        if tokens == 512:
            continue  # prompts attend through SDPA
        tables = torch.zeros(tokens, 33, dtype=torch.int64)
        lens = torch.full((tokens,), 513, dtype=torch.int64)
        kernels.decode_attention(q.view(tokens, heads, head_dim), k_cache, v_cache, tables, lens, head_dim**-0.5)
    return launches


def test_kernels_compile_for_sm90_without_spills(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launches = {launch.key: launch for launch in record_launches(monkeypatch)}
    names = {launch.kernel.fn.__name__ for launch in launches.values()}
    assert names == set(KERNELS), names  # one decode batch of 1 splits its context, so the merge runs too
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    usage: dict[str, list[str]] = {}
    for launch in launches.values():
        source = ASTSource(launch.kernel, launch.signature, launch.constexprs, launch.attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=launch.options)
        cubin = tmp_path / f"{launch.kernel.fn.__name__}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        report = subprocess.run([str(cuobjdump), "-res-usage", str(cubin)], capture_output=True, text=True,
                                check=True).stdout  # fmt: skip
        found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", report)
        assert found, report
        regs, stack, shared, local = map(int, found.groups())
        name = launch.kernel.fn.__name__
        usage.setdefault(name, []).append(f"{launch.constexprs} regs={regs} shared={shared}")
        assert local == 0 and stack == 0, f"{name} {launch.constexprs}: spills ({report.strip()})"
    print("\n".join(f"{name}: {entry}" for name, entries in usage.items() for entry in entries))
