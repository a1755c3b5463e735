#!/usr/bin/env bash
# Before/after in one run: the engine (single stream) and serving at C=16 for an older revision
# and the working tree, alternating, on the same machine and venv.
#
#   scripts/bench_ab.sh REV [ROUNDS]
#
# REV is checked out into a temporary git worktree and put first on PYTHONPATH, so the same .venv
# runs both. Where REV predates the bench/ package, an empty `bench` module stands in for the
# installed entry point (REV registers its benchmarks itself). Engine: `taxiway bench engine`'s
# worker (512-token prompt, 128 decode tokens, 2 threads, one fresh process each). Serving:
# `taxiway serve` with the default config, `taxiway bench serving --concurrency 16 --num-requests 64`.
set -euo pipefail
REV=${1:?revision to compare with}
ROUNDS=${2:-2}
cd "$(dirname "$0")/.."
HERE=$PWD
PY=$HERE/.venv/bin/python
TMP=$(mktemp -d)
trap 'git -C "$HERE" worktree remove --force "$TMP/old" >/dev/null 2>&1 || true; rm -rf "$TMP"' EXIT
git worktree add --detach -q "$TMP/old" "$REV"
OLDPATH=$TMP/old
if [ ! -d "$TMP/old/bench" ]; then
  mkdir -p "$TMP/shim/bench" && echo '"""stand-in for the bench entry point"""' >"$TMP/shim/bench/__init__.py"
  OLDPATH=$TMP/old:$TMP/shim
fi
MODEL=$($PY -m gateway pull smollm2-135m-instruct -q)

engine() {  # LABEL DIR PYTHONPATH
  local out
  out=$(cd "$2" && PYTHONPATH=$3 $PY -m gateway bench engine --worker taxiway --model "$MODEL" | tail -1)
  echo "engine $1 $out"
}

serving() {  # LABEL DIR PYTHONPATH PORT
  (cd "$2" && PYTHONPATH=$3 exec $PY -m gateway serve --port "$4" >"$TMP/$1-$4.log" 2>&1) &
  local pid=$!
  for _ in $(seq 1 480); do curl -sf "http://127.0.0.1:$4/ready" >/dev/null && break; sleep 0.5; done
  $PY -m gateway bench serving --base-url "http://127.0.0.1:$4/v1" --model default --concurrency 16 \
    --num-requests 64 --no-progress | grep '^| 16 ' | sed "s/^/serving $1 /"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

for r in $(seq 1 "$ROUNDS"); do
  if [ $((r % 2)) = 1 ]; then order="old new"; else order="new old"; fi
  for side in $order; do
    if [ "$side" = old ]; then engine "$REV" "$TMP/old" "$OLDPATH"; else engine HEAD "$HERE" ""; fi
  done
done
port=8300
for r in $(seq 1 "$ROUNDS"); do
  if [ $((r % 2)) = 1 ]; then order="old new"; else order="new old"; fi
  for side in $order; do
    port=$((port + 1))
    if [ "$side" = old ]; then serving "$REV" "$TMP/old" "$OLDPATH" $port; else serving HEAD "$HERE" "" $port; fi
  done
done
