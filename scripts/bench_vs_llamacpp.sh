#!/usr/bin/env bash
# Serving benchmark, Taxiway's engine vs llama.cpp's native server, in one run on one machine.
#
#   scripts/bench_vs_llamacpp.sh /path/to/llama-server [OUTDIR]
#
# Same GGUF, same workload (taxiway bench serving defaults: streaming chat, prompts of 16-512
# tokens, 128 output tokens, temperature 0, closed loop at concurrency 1, 4 and 16), servers run
# one after the other on 2 threads each. llama-server is built from llama.cpp's sources (see
# ../shared/ANCHORS.md); it is a yardstick, not a dependency.
set -euo pipefail
LLAMA_SERVER=${1:?path to llama-server}
OUT=${2:-bench-results}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
TAXIWAY=.venv/bin/taxiway
GGUF=$($TAXIWAY pull smollm2-135m-instruct -q)
CONC=${CONCURRENCY:-1,4,16}
NUM=${NUM_REQUESTS:-0}  # 0: the bench default, max(16, 4 x concurrency) per level

wait_for() {  # url
  for _ in $(seq 1 600); do
    if curl -sf "$1" >/dev/null; then return 0; fi
    sleep 0.5
  done
  echo "timed out waiting for $1" >&2; return 1
}

run_server() {  # NAME READY_URL MODEL PORT COMMAND...: start it, load-test it, stop it
  local name=$1 ready=$2 model=$3 port=$4
  shift 4
  "$@" >"$OUT/$name.log" 2>&1 &
  local pid=$!
  trap "kill $pid 2>/dev/null || true" EXIT
  wait_for "$ready"
  $TAXIWAY bench serving --base-url "http://127.0.0.1:$port/v1" --model "$model" --concurrency "$CONC" \
    --num-requests "$NUM" --out "$OUT/$name.json" --plot "$OUT/$name.png" --no-progress | tee "$OUT/$name.md"
  kill $pid; wait $pid 2>/dev/null || true
}

echo "== llama-server -np 16" >&2
run_server llama-server http://127.0.0.1:8102/health smollm2 8102 \
  "$LLAMA_SERVER" -m "$GGUF" -t 2 -np 16 -c 16384 --port 8102

echo "== taxiway serve (engine, default config)" >&2
run_server taxiway http://127.0.0.1:8103/ready default 8103 $TAXIWAY serve --port 8103
