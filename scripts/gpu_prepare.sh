#!/usr/bin/env bash
# What scripts/gpu_check.sh needs on a device machine, made here at no device time:
#   .whl/                     wheels, for the device image's Python 3.12, of the packages that image
#                             lacks (its list: .library/device/KINDS.md), at this checkout's venv's
#                             versions: the engine's (msgspec, structlog, gguf) and the server's, for
#                             the served test (litestar and uvicorn with what they need), and
#                             the project's own wheel (its entry points)
#   .gpu/smollm2-tokenizer/   SmolLM2-135M-Instruct's tokenizer (tokenizer.json + tokenizer_config.json
#                             with its chat template), written from the GGUF: the model file itself is
#                             over what travels, and the benchmarks use random weights of its shapes
# Both folders are git-ignored. Then one device call runs the checks:
#   run(command="bash scripts/gpu_check.sh", carry=[".whl", ".gpu"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

rm -rf .whl && mkdir -p .whl
for name in msgspec structlog gguf litestar litestar-htmx multipart polyfactory faker rich-click sniffio \
    uvicorn httptools redis hiredis psycopg psycopg-binary; do
    version=$("$PY" -c "import importlib.metadata as m; print(m.version('$name'))")
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$name==$version"
done

# the project itself, for its entry points (backends and plugins register through them); on the
# device the working tree comes first on PYTHONPATH, so its code runs, not this wheel's copy
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl . 2>&1 | grep -v "^WARNING" || true
test -n "$(ls .whl/taxiway-*.whl)"

gguf=$("$(dirname "$PY")/taxiway" pull -q smollm2-135m-instruct)
rm -rf .gpu/smollm2-tokenizer && mkdir -p .gpu/smollm2-tokenizer
"$PY" - "$gguf" .gpu/smollm2-tokenizer <<'PY'
import json
import sys
from pathlib import Path

from backends.engine.text.tokenizer import Tokenizer

tok = Tokenizer.from_gguf(sys.argv[1])
out = Path(sys.argv[2])
tok.backend.save(str(out / "tokenizer.json"))
config = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "chat_template": tok.chat_template}
(out / "tokenizer_config.json").write_text(json.dumps(config))
again = Tokenizer.from_hf_dir(out)  # the directory must give back the same tokenizer
text = "Hello, world! 12345 café"
assert again.encode(text) == tok.encode(text) and again.eos_token_ids == tok.eos_token_ids, "tokenizer differs"
assert again.chat_template == tok.chat_template
PY
du -sh .whl .gpu
ls .whl .gpu/smollm2-tokenizer
