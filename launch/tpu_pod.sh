#!/usr/bin/env bash
# Runs one training job on every worker of a Cloud TPU VM slice (v4-32, v5p-64, ...): the same
# command on all hosts through `gcloud compute tpus tpu-vm ssh --worker=all`. JAX finds the other
# hosts itself (--distributed=on lets it detect the slice); each host feeds its own chips.
#   TPU_NAME=my-pod ZONE=us-central2-b launch/tpu_pod.sh configs/alibaba.py gs://bucket/run \
#     --config.data.path=/data/alibaba.csv
# The workdir must be one location every host sees: a gs:// bucket (Orbax and TensorStore write
# there directly) or a shared filesystem mount. REPO (default: ~/hashgnn_jax) is where the project
# is checked out on every worker, installed with `pip install -e ".[tpu]"`; PROJECT is passed on
# to gcloud when set.
set -euo pipefail
usage="usage: TPU_NAME=... ZONE=... launch/tpu_pod.sh CONFIG WORKDIR [overrides...]"
config=${1:?$usage}
workdir=${2:?$usage}
shift 2
: "${TPU_NAME:?$usage}" "${ZONE:?$usage}"
repo=${REPO:-'~/hashgnn_jax'}
project=()
if [[ -n "${PROJECT:-}" ]]; then project=(--project="${PROJECT}"); fi
# Quoted once here, so each override reaches the workers' shell as one word.
overrides=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" "${project[@]}" --worker=all \
  --command="cd ${repo} && python3 -m hashgnn_jax.main --config=$(printf %q "${config}") \
--workdir=$(printf %q "${workdir}") --distributed=on${overrides}"
