#!/usr/bin/env bash
# The GPU checks of issue 18 in one call on a CUDA machine (well under 10 minutes on an H200):
# the CUDA correctness tests, then the benchmarks, one JSON line per figure.
#
#   bash scripts/gpu_check.sh            # writes its logs under $OUT (default /tmp/gpu-check)
#
# Runs from the repository root with the machine's own python3 (torch, Triton, transformers);
# packages it lacks travel as wheels in .whl/ (scripts/gpu_prepare.sh says which). The SmolLM2 tokenizer
# for the serving benchmark travels in .gpu/smollm2-tokenizer/ (made from the GGUF here:
# tokenizer.json + tokenizer_config.json); the weights are random, of SmolLM2-135M's shapes.
# Prepare both here first, at no device time: bash scripts/gpu_prepare.sh; then one device call,
#   run(command="bash scripts/gpu_check.sh", carry=[".whl", ".gpu"], timeout_s=540)
# HF transformers runs compiled only (its eager figures are no target; HF_MODES=eager,compiled adds them).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
# the working tree first: the wheels' copy of the project is there for its entry points only
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"

phase() { echo "== $1 $(date +%T)"; }

phase tests
timeout "${TEST_TIMEOUT:-180}" python3 -m pytest -q -p no:cacheprovider --run-gpu -m gpu -s \
    tests/backends/engine/cuda tests/backends/engine/model/test_cuda.py 2>&1 | tee "$OUT/tests.log" | tail -40

phase engine
timeout "${ENGINE_TIMEOUT:-200}" python3 -m bench.gpu --hf "" 2>&1 | tee "$OUT/bench.jsonl" | grep -v "^Loading"

phase serving
if [ -d .gpu/smollm2-tokenizer ]; then
    python3 -m bench.gpu --write-model /tmp/random-smollm2 --tokenizer-from .gpu/smollm2-tokenizer
    timeout "${SERVING_TIMEOUT:-150}" python3 -m bench.batching --model /tmp/random-smollm2 --device cuda \
        --quantization int4 --modes none,continuous --concurrency 16 --num-requests 64 --threads 8 \
        --out "$OUT/batching.json" 2>&1 | tee "$OUT/batching.log" | grep -v "^Loading"
fi

phase hf
timeout "${HF_TIMEOUT:-240}" python3 -m bench.gpu --quantization "" --hf "${HF_MODES:-compiled}" 2>&1 \
    | tee -a "$OUT/bench.jsonl" | grep "^{"
phase done
