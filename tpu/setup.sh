#!/usr/bin/env bash
# Installs the project (with the `tpu` extra: jax[tpu] and its matching libtpu) on every worker.
source "$(dirname "$0")/common.sh"
ssh_all "set -e; sudo apt-get -qq update && sudo apt-get -qq install -y python3.11 python3.11-venv git >/dev/null;
  [ -d $REMOTE_DIR ] || git clone -q $REPO_URL $REMOTE_DIR; cd $REMOTE_DIR && git fetch -q && git checkout -q $REPO_REF && git pull -q || true;
  python3.11 -m venv .venv && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e '.[tpu]';
  .venv/bin/python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'"
