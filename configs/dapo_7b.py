"""DAPO baseline on Qwen2.5-VL-7B-Instruct: the PGPO recipe with PGPO's token weights off (ω̃ ≡ 1).

Same data, rollout, dynamic sampling, asymmetric clip and token-mean loss as configs/pgpo_7b.py:
    python scripts/train.py --config=configs/dapo_7b.py --config.model.init_from=/ckpt/qwen2_5_vl_7b \
        --config.data.train_files='/data/virl39k/data/*.parquet' --workdir=gs://BUCKET/runs/dapo_7b
"""

from pgpo_jax.config import sibling

pgpo_7b = sibling("pgpo_7b", __file__)


def get_config():
  c = pgpo_7b.get_config()
  c.pgpo.enabled = False  # plain sequence advantage on every token
  return c
