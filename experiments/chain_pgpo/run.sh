#!/usr/bin/env bash
# GRPO vs DAPO vs PGPO on the reasoning-chain task, with the ground-truth dependency check.
#   bash experiments/chain_pgpo/run.sh            # everything; rerun to resume
# Knobs (environment): SEEDS (main arms, default "0 1 2 3 4"), ABL_SEEDS (ablations, "0 1 2"),
# MAIN_ARMS ("grpo dapo pgpo"), ABL_ARMS ("pgpo_tau0 pgpo_tau0.8 pgpo_beta1 pgpo_beta4"),
# STEPS (200), PROMPTS (rollout prompts per step, 16), DEP_ARMS (arms the dependency check reads,
# "pgpo dapo"), DEP_SEEDS (its seeds, "0 1 2"), DEP_N (held-out prompts per checkpoint, 128).
# An empty SEEDS / ABL_SEEDS / *_ARMS skips those runs.
# RUNS (where runs go, default runs/ here), OUT (where the tables go, default here) and EXTRA
# (more --config.* flags for every run) are for smoke tests, e.g. RUNS=/tmp/smoke OUT=/tmp/smoke SEEDS=0 ABL_SEEDS= STEPS=2 \
#   EXTRA=--config.warmup.sft_steps=5.
# A finished run has runs/<arm>_s<seed>/DONE and is skipped; an interrupted one resumes from its last
# checkpoint. Results: results.md, results.json, plots/ next to this file.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"
py=.venv/bin/python
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
runs="${RUNS:-$here/runs}"
mkdir -p "$runs"
SEEDS=${SEEDS-"0 1 2 3 4"}
ABL_SEEDS=${ABL_SEEDS-"0 1 2"}
MAIN_ARMS=${MAIN_ARMS-"grpo dapo pgpo"}
ABL_ARMS=${ABL_ARMS-"pgpo_tau0 pgpo_tau0.8 pgpo_beta1 pgpo_beta4"}
STEPS=${STEPS:-200}
PROMPTS=${PROMPTS:-16}

# One data set for every run (seed 0): 2000 training rows, 512 held-out rows, the chain tokenizer.
if [ ! -f "$runs/data/model/tokenizer.json" ]; then
  $py scripts/make_demo_data.py --task=chain --out_dir="$runs/data" --n_train=2000 --n_test=512
fi

train() {  # arm seed
  local out="$runs/$1_s$2"
  [ -f "$out/DONE" ] && return 0
  echo "== $1 seed $2 ($(date +%H:%M:%S))"
  mkdir -p "$out"
  $py scripts/train.py "--config=$here/config.py:$1" "--config.seed=$2" \
    "--config.train.num_steps=$STEPS" "--config.checkpoint.every=$(( STEPS / 4 > 0 ? STEPS / 4 : 1 ))" \
    "--config.train.eval_every=$(( STEPS / 4 > 0 ? STEPS / 4 : 1 ))" \
    "--config.rollout.prompts_per_step=$PROMPTS" "--config.updates.prompts_per_update=$PROMPTS" \
    "--config.data.train_files=$runs/data/train.parquet" "--config.data.eval_files=$runs/data/test.parquet" \
    "--config.data.processor_dir=$runs/data/model" \
    "--config.warmup.cache_dir=$runs/warmup_s$2" ${EXTRA:-} --workdir="$out" >> "$out.log" 2>&1 \
    || { echo "run failed, see $out.log"; exit 1; }
  touch "$out/DONE"
}

for seed in $SEEDS; do for arm in $MAIN_ARMS; do train "$arm" "$seed"; done; done
for seed in $ABL_SEEDS; do for arm in $ABL_ARMS; do train "$arm" "$seed"; done; done
# shellcheck disable=SC2086
$py "$here/dependency.py" "$runs" --arms ${DEP_ARMS:-pgpo dapo} --seeds ${DEP_SEEDS:-0 1 2} \
  --n "${DEP_N:-128}"
$py "$here/aggregate.py" "$runs" --out "${OUT:-$here}"
