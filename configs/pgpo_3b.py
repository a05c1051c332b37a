"""PGPO on Qwen2.5-VL-3B-Instruct: the paper's setup (docs/method.md §5), for a TPU v5p-32 slice.

    python scripts/convert_hf.py --hf_dir /data/Qwen2.5-VL-3B-Instruct --out_dir /ckpt/qwen2_5_vl_3b
    python scripts/train.py --config=configs/pgpo_3b.py --config.model.init_from=/ckpt/qwen2_5_vl_3b \
        --config.data.train_files='/data/virl39k/*.parquet' --workdir=gs://BUCKET/runs/pgpo_3b
    python scripts/compile_check.py --config=configs/pgpo_3b.py --topology=v5p-32
"""

from pgpo_jax.config import sibling

pgpo_7b = sibling("pgpo_7b", __file__)


def get_config():
  c = pgpo_7b.get_config()  # same recipe; only the model and its mesh differ
  c.model.preset = "3b"  # tied embeddings: no lm_head
  # 16 heads, 2 KV heads: tensor=2 splits both (tensor=4 would replicate the KV projections).
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 2
  return c
