#!/usr/bin/env bash
# Starts training on every worker (same command everywhere; jax.distributed.initialize() joins them).
#   tpu/launch.sh configs/pgpo_7b.py gs://bucket/runs/pgpo_7b [--config.key=value ...]
source "$(dirname "$0")/common.sh"
config=${1:?config file}; workdir=${2:?workdir (a gs:// path or a shared disk)}; shift 2
overrides="$*"
ssh_all "cd $REMOTE_DIR && nohup .venv/bin/python scripts/train.py --config=$config --workdir=$workdir \
  --distributed=yes $overrides > train.log 2>&1 &"
echo "launched; tail with: tpu/logs.sh"
