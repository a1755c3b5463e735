"""The fuzz gate: schemathesis against a real ``taxiway serve`` (tiny engine models) over every
operation of ``GET /openapi.json`` — its examples, boundary and malformed values (coverage),
generated requests valid and invalid (fuzzing), and request chains (stateful, links inferred
from the responses). It fails on any 5xx, any response that violates the document (status,
content type, headers, body, each SSE event), a 405 without ``Allow``, invalid data accepted,
and a request that hangs past ``--request-timeout``.

Not checked: ``positive_data_acceptance`` (a schema-valid request must be 2xx). The schema cannot
say which model names exist or which values a model takes, so valid JSON meets 400s and 404s by
design.

``POST /admin/models/{name}/unload`` runs on its own after everything else (with ``GET
/openapi.json``, which schemathesis leaves out unless it is named): an unloaded model
answers 503 until it is loaded again (``gateway.router``), which is what unloading means, not a
server error. The chains of the first run still reach the model names from ``/admin/models``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import serve_process
from tests.gateway.tiny_engine import every_route_config, write_tiny_chat_model

pytestmark = pytest.mark.slow

SCHEMATHESIS = str(Path(sys.executable).parent / "schemathesis")
UNLOAD = "/admin/models/{name}/unload"
_ARGS = (
    "--checks", "all", "--exclude-checks", "positive_data_acceptance",
    "--max-examples", "10", "--request-timeout", "10", "--workers", "1", "--seed", "20",
    "--suppress-health-check", "all",
)  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A server of this module's own: the fuzzer changes its state (unloads, loads, reloads)."""
    model = write_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "model")
    config = tmp_path_factory.mktemp("config") / "taxiway.toml"
    # a 256-token context: the generated prompts are all under 64 tokens, and requests without
    # max_tokens (most of the coverage phase's) generate until the context is full: ~990 random
    # tokens each with 1024, 23 of the run's 32 s, for no other path taken
    config.write_text(every_route_config(model, kv_cache_tokens=256))
    with serve_process(config, tmp_path_factory.mktemp("fuzz")) as server:
        server.wait_ready(timeout=120)
        yield server


def _schemathesis(server, cwd: Path, *filters: str) -> tuple[int, int, str]:  # type: ignore[no-untyped-def]
    """One run: (operations tested, test cases generated, its output); fails on a non-zero exit."""
    command = [SCHEMATHESIS, "run", f"{server.url}/openapi.json", *_ARGS, *filters]
    run = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
    output = run.stdout + run.stderr
    print(output[-3000:])
    assert run.returncode == 0, output[-20000:]
    tested = re.search(r"Tested: (\d+)", output)
    generated = re.search(r"(\d+) generated", output)
    assert tested is not None and generated is not None, output[-3000:]
    return int(tested.group(1)), int(generated.group(1)), output


def test_fuzz_every_operation(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    document = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    num_operations = sum(len(item) for item in document["paths"].values())
    assert UNLOAD in document["paths"]

    start = time.perf_counter()
    tested, generated, _ = _schemathesis(server, tmp_path, "--exclude-path", UNLOAD)
    # schemathesis leaves the document's own route out unless it is named
    tested_unload, generated_unload, _ = _schemathesis(
        server, tmp_path, "--include-path", UNLOAD, "--include-path", "/openapi.json"
    )
    elapsed = time.perf_counter() - start
    print(f"fuzz: {tested + tested_unload} operations, {generated + generated_unload} cases, {elapsed:.1f}s")

    assert tested + tested_unload == num_operations
    assert generated + generated_unload > 20 * num_operations
    logs = server.logs()
    assert "request.internal_error" not in logs and "request.unhandled" not in logs, logs[-5000:]
    assert server.proc.poll() is None
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
