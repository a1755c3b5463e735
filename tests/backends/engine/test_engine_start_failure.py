"""A model the engine cannot load is ``failed`` with the reason, never left loading, never a 500.

Real ``taxiway serve`` processes: one whose engine models point at a corrupt and at a missing model
file, one in an environment where ``import torch`` fails. Within 10 s of the start, ``/ready`` and
the model's stats say it failed and why, a chat request gets a 503 naming the model and the reason,
the log holds the ``engine.load_failed`` event, and the gateway's other model still serves.
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import msgspec

from bench.stub_upstream import StubUpstream

DEADLINE_S = 10.0

# Put first on the server's PYTHONPATH: ``sitecustomize`` runs at interpreter start, and this finder
# refuses torch as an environment without it would.
NO_TORCH = '''
import sys


class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NoTorch())
'''


def _config(stub: StubUpstream, engine_models: dict[str, str]) -> str:
    entries = "".join(
        f"""
        [[models]]
        name = "{name}"
        backend = "engine"
        options = {{ model = "{path}", threads = 1 }}
        """
        for name, path in engine_models.items()
    )
    return f"""
        [[models]]
        name = "assistant"
        backend = "openai"
        options = {{ base_url = "{stub.base_url}", upstream_model = "smollm2" }}
        {entries}
    """


def _wait_failed(url: str, models: set[str], started: float) -> dict[str, str]:
    """``/ready``'s reason for each of ``models`` once all are reported failed (before the deadline)."""
    while True:
        response = httpx.get(f"{url}/ready", timeout=2)
        failed = {m["model"]: m["detail"] for m in response.json()["not_ready"] if m["state"] == "failed"}
        if set(failed) >= models:
            assert response.status_code == 503
            return failed
        assert time.monotonic() - started < DEADLINE_S, f"not failed after {DEADLINE_S}s: {response.text}"
        time.sleep(0.1)


def _check_failed(server, model: str, reason_part: str, started: float) -> None:  # type: ignore[no-untyped-def]
    stats = httpx.get(f"{server.base_url}/models/{model}/stats", timeout=2)
    assert stats.status_code == 200
    assert stats.json()["state"] == "failed" and reason_part in stats.json()["detail"]

    request_id = f"broken-{model}-{time.monotonic_ns()}"
    response = httpx.post(f"{server.base_url}/chat/completions", headers={"x-request-id": request_id}, timeout=5,
                          json={"model": model, "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert f"model '{model}'" in error["message"] and reason_part in error["message"]
    assert error["type"] == "server_error" and error["code"] == "service_unavailable"
    assert response.headers["x-request-id"] == request_id
    assert time.monotonic() - started < DEADLINE_S

    # The access line is written after the response is sent: read the log until it is there (the
    # deadline still bounds it).
    while True:
        lines = [msgspec.json.decode(line) for line in server.logs().splitlines() if line.startswith("{")]
        request_lines = [
            line for line in lines if line.get("request_id") == request_id and line["event"].startswith("request.")
            and line["event"] != "request.candidate_skipped"
        ]  # the access line (a skipped candidate is logged under the same id)
        if request_lines or time.monotonic() - started > DEADLINE_S:
            break
        time.sleep(0.05)
    (load_failed,) = [line for line in lines if line["event"] == "engine.load_failed" and line["model"] == model]
    assert load_failed["level"] == "error" and reason_part in load_failed["error"]
    assert load_failed["logger"] == "backends.engine.backend"
    (failed,) = request_lines
    assert failed["event"] == "request.failed" and failed["status"] == 503 and reason_part in failed["error"]


def _other_model_serves(server) -> None:  # type: ignore[no-untyped-def]
    response = httpx.post(f"{server.base_url}/chat/completions", timeout=5,
                          json={"model": "assistant", "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert response.status_code == 200, response.text


def test_corrupt_and_missing_model_files(
    taxiway_server: Callable[..., object], stub_upstream: StubUpstream, tmp_path: Path
) -> None:
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"not a gguf file at all " * 64)
    missing = tmp_path / "missing.gguf"
    started = time.monotonic()
    server = taxiway_server(_config(stub_upstream, {"corrupt": str(corrupt), "missing": str(missing)}),
                            startup_timeout=DEADLINE_S)  # fmt: skip
    failed = _wait_failed(server.url, {"corrupt", "missing"}, started)  # type: ignore[attr-defined]
    assert f"cannot read GGUF file '{corrupt}'" in failed["corrupt"]
    assert f"unknown model '{missing}'" in failed["missing"]
    _check_failed(server, "corrupt", "cannot read GGUF file", started)
    _check_failed(server, "missing", "unknown model", started)
    _other_model_serves(server)


def test_without_torch(taxiway_server: Callable[..., object], stub_upstream: StubUpstream, tmp_path: Path) -> None:
    shim = tmp_path / "no-torch"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(textwrap.dedent(NO_TORCH), encoding="utf-8")
    model = tmp_path / "model.gguf"
    model.write_bytes(b"never read: torch is needed first")
    started = time.monotonic()
    server = taxiway_server(_config(stub_upstream, {"local": str(model)}), env={"PYTHONPATH": str(shim)},
                            startup_timeout=DEADLINE_S)  # fmt: skip
    failed = _wait_failed(server.url, {"local"}, started)  # type: ignore[attr-defined]
    assert "No module named 'torch'" in failed["local"] and "taxiway[engine]" in failed["local"]
    _check_failed(server, "local", "No module named 'torch'", started)
    _other_model_serves(server)

