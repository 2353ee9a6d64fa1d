#!/usr/bin/env bash
# Run one aya_jax stage on every worker of a TPU VM slice (all run the same command).
#
#   TPU_NAME=my-v5p-128 ZONE=us-east5-a WORKDIR=gs://my-bucket/runs/sft_8b \
#     experiments/launch/tpu_pod.sh --config=configs/sft.py --config.mesh.shape='(1,-1,1)'
#
# Needs: gcloud with access to the TPU; WORKDIR on GCS (all hosts write checkpoints
# cooperatively); model/tokenizer/data paths readable from every host (GCS or a
# copy on each host). jax.distributed finds its peers from the TPU metadata: no
# coordinator address is needed.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR}"
REPO="${REPO:-https://github.com/OWNER/aya_jax.git}"   # placeholder: your fork
REF="${REF:-main}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
ARGS=$(printf ' %q' "$@")

SETUP="set -e; python3 -m pip install -q -U 'jax[tpu]' \
  && python3 -m pip install -q 'git+${REPO}@${REF}'"
RUN="cd \$HOME && python3 -m aya_jax.main --workdir=${WORKDIR}${ARGS} 2>&1 \
  | tee -a \$HOME/aya_jax_\$(hostname).log"

if [[ "${SKIP_SETUP:-0}" != "1" ]]; then
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all \
    --command="$SETUP"
fi
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all \
  --command="$RUN"
