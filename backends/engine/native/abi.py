"""The kernels' ABI on the Python side: one ``ctypes.Structure`` per struct of ``csrc/abi.h``.

Every entry point takes a pointer to one of these (built with field names at the call site, never
positionally). ``check_layout`` compares each mirror with the layout table the library was built
with (``taxiway_abi_fields``): a field missing, moved, resized or of another kind is refused when
the library loads, naming the struct and the field, instead of a call that reads garbage.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable

_p, _i64, _i32, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float


class AbiMismatchError(Exception):
    """A ctypes mirror and the built library disagree on a struct's layout (a bug in this
    checkout, not a missing compiler: never taken for "kernels unavailable")."""


class PagedAttentionArgs(ctypes.Structure):
    _fields_ = [
        ("q", _p), ("q_stride", _i64), ("k_cache", _p), ("v_cache", _p), ("tables", _p), ("table_stride", _i64),
        ("q_starts", _p), ("q_lens", _p), ("seq_lens", _p),
        ("num_blocks", _i32), ("num_seqs", _i32), ("num_heads", _i32), ("num_kv_heads", _i32), ("head_dim", _i32),
        ("block_size", _i32), ("scale", _f32), ("out", _p), ("out_stride", _i64), ("num_threads", _i32),
    ]  # fmt: skip


class Int4MatmulArgs(ctypes.Structure):
    _fields_ = [
        ("x", _p), ("x_stride", _i64), ("m", _i64), ("w", _p), ("sz", _p), ("n", _i64), ("k", _i64),
        ("group_size", _i64), ("y", _p), ("y_stride", _i64), ("num_threads", _i32), ("bias", _p), ("residual", _p),
        ("residual_stride", _i64), ("act", _i32), ("scales", _i32),
    ]  # fmt: skip


class Int8MatmulArgs(ctypes.Structure):
    _fields_ = [
        ("x", _p), ("x_stride", _i64), ("m", _i64), ("w", _p), ("d", _p), ("n", _i64), ("k", _i64),
        ("group_size", _i64), ("y", _p), ("y_stride", _i64), ("num_threads", _i32), ("scales", _i32),
    ]  # fmt: skip


class RmsNormArgs(ctypes.Structure):
    _fields_ = [
        ("x", _p), ("x_stride", _i64), ("m", _i64), ("d", _i64), ("w", _p), ("eps", _f32), ("out", _p),
        ("out_stride", _i64), ("num_threads", _i32),
    ]  # fmt: skip


class RopeKvArgs(ctypes.Structure):
    _fields_ = [
        ("qkv", _p), ("qkv_stride", _i64), ("t", _i64), ("num_heads", _i32), ("num_kv_heads", _i32),
        ("head_dim", _i32), ("cos", _p), ("sin", _p), ("cs_stride", _i64), ("slots", _p), ("k_cache", _p),
        ("v_cache", _p), ("num_slots", _i64), ("num_threads", _i32),
    ]  # fmt: skip


class Projection(ctypes.Structure):
    _fields_ = [
        ("w", _p), ("sz", _p), ("bias", _p), ("n", _i64), ("gs", _i64), ("hb", _p), ("d", _p), ("kind", _i32),
        ("scales", _i32),
    ]  # fmt: skip


#: ``Projection.kind``: the layout of its weight
PROJECTION_INT4, PROJECTION_INT5, PROJECTION_INT8, PROJECTION_INT6 = 0, 1, 2, 3
#: ``Projection.scales`` of int5: float32 scales and zeros, float32 scales, float16 scales
INT5_SCALES_ZEROS, INT5_SCALES_F32, INT5_SCALES_F16 = 0, 1, 2
#: ``Int4MatmulArgs.scales`` (and ``Projection.scales`` of int4): bfloat16 (scale, zero) pairs,
#: float16 scales without zeros, float16 ``d`` and ``m`` with ``W = d * q + m`` (GGUF's Q4_1), laid
#: out ``[G, N / 16, 2, 16]`` (each 16 rows' ``d``, then their ``m``)
INT4_SCALES_BF16_PAIRS, INT4_SCALES_F16, INT4_SCALES_F16_OFFSETS = 0, 2, 3
#: ``Int8MatmulArgs.scales`` (and ``Projection.scales`` of int8): float32 or float16 ``d``
INT8_SCALES_F32, INT8_SCALES_F16 = 0, 2


class ProjectionMatmulArgs(ctypes.Structure):
    _fields_ = [
        ("p", _p), ("x", _p), ("x_stride", _i64), ("m", _i64), ("k", _i64), ("y", _p), ("y_stride", _i64),
        ("residual", _p), ("residual_stride", _i64), ("act", _i32), ("num_threads", _i32),
    ]  # fmt: skip


class LoraTerm(ctypes.Structure):
    _fields_ = [("a", _p), ("bt", _p), ("start", _p), ("count", _p)]


class LoraAddArgs(ctypes.Structure):
    _fields_ = [
        ("term", LoraTerm), ("x", _p), ("x_stride", _i64), ("t", _i64), ("k", _i64), ("gated", _i32),
        ("y", _p), ("y_stride", _i64), ("residual", _p), ("residual_stride", _i64), ("n", _i64),
        ("num_threads", _i32),
    ]  # fmt: skip


class LayerWeights(ctypes.Structure):
    _fields_ = [
        ("attn_norm", _p), ("ffn_norm", _p),
        ("qkv", Projection), ("o", Projection), ("gate_up", Projection), ("down", Projection),
        ("k_cache", _p), ("v_cache", _p),
        ("lora_qkv", LoraTerm), ("lora_o", LoraTerm), ("lora_gate_up", LoraTerm), ("lora_down", LoraTerm),
    ]  # fmt: skip


class DecodeLayersArgs(ctypes.Structure):
    _fields_ = [
        ("layers", _p), ("num_layers", _i32), ("h", _p), ("t", _i64), ("hidden", _i64),
        ("heads", _i32), ("kv_heads", _i32), ("head_dim", _i32), ("intermediate", _i64), ("eps", _f32),
        ("scale", _f32), ("cos", _p), ("sin", _p), ("slots", _p), ("num_slots", _i64), ("tables", _p),
        ("table_stride", _i64), ("seq_lens", _p), ("num_blocks", _i32), ("block_size", _i32),
        ("x", _p), ("qkv", _p), ("attn", _p), ("gate_up", _p), ("num_threads", _i32),
    ]  # fmt: skip


#: every struct of abi.h, by its C name
STRUCTS: tuple[type[ctypes.Structure], ...] = (
    PagedAttentionArgs, Int4MatmulArgs, Int8MatmulArgs, RmsNormArgs, RopeKvArgs,
    Projection, ProjectionMatmulArgs, LoraTerm, LoraAddArgs, LayerWeights, DecodeLayersArgs,
)  # fmt: skip


class AbiField(ctypes.Structure):
    """One row of the library's layout table (``AbiField`` in abi.h)."""

    _fields_ = [
        ("type", ctypes.c_char_p), ("field", ctypes.c_char_p), ("offset", _i64), ("size", _i64), ("kind", ctypes.c_char),
    ]  # fmt: skip


