#!/usr/bin/env bash
# Runs one training job as several JAX processes on this machine, over 127.0.0.1: the multi-host
# code paths (jax.distributed, cross-process collectives and checkpoints) on CPU, for testing and
# debugging.
#   launch/local_multiprocess.sh configs/default.py /tmp/hashgnn [--config.train.batch_size=1024 ...]
# NUM_PROCESSES (default 2) processes of DEVICES_PER_PROCESS CPU devices each (default 1);
# PORT: the coordinator's port (default: a free one). Each line of output starts with "[i] ",
# the process it came from. SIGTERM or SIGINT to this script reaches every process (a clean stop
# with a checkpoint). Exits non-zero if any process failed.
set -euo pipefail
usage="usage: launch/local_multiprocess.sh CONFIG WORKDIR [overrides...]"
config=${1:?$usage}
workdir=${2:?$usage}
shift 2
num_processes=${NUM_PROCESSES:-2}
devices=${DEVICES_PER_PROCESS:-1}
port=${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

pids=()
forward() {
  kill -s "$1" "${pids[@]}" 2>/dev/null || true
}
trap 'forward TERM' TERM
trap 'forward INT' INT

for ((i = 0; i < num_processes; i++)); do
  JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES="${devices}" python3 -m hashgnn_jax.main \
    --config="${config}" --workdir="${workdir}" --distributed=on \
    --coordinator_address="127.0.0.1:${port}" --num_processes="${num_processes}" \
    --process_id="${i}" "$@" > >(sed -u "s/^/[${i}] /") 2> >(sed -u "s/^/[${i}] /" >&2) &
  pids+=($!)
done

status=0
for pid in "${pids[@]}"; do
  # A trapped signal interrupts `wait`; wait again for the same process until it has exited.
  while true; do
    set +e
    wait "${pid}"
    code=$?
    set -e
    if kill -0 "${pid}" 2>/dev/null; then continue; fi
    break
  done
  if ((code != 0)); then status=${code}; fi
done
exit "${status}"
