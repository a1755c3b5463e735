"""``taxiway serve FILE.gguf`` with no config on a fresh Taxiway home: the native kernels are built
in the foreground with their progress on the terminal, then the file is served under its name
and ``default``."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import REPO_ROOT, ServerProcess, free_port


def test_first_serve_of_a_gguf_file_shows_the_kernel_build(smollm2_path: Path, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", str(smollm2_path), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                env={**os.environ, "TAXIWAY_HOME": str(tmp_path / "home")})  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        cards = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                cards = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).json()["data"]
                break
            except httpx.TransportError:
                time.sleep(0.2)
        text = log.read_text()
        assert cards is not None, text
        # the build's start, then its outcome (ready, or unavailable where nothing compiles), before the server
        building, outcome = text.find("building the native kernels for this machine (once)"), text.find("taxiway: native kernels ")
        assert 0 <= building < outcome < text.find("Started server process"), text
        assert [(c["id"], c["root"]) for c in cards] == [(smollm2_path.stem.lower(),) * 2, ("default", smollm2_path.stem.lower())]
        built = list((tmp_path / "home" / "kernels").glob("taxiway_kernels-*.so"))
        assert bool(built) == text.startswith("taxiway: native kernels ready", outcome), text
    finally:
        ServerProcess(proc, port, log).stop()
