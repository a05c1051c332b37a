"""One arm of the chain-task experiment: `configs/demo_chain.py` at the experiment's sizes plus the arm.

    python scripts/train.py --config=experiments/chain_pgpo/config.py:pgpo --config.seed=0 \
      --workdir=experiments/chain_pgpo/runs/pgpo_s0
    # all arms and seeds, resumable: bash experiments/chain_pgpo/run.sh

Arms (`ARMS`): dapo, pgpo (the paper's rule), pgpo_dev (the authors' reported development rule),
grpo and the ablations pgpo_tau0 (boost only), pgpo_tau1 (suppression only), pgpo_norenorm. The data
(made once by run.sh, seed 0) is shared by every run, and so is the warm-up (run.sh makes it once into
runs/warmup; every arm and seed reads it through `warmup.cache_dir`): seeds vary the RL sampling only.
"""

import os

from pgpo_jax.config import sibling

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "runs", "data")

# Arm → overrides of the PGPO config (dotted key → value).
ARMS: dict[str, dict[str, object]] = {
  # Main arms (5 seeds).
  "dapo": {"pgpo.enabled": False},
  "pgpo": {},  # as the paper states it: absolute τ 0.4, β 2, renormalised, no floor, no cap
  # As the authors' development code is reported to do it: τ is a per-response quantile of I,
  # weights floored at 0.1, no renormalisation.
  "pgpo_dev": {
    "pgpo.threshold_mode": "quantile",
    "pgpo.min_weight": 0.1,
    "pgpo.renormalize": False,
  },
  # 3 seeds.
  "grpo": {
    "pgpo.enabled": False,
    "loss.agg": "seq-mean-token-mean",
    "loss.clip_high": 0.2,
    "dynamic_sampling.enabled": False,
  },
  "pgpo_tau0": {"pgpo.tau": 0.0},  # boost only
  "pgpo_tau1": {"pgpo.tau": 1.0},  # suppression only
  "pgpo_norenorm": {"pgpo.renormalize": False},
  # Defined, not in run.sh's default lists.
  "pgpo_beta1": {"pgpo.beta": 1.0},
  "pgpo_beta4": {"pgpo.beta": 4.0},
  "pgpo_cap5": {"pgpo.max_weight": 5.0},
}


def get_config(arm: str = "pgpo"):
  if arm not in ARMS:
    raise ValueError(
      f"experiments/chain_pgpo/config.py: unknown arm {arm!r}; expected one of {list(ARMS)}"
    )
  c = sibling("demo_chain", os.path.join(HERE, "..", "..", "configs", "demo_chain.py")).get_config()
  c.data.make_demo_data = False  # run.sh makes it once, so every seed trains on the same rows
  c.data.train_files = os.path.join(DATA, "train.parquet")
  c.data.eval_files = os.path.join(DATA, "test.parquet")
  c.data.processor_dir = os.path.join(DATA, "model")
  c.pgpo.enabled, c.pgpo.tau, c.pgpo.beta, c.pgpo.max_weight = True, 0.4, 2.0, None
  # A vision tower that can learn to read the image (measured, README "Set-up"): the demo's 64-wide,
  # 2-layer tower read 36% of the facts after 2,000 warm-up steps, this one 38%, and it keeps learning.
  c.model.tiny.vision_hidden_size = 128
  c.model.tiny.vision_intermediate_size = 256
  c.model.tiny.vision_depth = 4
  c.model.tiny.vision_num_heads = 4
  c.model.tiny.vision_fullatt_block_indexes = (1, 3)
  c.train.num_steps = 200
  c.train.eval_every = 50
  c.train.eval_prompts = 512
  c.checkpoint.every = 50  # the dependency check reads these (after warm-up, 50, 100, 150, 200)
  c.checkpoint.keep = 10
  for key, value in ARMS[arm].items():
    node = c
    *path, leaf = key.split(".")
    for part in path:
      node = node[part]
    node[leaf] = value
  return c
