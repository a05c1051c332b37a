#!/usr/bin/env bash
# DAPO vs PGPO (paper / dev rule) vs GRPO and ablations on the reasoning-chain task, with the
# ground-truth check of the dependency signal. Rerun to resume.
#   bash experiments/chain_pgpo/run.sh
# Knobs (environment): W0, W1, W2 (steps of the warm-up's stages 0-2), FROZEN1 (see below), SEEDS (main arms, default "0 1 2 3 4"), ABL_SEEDS (3-seed arms, "0 1 2"),
# MAIN_ARMS ("dapo pgpo pgpo_dev"), ABL_ARMS ("grpo pgpo_tau0 pgpo_tau1 pgpo_norenorm"), STEPS (200),
# PROMPTS (rollout prompts per step, 16), BLIND (warm-up blind_fraction, 0.25), DEP_ARMS (arms the
# dependency check reads, "pgpo dapo"), DEP_SEEDS ("0 1 2"), DEP_N (held-out prompts per checkpoint, 256),
# PARALLEL (runs side by side, each pinned to one core; 2: measured 1.47x the throughput of one run on
# both cores). An empty SEEDS / ABL_SEEDS / *_ARMS skips those runs.
# RUNS (where runs go, default runs/ here), OUT (where the tables go, default here) and EXTRA (more
# --config.* flags for every run) are for smoke tests, e.g.
#   RUNS=/tmp/smoke OUT=/tmp/smoke SEEDS=0 ABL_SEEDS= STEPS=2 W0=3 W1=3 W2=3 DEP_N=4 N_TRAIN=64 N_TRAIN0=64 N_TEST=16 \
#     EXTRA=--config.train.eval_prompts=8 bash experiments/chain_pgpo/run.sh
# A finished run has runs/<arm>_s<seed>/DONE and is skipped; an interrupted one resumes from its last
# checkpoint. Results: results.md, results.json, plots/ next to this file (committed; runs/ is not).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"
py=.venv/bin/python
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
runs="${RUNS:-$here/runs}"
mkdir -p "$runs"
# The commit the runs use (README: run from a worktree pinned at a commit); aggregate.py reports it.
git -C "$root" rev-parse HEAD >> "$runs/COMMITS" 2>/dev/null || true
SEEDS=${SEEDS-"0 1 2 3 4"}
ABL_SEEDS=${ABL_SEEDS-"0 1 2"}
MAIN_ARMS=${MAIN_ARMS-"dapo pgpo pgpo_dev"}
ABL_ARMS=${ABL_ARMS-"grpo pgpo_tau0 pgpo_tau1 pgpo_norenorm"}
STEPS=${STEPS:-200}
PROMPTS=${PROMPTS:-16}
BLIND=${BLIND:-0.25}
W0=${W0:-3000}  # warm-up stage 0: the vision tower alone, taught the image facts (vision_supervised.py)
W1=${W1:-2000}  # warm-up stage 1 from stage 0: constant lr 1e-3, images only
FROZEN1=${FROZEN1-"^visual/"}  # parameters stage 1 leaves as stage 0 made them ('' trains every one)
W2=${W2:-3500}  # stage 2 from stage 1: cosine to 0, BLIND of the rows under the blind view
PARALLEL=${PARALLEL:-2}
data=(--config.data.train_files="$runs/data/train.parquet" --config.data.eval_files="$runs/data/test.parquet"
  --config.data.processor_dir="$runs/data/model")

# One data set for every run (seed 0): 30,000 training rows, 1,024 held-out rows, the chain tokenizer.
if [ ! -f "$runs/data/model/tokenizer.json" ]; then
  $py scripts/make_demo_data.py --task=chain --out_dir="$runs/data" --n_train="${N_TRAIN:-30000}" \
    --n_test="${N_TEST:-1024}"
fi

