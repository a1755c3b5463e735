"""The engine's GGUF reader agrees with the ``gguf`` package's ``GGUFReader`` (the reference) on
every value type, on the tensor table, and on the real default model."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from backends.engine.model.gguf_reader import read_gguf, read_gguf_metadata


def _gguf_reader_metadata(path: Path) -> dict[str, object]:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _gguf_reader_tensors(path: Path) -> list[tuple[object, ...]]:
    reader = gguf.GGUFReader(path)
    return [
        (t.name, t.tensor_type, tuple(int(d) for d in t.shape), int(t.data_offset), int(t.n_bytes))
        for t in reader.tensors
    ]


def _ours_tensors(path: Path) -> list[tuple[object, ...]]:
    return [(t.name, t.qtype, t.shape, t.offset, t.n_bytes) for t in read_gguf(path).tensors]


def test_read_gguf_metadata_matches_gguf_reader(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(str(tmp_path / "all.gguf"), "llama")
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -5)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -300)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -7)
    writer.add_float32("t.f32", 1.5)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo ▁ 日本")
    writer.add_uint64("t.u64", 2**63 + 1)
    writer.add_int64("t.i64", -(2**40))
    writer.add_float64("t.f64", -2.25)
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.floats", [0.5, -1.25])
    writer.add_array("t.strs", ["a", "", "Ġb c", "<0x0A>"])
    writer.add_array("t.bools", [True, False])
    writer.add_array("t.empty", [])
    writer.add_tensor("dummy", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = read_gguf_metadata(tmp_path / "all.gguf")
    assert ours == _gguf_reader_metadata(tmp_path / "all.gguf")
    assert ours["t.strs"] == ["a", "", "Ġb c", "<0x0A>"] and ours["t.u64"] == 2**63 + 1
    assert read_gguf_metadata(tmp_path / "all.gguf", prefix="t.s") == {"t.str": "héllo ▁ 日本", "t.strs": ours["t.strs"]}
    (tmp_path / "not.gguf").write_bytes(b"nope" * 10)
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf_metadata(tmp_path / "not.gguf")


def test_tensor_table_matches_gguf_reader(tmp_path: Path) -> None:
    """Names, types, shapes, absolute offsets and sizes, with a non-default alignment and
    quantized tensors (their byte size comes from the type's block size)."""
    path = tmp_path / "tensors.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_custom_alignment(64)
    writer.add_tensor("a", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.add_tensor("b", np.zeros((2, 18), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    writer.add_tensor("c", np.ones(5, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = _ours_tensors(path)
    assert ours == _gguf_reader_tensors(path)
    assert [t[0] for t in ours] == ["a", "b", "c"] and all(t[3] % 64 == 0 for t in ours)


def test_long_arrays_are_named_not_decoded(tmp_path: Path) -> None:
    path = tmp_path / "long.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_array("t.short", ["x"] * 3)
    writer.add_array("t.long", ["y"] * 10)
    writer.add_tensor("dummy", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    header = read_gguf(path, keep=lambda key: key.startswith("t."), max_array=5)
    assert header.metadata == {"t.short": ["x"] * 3} and header.long_arrays == {"t.long"}
    assert [t.name for t in header.tensors] == ["dummy"]


@pytest.mark.slow
def test_read_gguf_of_the_real_model(smollm2_path: Path) -> None:
    everything = read_gguf_metadata(smollm2_path)
    assert everything == _gguf_reader_metadata(smollm2_path)
    assert read_gguf_metadata(smollm2_path, prefix="tokenizer.") == {
        k: v for k, v in everything.items() if k.startswith("tokenizer.")
    }
    assert _ours_tensors(smollm2_path) == _gguf_reader_tensors(smollm2_path)
