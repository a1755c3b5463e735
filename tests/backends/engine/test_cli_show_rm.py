"""``taxiway show`` reads a model's header (the real default model); ``taxiway rm`` deletes a
pulled model from a home's cache, and says so when there is none."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from backends.engine.catalogue import CATALOGUE, cached_path
from backends.engine.memory import read_header
from gateway.cli import main

MODEL = "smollm2-135m-instruct"


def test_show_describes_the_default_model(smollm2_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", str(smollm2_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    config, tensors = read_header(smollm2_path)
    assert info["parameters"] == sum(t.rows * t.cols for t in tensors) and 130e6 < info["parameters"] < 140e6
    assert (info["architecture"], info["context_length"], info["layers"], info["vocab_size"]) == ("llama", 8192, 30, 49152)
    assert info["tensors"]["int4"] > 200 and info["bytes"] == smollm2_path.stat().st_size

    assert main(["show", str(smollm2_path)]) == 0
    table = capsys.readouterr().out
    assert "parameters     134.5M" in table and "context length 8,192" in table


def test_rm_deletes_a_pulled_model(smollm2_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = cached_path(CATALOGUE[MODEL], tmp_path)
    target.parent.mkdir(parents=True)
    shutil.copyfile(smollm2_path, target)
    assert main(["show", MODEL, "--home", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(target)

    assert main(["rm", MODEL, "--home", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"deleted {MODEL} (94 MiB)\n"
    assert not target.parent.exists() and smollm2_path.is_file()

    assert main(["rm", MODEL, "--home", str(tmp_path)]) == 1
    assert f"{MODEL} is not pulled" in capsys.readouterr().err
    assert main(["show", MODEL, "--home", str(tmp_path)]) == 1
    assert f"taxiway pull {MODEL}" in capsys.readouterr().err
    assert main(["rm", "no-such-model", "--home", str(tmp_path)]) == 1
    assert "unknown model 'no-such-model'" in capsys.readouterr().err


def test_model_entry_for_what_serve_is_given(smollm2_path: Path, tmp_path: Path) -> None:
    """``taxiway serve MODEL``'s table: a .gguf file or a safetensors directory on the engine
    (named for the file or folder, alias ``default``), a catalogue embedding model on the encoder,
    None for what the engine does not know (another plugin may)."""
    from backends.engine.cli import model_entry
    from bench.synthetic import write_random_llama
    from tests.backends.engine.engine_helpers import default_kernels

    home = tmp_path / "home"
    (home / "kernels").mkdir(parents=True)
    # the library this session built, so that model_entry finds it instead of compiling it (~7 s):
    # a fresh home's build is test_cli_serve_model.py's subject, the entries are this test's
    kernels = default_kernels()
    if kernels is not None:
        shutil.copy(kernels.path, home / "kernels")
    gguf = model_entry(str(smollm2_path), home, progress=False)
    assert gguf == {"name": smollm2_path.stem.lower(), "aliases": ["default"], "backend": "engine",
                    "options": {"model": str(smollm2_path.resolve())}}  # fmt: skip
    hf = write_random_llama(tmp_path / "Tiny-Llama", hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=300)
    entry = model_entry(str(hf), home, progress=False)
    assert entry is not None and (entry["name"], entry["backend"]) == ("Tiny-Llama", "engine")
    assert model_entry("no-such-model", home, progress=False) is None

    # a catalogue name: its entry's backend (the embedding model's is the encoder), no download when cached
    target = cached_path(CATALOGUE["all-minilm-l6-v2"], home)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"cached")
    assert model_entry("all-minilm-l6-v2", home, progress=False) == {
        "name": "all-minilm-l6-v2", "aliases": ["embed"], "backend": "encoder", "options": {"model": "all-minilm-l6-v2"}
    }  # fmt: skip
