"""GRPO baseline on Qwen2.5-VL-7B-Instruct: no PGPO weights, GRPO's loss as written.

Sequence-mean of token-means, symmetric clip (0.2), no dynamic sampling; everything else as
configs/pgpo_7b.py:
    python scripts/train.py --config=configs/grpo_7b.py --config.model.init_from=/ckpt/qwen2_5_vl_7b \
        --config.data.train_files='/data/virl39k/*.parquet' --workdir=gs://BUCKET/runs/grpo_7b
"""
from pgpo_jax.config import sibling

pgpo_7b = sibling("pgpo_7b", __file__)


def get_config():
  c = pgpo_7b.get_config()
  c.pgpo.enabled = False
  c.loss.agg = "seq-mean-token-mean"
  c.loss.clip_high = 0.2
  c.dynamic_sampling.enabled = False
  return c
