"""GRPO baseline on Qwen2.5-VL-7B-Instruct, as the paper's framework (EasyR1) runs it by default.

EasyR1's defaults (examples/config.yaml, workers/actor/config.py): a KL loss to the frozen initial
policy (`use_kl_loss`, `kl_penalty: low_var_kl` = our k3, `kl_coef: 1.0e-2`), token-mean loss
(`loss_avg_mode: token`), clip 0.2 / 0.3 with dual-clip 3.0, no dynamic sampling
(`online_filtering: false`). No PGPO weights; data, rollout and optimizer as configs/pgpo_7b.py.
π_ref is one more copy of the weights on the devices (`pgpo_jax/reference.py`), scored once per
rollout batch:
    python scripts/train.py --config=configs/grpo_7b.py --config.model.init_from=/ckpt/qwen2_5_vl_7b \
        --config.data.train_files='/data/virl39k/data/*.parquet' --workdir=gs://BUCKET/runs/grpo_7b
"""

from pgpo_jax.config import sibling

pgpo_7b = sibling("pgpo_7b", __file__)


def get_config():
  c = pgpo_7b.get_config()
  c.pgpo.enabled = False
  c.loss.kl_coef = 1e-2
  c.loss.kl_estimator = "k3"  # verl/EasyR1 "low_var_kl"
  c.loss.agg = "token-mean"
  c.loss.clip_low = 0.2
  c.loss.clip_high = 0.3
  c.loss.dual_clip = 3.0
  c.dynamic_sampling.enabled = False
  return c
