#!/usr/bin/env bash
# Creates a TPU slice through a queued resource (waits until it is ACTIVE).
#   ACCELERATOR_TYPE=v5p-64 ZONE=us-east5-a tpu/create.sh [--spot]
source "$(dirname "$0")/common.sh"
extra=("$@")
gcloud compute tpus queued-resources create "$TPU_NAME-qr" --node-id "$TPU_NAME" --project "$PROJECT" \
  --zone "$ZONE" --accelerator-type "$ACCELERATOR_TYPE" --runtime-version "$RUNTIME_VERSION" "${extra[@]}"
echo "waiting for $TPU_NAME-qr to become ACTIVE ..."
until [ "$(gcloud compute tpus queued-resources describe "$TPU_NAME-qr" --zone "$ZONE" --project "$PROJECT" \
            --format='value(state.state)')" = "ACTIVE" ]; do sleep 30; done
echo "ready: $TPU_NAME ($ACCELERATOR_TYPE)"
