#!/usr/bin/env bash
# Runs the issue-4 benchmarks on whatever accelerator JAX finds and writes their JSON to $OUT.
#
#   bash bench/gpu.sh            # full sizes on a GPU; reduced sizes (--quick) on a CPU
#   OUT=/tmp/bench bash bench/gpu.sh
#
# On a CPU-only machine it runs the same scripts at reduced sizes, so the script is known to work
# before a GPU is at hand. Record the card and the figures in BUILD_NOTES.md after a GPU run.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench_out}"
mkdir -p "$OUT"

backend=$(python -c "import jax; print(jax.default_backend())")
python - > "$OUT/device.json" <<'PY'
import json, platform, jax
print(json.dumps({"backend": jax.default_backend(),
                  "devices": [d.device_kind for d in jax.devices()],
                  "jax": jax.__version__, "host": platform.node()}))
PY
cat "$OUT/device.json"

if [[ "$backend" == "cpu" ]]; then
  quick=(--quick)
  echo "No accelerator: running reduced sizes." >&2
else
  quick=()
fi

python bench/retrieval.py "${quick[@]}" --out="$OUT/retrieval.json"
python bench/train_step.py "${quick[@]}" --out="$OUT/train_step.json"
echo "Results in $OUT/"
