#!/usr/bin/env bash
# Shared settings for the TPU scripts. Override any of these in the environment.
set -euo pipefail
: "${TPU_NAME:=pgpo-jax}"
: "${ZONE:=us-east5-a}"
: "${ACCELERATOR_TYPE:=v5p-64}"
: "${RUNTIME_VERSION:=v2-alpha-tpuv5}"
: "${PROJECT:=$(gcloud config get-value project 2>/dev/null)}"
: "${REPO_URL:=https://github.com/your-org/pgpo-jax.git}"
: "${REPO_REF:=main}"
: "${REMOTE_DIR:=~/pgpo-jax}"
ssh_all() {  # ssh_all "command": runs the command on every worker of the slice
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" --worker=all --command "$1"
}
