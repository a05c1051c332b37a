#!/usr/bin/env bash
# Tails worker 0's log (host 0 writes metrics, TensorBoard and the progress bar).
source "$(dirname "$0")/common.sh"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" --worker=0 \
  --command "tail -n 200 -f $REMOTE_DIR/train.log"