Layout = dict[str, dict[str | None, tuple[int, int, str]]]  # struct -> field (None: the struct) -> offset, size, kind


def read_layout(table: ctypes._Pointer) -> Layout:  # type: ignore[type-arg]
    """The library's layout table (a pointer to its first ``AbiField`` row) as a dict."""
    layout: Layout = {}
    i = 0
    while (row := table[i]).type is not None:
        field = None if row.field is None else row.field.decode()
        layout.setdefault(row.type.decode(), {})[field] = (row.offset, row.size, row.kind.decode())
        i += 1
    return layout


def _kind(ctype: type) -> str:
    if issubclass(ctype, ctypes.Structure):
        return "s"
    if ctype is ctypes.c_float or ctype is ctypes.c_double:
        return "f"
    if ctype is ctypes.c_void_p or issubclass(ctype, ctypes._Pointer):  # type: ignore[attr-defined]
        return "p"
    return "i"


def check_layout(layout: Layout, structs: Iterable[type[ctypes.Structure]] = STRUCTS) -> None:
    """Raise ``AbiMismatchError`` naming the first struct and field where a mirror in ``structs``
    differs from ``layout`` (the library's): missing on either side, or at another offset, size
    or kind; or a struct of another total size."""
    for struct in structs:
        name = struct.__name__
        theirs = layout.get(name)
        if theirs is None:
            raise AbiMismatchError(f"the kernels library has no struct {name}")
        ours = {f: (getattr(struct, f).offset, getattr(struct, f).size, _kind(t)) for f, t in struct._fields_}
        for field, (offset, size, kind) in ours.items():
            if field not in theirs:
                raise AbiMismatchError(f"{name}.{field}: not a field of the library's {name}")
            if theirs[field] != (offset, size, kind):
                c_offset, c_size, c_kind = theirs[field]
                raise AbiMismatchError(
                    f"{name}.{field}: the library has it at offset {c_offset}, {c_size} bytes, kind {c_kind!r}; "
                    f"the ctypes mirror at offset {offset}, {size} bytes, kind {kind!r}"
                )
        for field in theirs:
            if field is not None and field not in ours:
                raise AbiMismatchError(f"{name}.{field}: in the library's {name}, missing from the ctypes mirror")
        if theirs[None][1] != ctypes.sizeof(struct):
            raise AbiMismatchError(f"{name}: {theirs[None][1]} bytes in the library, {ctypes.sizeof(struct)} in ctypes")
