"""The native decode-attention kernel (``backends/engine/native/csrc``) against torch's SDPA over
the same paged cache, at SmolLM2's shapes and at odd ones; the build's fallbacks and settings; the
ABI check that refuses a struct mirror differing from the library."""

from __future__ import annotations

import ctypes
import random

import pytest
import torch
import torch.nn.functional as F

from backends.engine.builder import EngineOptions, load_kernels
from backends.engine.model.attention import AttentionMetadata, AttentionPlan, paged_attention
from backends.engine.native import abi, ckernels


@pytest.fixture
def kernels(native_kernels):  # type: ignore[no-untyped-def]
    return native_kernels


@pytest.fixture
def two_threads():  # type: ignore[no-untyped-def]
    """2 threads whatever the machine: fewer than 4 sequences then split by KV head and 4 or more
    run whole, so the cases below cover both of the kernel's ways of dividing the work."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def decode_case(seed: int, heads: int, kv_heads: int, head_dim: int, block_size: int, num_seqs: int, max_len: int):  # type: ignore[no-untyped-def]
    """Decode rows for ``num_seqs`` sequences over shuffled blocks; returns the step's inputs and an
    exact float32 reference computed from contiguous copies."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    lens = [rng.randint(1, max_len) for _ in range(num_seqs)]
    num_blocks = sum(-(-n // block_size) for n in lens) + 2
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).bfloat16()
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).bfloat16()
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in lens]
    q = torch.randn(num_seqs, heads, head_dim, generator=gen).bfloat16()
    k_new = torch.randn(num_seqs, kv_heads, head_dim, generator=gen).bfloat16()
    v_new = torch.randn(num_seqs, kv_heads, head_dim, generator=gen).bfloat16()
    attn = AttentionMetadata.from_lists(query_lens=[1] * num_seqs, seq_lens=lens, block_tables=tables, block_size=block_size)
    refs = []
    for i, n in enumerate(lens):
        slots = [tables[i][p // block_size] * block_size + p % block_size for p in range(n)]
        k = k_cache.view(-1, kv_heads, head_dim)[slots].clone()
        v = v_cache.view(-1, kv_heads, head_dim)[slots].clone()
        k[-1], v[-1] = k_new[i], v_new[i]  # this step's K/V, written by paged_attention
        rep = heads // kv_heads
        o = F.scaled_dot_product_attention(
            q[i].float().unsqueeze(1),  # [H, 1, D]
            k.float().repeat_interleave(rep, dim=1).transpose(0, 1),
            v.float().repeat_interleave(rep, dim=1).transpose(0, 1),
            scale=head_dim**-0.5,
        )
        refs.append(o.reshape(heads * head_dim))
    return q, k_new, v_new, k_cache, v_cache, attn, torch.stack(refs)


def run(case, block_size: int, head_dim: int, *, kernels) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """``paged_attention`` on ``case`` with ``kernels`` (None: torch's path alone)."""
    q, k_new, v_new, k_cache, v_cache, attn, _ = case
    plan = AttentionPlan.build(attn, block_size)
    return paged_attention(q, k_new, v_new, k_cache.clone(), v_cache.clone(), plan, head_dim**-0.5, kernels=kernels).float()


@pytest.mark.parametrize(
    ("seed", "heads", "kv_heads", "head_dim", "block_size", "num_seqs", "max_len"),
    [
        (0, 9, 3, 64, 16, 1, 700),  # SmolLM2, one stream
        (1, 9, 3, 64, 16, 16, 900),  # SmolLM2, a full batch
        (2, 8, 8, 32, 4, 5, 50),  # no GQA
        (3, 12, 2, 80, 1, 3, 40),  # group of 6, block size 1
        (4, 4, 1, 128, 32, 7, 300),  # one KV head (MQA)
        (5, 16, 1, 64, 16, 3, 47),  # the largest group, lengths off 16-key tiles
        (6, 6, 2, 72, 16, 2, 90),  # head_dim not a multiple of 16: the scalar tails
        (7, 6, 2, 72, 16, 9, 90),
    ],
)
def test_native_decode_matches_exact_attention(kernels, two_threads, monkeypatch, seed, heads, kv_heads, head_dim, block_size, num_seqs, max_len) -> None:  # type: ignore[no-untyped-def]
    calls = []
    real = kernels.decode_attention_bf16

    def spy(*args):  # type: ignore[no-untyped-def]
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(kernels, "decode_attention_bf16", spy)
    case = decode_case(seed, heads, kv_heads, head_dim, block_size, num_seqs, max_len)
    ref = case[-1]
    native = run(case, block_size, head_dim, kernels=kernels)
    assert len(calls) == 1, "the native kernel did not run"
    torch_out = run(case, block_size, head_dim, kernels=None)
    # float32 math on bfloat16 inputs, rounded once: within half a bfloat16 step of the exact value
    half_ulp = ref.abs().clamp_min(2**-10) * 2**-8
    assert ((native - ref).abs() <= half_ulp * 1.01).all()
    # and at least as close as torch's SDPA path
    assert (native - ref).abs().max() <= (torch_out - ref).abs().max() + 1e-6


def test_unsupported_shape_falls_back_to_torch(kernels, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # a query group of 32 exceeds the kernel's MAX_GROUP: it declines and torch's path answers
    case = decode_case(5, 32, 1, 16, 4, 2, 20)
    out = run(case, 4, 16, kernels=kernels)
    torch.testing.assert_close(out, case[-1], atol=2e-2, rtol=2e-2)


def test_switch_off_and_missing_compiler(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert ckernels.load(ckernels.KernelBuild(cache_dir=tmp_path / "kernels", enabled=False)) is None
    assert ckernels.load(ckernels.KernelBuild(cache_dir=tmp_path / "kernels", compiler=("no-such-compiler-here",))) is None
    assert not (tmp_path / "kernels").exists()


def test_the_engine_options_and_environment_choose_the_build(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """What the ckernels docstring promises: ``TAXIWAY_NATIVE_KERNELS=0`` or ``native_kernels =
    false`` turn the kernels off, ``$CC`` is the compiler, ``$TAXIWAY_HOME/kernels`` the cache."""
    env = {"TAXIWAY_HOME": str(tmp_path)}
    assert load_kernels(EngineOptions(), {**env, "TAXIWAY_NATIVE_KERNELS": "0"}) is None
    assert load_kernels(EngineOptions(native_kernels=False), env) is None
    assert load_kernels(EngineOptions(), {**env, "CC": "no-such-compiler-here --flag"}) is None
    assert not (tmp_path / "kernels").exists()


def test_a_mismatched_struct_mirror_is_refused_naming_the_field(kernels) -> None:  # type: ignore[no-untyped-def]
    """The library's layout table against ctypes mirrors that differ from abi.h: two fields
    swapped, a field of another width, a field missing, another kind at the same size."""
    layout = kernels.layout
    abi.check_layout(layout)  # the real mirrors match
    _p, _i64, _i32, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float
    fields = list(abi.Int8MatmulArgs._fields_)

    def mirror(new_fields):  # type: ignore[no-untyped-def]
        return type("Int8MatmulArgs", (ctypes.Structure,), {"_fields_": new_fields})

    swapped = [fields[0], fields[2], fields[1], *fields[3:]]  # m before x_stride: same sizes, other names
    with pytest.raises(abi.AbiMismatchError, match=r"Int8MatmulArgs\.m: the library has it at offset 16"):
        abi.check_layout(layout, [mirror(swapped)])
    narrow = [(n, _i32 if n == "n" else t) for n, t in fields]
    with pytest.raises(abi.AbiMismatchError, match=r"Int8MatmulArgs\.n:"):
        abi.check_layout(layout, [mirror(narrow)])
    with pytest.raises(abi.AbiMismatchError, match=r"Int8MatmulArgs\.scales: in the library's"):
        abi.check_layout(layout, [mirror(fields[:-1])])  # the last field missing
    floats = [(n, _f32 if n == "num_threads" else t) for n, t in fields]
    with pytest.raises(abi.AbiMismatchError, match=r"Int8MatmulArgs\.num_threads: .*kind 'i'.*kind 'f'"):
        abi.check_layout(layout, [mirror(floats)])
    with pytest.raises(abi.AbiMismatchError, match="no struct Unknown"):
        abi.check_layout(layout, [type("Unknown", (ctypes.Structure,), {"_fields_": [("x", _p)]})])


def test_block_id_outside_the_cache_is_refused(kernels) -> None:  # type: ignore[no-untyped-def]
    q, _, _, k_cache, v_cache, attn, _ = decode_case(8, 9, 3, 64, 16, 2, 40)
    tables = attn.block_tables.clone()
    tables[1, 0] = k_cache.shape[0]  # one past the last block
    out = torch.full((2, 9 * 64), 7.0).bfloat16()
    status = kernels.decode_attention_bf16(
        abi.PagedAttentionArgs(
            q=q.data_ptr(), q_stride=q.stride(0), k_cache=k_cache.data_ptr(), v_cache=v_cache.data_ptr(),
            tables=tables.data_ptr(), table_stride=tables.stride(0), seq_lens=attn.seq_lens.data_ptr(),
            num_blocks=k_cache.shape[0], num_seqs=2, num_heads=9, num_kv_heads=3, head_dim=64, block_size=16,
            scale=0.125, out=out.data_ptr(), out_stride=out.stride(0), num_threads=2,
        )
    )  # fmt: skip
    assert status == -1
    assert torch.equal(out[1], torch.full((9 * 64,), 7.0).bfloat16())  # the bad sequence wrote nothing


def test_nan_propagates_like_sdpa(kernels, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    case = decode_case(9, 9, 3, 64, 16, 1, 64)
    case[0][0, 0, 0] = float("nan")  # query head 0 of the only sequence
    out = run(case, 16, 64, kernels=kernels)
    assert out[0, :64].isnan().all()  # that head's output
    assert not out[0, 64:].isnan().any()  # the others are untouched


def test_the_target_chooses_the_variant(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``native_target = "avx2"`` (or ``TAXIWAY_NATIVE_TARGET=avx2``) builds the AVX2 + FMA variant
    with its matmuls wherever the CPU runs it; an unknown target is a config error naming the key."""
    from gateway.errors import ConfigError

    env = {"TAXIWAY_HOME": str(tmp_path)}
    with pytest.raises(ConfigError, match="TAXIWAY_NATIVE_TARGET"):
        load_kernels(EngineOptions(), {**env, "TAXIWAY_NATIVE_TARGET": "sse2"})
    if not ckernels.cpu_runs("avx2"):
        assert load_kernels(EngineOptions(native_target="avx2"), env) is None
        return
    for loaded in (load_kernels(EngineOptions(native_target="avx2"), env),
                   load_kernels(EngineOptions(), {**env, "TAXIWAY_NATIVE_TARGET": "avx2"})):  # fmt: skip
        assert loaded is not None and loaded.variant == "avx2-fma"
        assert loaded.has_int4_matmul and loaded.has_int8_matmul and not loaded.has_prefill_attention
