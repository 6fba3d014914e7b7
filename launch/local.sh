#!/usr/bin/env bash
# Runs one training job on this machine's devices (CPU, or GPU/TPU when the matching jax extra is
# installed: pip install -e ".[cuda]" or ".[tpu]").
#   launch/local.sh configs/default.py /tmp/hashgnn [--config.train.batch_size=1024 ...]
# FAKE_DEVICES=4 splits the CPU into four JAX devices, to exercise the multi-device path.
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
shift 2
if [[ -n "${FAKE_DEVICES:-}" ]]; then
  export XLA_FLAGS="--xla_force_host_platform_device_count=${FAKE_DEVICES} ${XLA_FLAGS:-}"
  export JAX_PLATFORMS=cpu
fi
exec python -m hashgnn_jax.main --config="${config}" --workdir="${workdir}" "$@"
