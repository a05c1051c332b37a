"""One arm of the chain-task experiment: `configs/demo_chain.py` at the experiment's sizes plus the arm.

    python scripts/train.py --config=experiments/chain_pgpo/config.py:pgpo --config.seed=0 \
      --workdir=experiments/chain_pgpo/runs/pgpo_s0
    # all arms and seeds, resumable: bash experiments/chain_pgpo/run.sh

Arms (`ARMS`): grpo, dapo, pgpo (τ 0.4, β 2, uncapped) and the ablations pgpo_tau0, pgpo_tau0.8,
pgpo_beta1, pgpo_beta4, pgpo_cap5. The data (made once by run.sh, seed 0) is shared by every run; the
warm-up is cached per seed in runs/warmup_s<seed>, so every arm of a seed starts from the same weights.
"""

import os

from pgpo_jax.config import sibling

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "runs", "data")

# Arm → overrides of the PGPO config (dotted key → value).
ARMS: dict[str, dict[str, object]] = {
  "grpo": {
    "pgpo.enabled": False,
    "loss.agg": "seq-mean-token-mean",
    "loss.clip_high": 0.2,
    "dynamic_sampling.enabled": False,
  },
  "dapo": {"pgpo.enabled": False},
  "pgpo": {},
  "pgpo_tau0": {"pgpo.tau": 0.0},
  "pgpo_tau0.8": {"pgpo.tau": 0.8},
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