# One warm-up for every arm and seed, in three stages (README "Set-up"). Stage 0 teaches the fresh
# model's vision tower the image facts directly (a pretrained tower, as a real LVLM has); stages 1-2
# are supervised warm-ups that write probe.json and save their progress every 250 steps (an
# interrupted warm-up resumes; an interrupted stage 0 restarts).
if [ ! -f "$runs/vision_pretrained.json" ]; then
  $py "$here/vision_supervised.py" --ckpt=config:pgpo --data="$runs/data" --steps="$W0" \
    --n_train="${N_TRAIN0:-16000}" --n_test="${N_TEST:-1024}" --save="$runs/vision_pretrained" \
    --out="$runs/vision_pretrained.json" > "$runs/vision_pretrained.log" 2>&1
fi
if [ ! -d "$runs/warmup_stage1/params" ]; then
  $py "$here/warmup.py" "--config=$here/config.py:pgpo" "${data[@]}" --config.warmup.sft_steps="$W1" \
    --config.model.random_init=False --config.model.init_from="$runs/vision_pretrained" \
    --config.optim.frozen_regex="$FROZEN1" \
    --config.warmup.cache_dir="$runs/warmup_stage1" --config.warmup.save_every=250 --n="${DEP_N:-256}" ${EXTRA:-} \
    > "$runs/warmup_stage1.log" 2>&1
fi
if [ ! -d "$runs/warmup/params" ]; then
  $py "$here/warmup.py" "--config=$here/config.py:pgpo" "${data[@]}" --config.model.random_init=False \
    --config.model.init_from="$runs/warmup_stage1" --config.seed=1 --config.warmup.sft_steps="$W2" \
    --config.optim.schedule=warmup_cosine --config.optim.warmup_steps=$(( W2 / 10 < 100 ? W2 / 10 : 100 )) \
    --config.warmup.blind_fraction="$BLIND" --config.warmup.cache_dir="$runs/warmup" \
    --config.warmup.save_every=250 \
    --n="${DEP_N:-256}" --signals ${EXTRA:-} > "$runs/warmup.log" 2>&1
fi

train() {  # arm seed core
  local out="$runs/$1_s$2"
  [ -f "$out/DONE" ] && return 0
  echo "== $1 seed $2 on core $3 ($(date +%H:%M:%S))"
  mkdir -p "$out"
  taskset -c "$3" $py scripts/train.py "--config=$here/config.py:$1" "--config.seed=$2" \
    "--config.train.num_steps=$STEPS" "--config.checkpoint.every=$(( STEPS / 4 > 0 ? STEPS / 4 : 1 ))" \
    "--config.train.eval_every=$(( STEPS / 4 > 0 ? STEPS / 4 : 1 ))" \
    "--config.rollout.prompts_per_step=$PROMPTS" "--config.updates.prompts_per_update=$PROMPTS" \
    "${data[@]}" "--config.warmup.cache_dir=$runs/warmup" ${EXTRA:-} --workdir="$out" >> "$out.log" 2>&1 \
    || { echo "run failed, see $out.log"; return 1; }
  touch "$out/DONE"
}

# The queue: main arms seed by seed, then the 3-seed arms; PARALLEL workers, one core each.
queue=()
for seed in $SEEDS; do for arm in $MAIN_ARMS; do queue+=("$arm $seed"); done; done
for seed in $ABL_SEEDS; do for arm in $ABL_ARMS; do queue+=("$arm $seed"); done; done
worker() {  # index
  local i
  for ((i = $1; i < ${#queue[@]}; i += PARALLEL)); do
    # shellcheck disable=SC2086
    train ${queue[$i]} "$(( $1 % $(nproc) ))" || true
  done
}
for ((w = 0; w < PARALLEL; w++)); do worker "$w" & done
wait

# shellcheck disable=SC2086
$py "$here/dependency.py" "$runs" --arms ${DEP_ARMS:-pgpo dapo} --seeds ${DEP_SEEDS:-0 1 2} \
  --n "${DEP_N:-256}"
$py "$here/aggregate.py" "$runs" --out "${OUT:-$here}"
