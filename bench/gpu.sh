#!/usr/bin/env bash
# Runs the issue-4 benchmarks on whatever accelerator JAX finds and writes their JSON to $OUT.
#
#   bash bench/gpu.sh                    # full sizes on an accelerator; reduced (--quick) on a CPU
#   OUT=/tmp/bench PYTHON=python3 bash bench/gpu.sh
#
# On an accelerator the stages run in the order of what they are for, each under its own time limit
# so that one that fails or hangs leaves the others' results:
#   1. retrieval at the Alibaba shape (the GPU target: all-user Hamming top-100 within 20 s), all
#      601,946 users in calls of 4,096, one timing each; NumPy checks 4 users;
#   2. train steps (node/rowwise) at MovieLens, Gowalla and Alibaba size, batch 256 and 4096; the
#      graphs are generated on the host while stage 1 runs;
#   3. search time per block size at the Alibaba shape (bench/block_size.py), the check of the
#      automatic block size's cap on this device;
#   4. the default job end to end on the device (train and evaluate, --mode=eval, --mode=export,
#      a Retriever search; bench/default_run.py --serve);
#   5. retrieval at the three small Table 4 shapes, all users, top_k and counting selection;
#   6. evaluation's encoding at 10M nodes, shard by shard and whole (bench/sharded_eval.py).
# BUDGET_S (seconds, unset: no limit) bounds the whole script: each stage's limit is cut to what is
# left, and a stage with under a minute left is skipped (listed, not failed), so a lease of fixed
# length returns the most important results first. STAGES (comma-separated names as logged, unset:
# all) runs only those. On one H100, stage 1 took 93 s and stage 2 about 55 s per case, most of it
# the first step's compilation; on one H200, stage 5 took 92 s (docs/experiments.md, "On a GPU").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench_out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
LOG="$OUT/gpu.log"
: > "$LOG"

"$PY" - > "$OUT/device.json" <<'PY'
import json, os, platform
import jax, jaxlib, numpy
# The environment's XLA and JAX settings change what XLA compiles (and how much memory it asks).
env = {k: v for k, v in os.environ.items() if k.startswith(("XLA_", "JAX_", "TF_GPU", "CUDA_"))}
print(json.dumps({"backend": jax.default_backend(), "env": env,
                  "devices": [d.device_kind for d in jax.devices()],
                  "jax": jax.__version__, "jaxlib": jaxlib.__version__, "numpy": numpy.__version__,
                  "python": platform.python_version(), "host": platform.node()}))
PY
cat "$OUT/device.json"
backend=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['backend'])" \
  "$OUT/device.json")

failed=()
skipped=()
deadline=$((SECONDS + ${BUDGET_S:-1000000000}))
wanted() { [[ -z "${STAGES:-}" || ",$STAGES," == *",$1,"* ]]; }
# stage NAME SECONDS COMMAND...: runs COMMAND under a time limit (cut to what BUDGET_S leaves), its
# output to the log too.
stage() {
  local name=$1 limit=$2
  shift 2
  wanted "$name" || return 0
  local left=$((deadline - SECONDS))
  if ((left < 60)); then
    echo "== $name: skipped, ${left} s of BUDGET_S left" | tee -a "$LOG"
    skipped+=("$name")
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit} s): $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local status=${PIPESTATUS[0]}
  echo "== $name: exit $status after $((SECONDS - start)) s" | tee -a "$LOG"
  if [[ $status != 0 ]]; then
    failed+=("$name")
    # timeout stops the script, not the per-case child it started, which would hold the device.
    pkill -f -- "--child-devices=|--worker" || true
  fi
}

if [[ "$backend" == "cpu" ]]; then
  echo "No accelerator: running reduced sizes." | tee -a "$LOG"
  stage retrieval 900 "$PY" bench/retrieval.py --quick --out="$OUT/retrieval.json"
  stage train_step 900 "$PY" bench/train_step.py --quick \
    --variants=node/rowwise,node/dense,tree/rowwise,node/rowwise/sharded --out="$OUT/train_step.json"
  stage default_job 600 "$PY" bench/default_run.py --devices=1 --serve \
    --out="$OUT/default_run.json"
  stage block_size 600 "$PY" bench/block_size.py --quick --out="$OUT/block_size.json"
  stage sharded_eval 600 "$PY" bench/sharded_eval.py --quick --devices=2 --users=200 \
    --out="$OUT/sharded_eval.json"
else
  # The host generates the train graphs (NumPy only) while the accelerator runs retrieval.
  prepare=
  if wanted train_step; then
    JAX_PLATFORMS=cpu "$PY" bench/train_step.py --prepare-only >> "$LOG" 2>&1 &
    prepare=$!
  fi
  stage retrieval_alibaba 180 "$PY" bench/retrieval.py --shapes=alibaba --bits=32,64 \
    --devices=1 --user-chunk=4096 --alibaba-users=0 --alibaba-baseline-users=4 --repeats=1 \
    --methods=ours,numpy --out="$OUT/retrieval_alibaba.json"
  [[ -z "$prepare" ]] || wait "$prepare" || failed+=(prepare)
  # Both table layouts (issue 21): on one device the sharded exchange is a sanity check.
  stage train_step 420 "$PY" bench/train_step.py --variants=node/rowwise,node/rowwise/sharded \
    --steps=5 --out="$OUT/train_step.json"
  stage block_size 200 "$PY" bench/block_size.py --out="$OUT/block_size.json"
  stage default_job 200 "$PY" bench/default_run.py --devices=1 --platform=default --serve \
    --out="$OUT/default_run.json"
  stage retrieval_small 140 "$PY" bench/retrieval.py --shapes=movielens,pinterest,gowalla \
    --bits=32,64 --devices=1 --user-chunk=4096 --selections=top_k,counting \
    --baseline-users=256 --methods=ours,numpy --out="$OUT/retrieval_small.json"
  # Shard-by-shard encoding at 10M nodes against the whole-table encoder, on one device.
  stage sharded_eval 300 "$PY" bench/sharded_eval.py --shape=10m --devices=1 \
    --out="$OUT/sharded_eval.json"
fi
echo "Results in $OUT/; failed stages: ${failed[*]:-none}; skipped: ${skipped[*]:-none}" \
  | tee -a "$LOG"
[[ ${#failed[@]} == 0 ]]
