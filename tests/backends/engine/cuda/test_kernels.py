"""The GPU path's Triton kernels against their torch definitions (``cuda/kernels.py``).

On a CUDA machine they run on the GPU (marked ``gpu``); on a CPU machine with Triton installed
they run in Triton's interpreter (``TRITON_INTERPRET=1``, in a subprocess: the variable must be set
before Triton compiles anything), so the kernels' indexing is checked before any device is lent.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(REPO))

from backends.engine.cuda import kernels as K  # noqa: E402
from backends.engine.cuda import reference as R  # noqa: E402


def check_kernels(device: str) -> None:
    """Each Triton kernel equals its torch definition on shapes like SmolLM2's (9 heads, 3 KV
    heads, head_dim 64) and odd ones (a non-power-of-two width, one KV head, a GQA group of 1)."""
    g = torch.Generator().manual_seed(0)
    tri, ref = K.GpuKernels(use_triton=True), K.GpuKernels(use_triton=False)

    def randn(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    for dim in (576, 100):
        for with_x in (True, False):
            res = randn(5, dim, dtype=torch.float32)
            x = randn(5, dim) if with_x else None
            w = randn(dim, dtype=torch.float32)
            r1, r2 = res.clone(), res.clone()
            for out_dtype in (torch.bfloat16, torch.float32):
                a = tri.add_rms_norm(x, r1, w, 1e-5, out_dtype)
                b = ref.add_rms_norm(x, r2, w, 1e-5, out_dtype)
                torch.testing.assert_close(r1, r2)
                torch.testing.assert_close(a, b, rtol=2e-2 if out_dtype == torch.bfloat16 else 1e-5, atol=1e-5)

    for heads, kv_heads, head_dim in ((9, 3, 64), (4, 4, 32), (8, 1, 128)):
        num_blocks, block_size, tokens = 12, 16, 7
        qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim)
        positions = torch.tensor([0, 3, 17, 100, 5, 64, 1], device=device)
        inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        freqs = torch.arange(128).float().unsqueeze(1) * inv
        cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)
        slots = torch.tensor([5, 33, 34, 190, 16, 0, 100], device=device)
        caches = [torch.zeros(num_blocks, block_size, kv_heads, head_dim, dtype=torch.bfloat16, device=device) for _ in range(4)]
        k_outs = [torch.zeros(tokens, kv_heads, head_dim, dtype=torch.bfloat16, device=device) for _ in range(2)]
        qa = tri.rope_write_kv(qkv, positions, cos_sin, caches[0], caches[1], slots, heads, kv_heads, k_outs[0])
        qb = ref.rope_write_kv(qkv, positions, cos_sin, caches[2], caches[3], slots, heads, kv_heads, k_outs[1])
        torch.testing.assert_close(qa, qb, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(caches[0], caches[2], rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(caches[1], caches[3], rtol=0, atol=0)  # v is copied as is
        torch.testing.assert_close(k_outs[0], k_outs[1], rtol=1e-2, atol=1e-2)

        # attention: a cache of random K/V, sequences of mixed lengths over scattered blocks
        k_cache, v_cache = randn(num_blocks, block_size, kv_heads, head_dim), randn(num_blocks, block_size, kv_heads, head_dim)
        lens = torch.tensor([1, 16, 17, 70, 33], device=device, dtype=torch.int32)
        tables = torch.tensor([[3, 0, 0, 0, 0], [7, 0, 0, 0, 0], [2, 9, 0, 0, 0], [11, 1, 4, 6, 8], [5, 10, 0, 0, 0]],
                              device=device, dtype=torch.int32)  # fmt: skip
        q = randn(5, heads, head_dim)
        expected = ref.decode_attention(q, k_cache, v_cache, tables, lens, head_dim**-0.5)
        for splits in (1, 2, 4, None):
            got = tri.decode_attention(q, k_cache, v_cache, tables, lens, head_dim**-0.5, splits)
            torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
        got64 = tri.decode_attention(q, k_cache, v_cache, tables.long(), lens.long(), head_dim**-0.5, 2)
        torch.testing.assert_close(got64, expected, rtol=2e-2, atol=2e-2)

    gate_up = randn(3, 2 * 1536)
    torch.testing.assert_close(tri.silu_mul(gate_up), ref.silu_mul(gate_up), rtol=1e-2, atol=1e-2)

    # per-channel int8: a vocabulary-like N that no tile divides, K of SmolLM2 and an odd one
    for m, n, k in ((1, 300, 576), (5, 300, 100), (33, 70, 576)):
        q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(device)
        scales = (torch.rand(n, generator=g) / 100).to(torch.bfloat16).to(device)
        for x_dtype, out_dtype in ((torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                   (torch.float32, torch.float32)):  # fmt: skip
            x = randn(m, k, dtype=x_dtype)
            got = tri.int8_matmul(x, q, scales, out_dtype)
            assert got.dtype == out_dtype and got.shape == (m, n)
            exact = out_dtype == torch.float32 and (x_dtype == torch.float32 or device == "cpu")
            tol = 1e-5 if exact else 2e-2
            torch.testing.assert_close(got, ref.int8_matmul(x, q, scales, out_dtype), rtol=tol, atol=tol)

    # groupwise int4 in our packing: SmolLM2's K (9 tiles), an N no tile divides, groups of 32 and 64
    for m, n, k, group_size in ((1, 300, 576, 32), (5, 70, 128, 64), (33, 64, 192, 32)):
        codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
        packed = R.pack_int4(codes).to(device)
        assert torch.equal(R.unpack_int4(packed).cpu(), codes)
        sz32 = torch.randn(k // group_size, n, 2, generator=g) / 50
        for x_dtype in (torch.float32, torch.bfloat16):
            sz = sz32.to(x_dtype)  # (scale, zero) in the compute dtype, as the modules hold them
            dense = (codes.float() - 8) * sz[..., 0].float().t().repeat_interleave(group_size, 1)
            dense += sz[..., 1].float().t().repeat_interleave(group_size, 1)  # W = (q - 8) * scale + zero
            x = randn(m, k, dtype=x_dtype)
            sz = sz.to(device)
            expected = ref.int4_matmul(x, packed, sz, group_size, torch.float32)
            torch.testing.assert_close(expected.cpu(), x.float().cpu() @ dense.t(), rtol=1e-5, atol=1e-5)
            got = tri.int4_matmul(x, packed, sz, group_size, torch.float32)
            tol = 1e-5 if x_dtype == torch.float32 or device == "cpu" else 2e-2
            torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


def patch_interpreter() -> None:
    """Triton 3.6's interpreter turns a loop bound into an int with ``int(array)``, which numpy 2
    refuses for its one-element arrays: ``range`` over a loaded length fails there (and only
    there; compiled kernels take the bound as a scalar). Read the element instead."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):  # type: ignore[no-untyped-def]
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and K.HAVE_TRITON), reason="needs CUDA and Triton")
def test_kernels_on_cuda() -> None:
    check_kernels("cuda")


@pytest.mark.skipif(not K.HAVE_TRITON, reason="needs Triton (the GPU image has it; CPU installs do not)")
def test_kernels_in_triton_interpreter() -> None:
    code = (
        "from tests.backends.engine.cuda.test_kernels import check_kernels, patch_interpreter;"
        "patch_interpreter(); check_kernels('cpu')"
    )
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])  # keep wheels installed by path
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
