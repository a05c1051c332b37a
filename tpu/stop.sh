#!/usr/bin/env bash
# Sends SIGTERM to the trainers (they checkpoint and exit), then optionally deletes the slice.
#   tpu/stop.sh [--delete]
source "$(dirname "$0")/common.sh"
ssh_all "pkill -TERM -f scripts/train.py || true"
if [ "${1:-}" = "--delete" ]; then
  sleep 120
  gcloud compute tpus queued-resources delete "$TPU_NAME-qr" --zone "$ZONE" --project "$PROJECT" --force --quiet
fi
