"""PGPO on Qwen2.5-VL-3B-Instruct: the paper's setup (docs/method.md §5), for a TPU v5p-32 slice.

Data and evaluation as configs/pgpo_7b.py (ViRL39K from `chamber111/VPPO_ViRL39K_train`, no column
flags; the paper's benchmarks from `chamber111/VPPO-Eval`):
    python scripts/convert_hf.py --hf_dir /data/Qwen2.5-VL-3B-Instruct --out_dir /ckpt/qwen2_5_vl_3b
    python scripts/train.py --config=configs/pgpo_3b.py --config.model.init_from=/ckpt/qwen2_5_vl_3b \
        --config.data.train_files='/data/virl39k/data/*.parquet' --workdir=gs://BUCKET/runs/pgpo_3b
    pgpo-eval --ckpt=gs://BUCKET/runs/pgpo_3b --benchmarks=/data/VPPO-Eval
    python scripts/compile_check.py --config=configs/pgpo_3b.py --topology=v5p-32
(all four programs fit with the named remat policies, issue 23: at most 38.7 GiB per device, 41%, the
train step; RL step 50.0 s at peak, minimum 41.2 s: benchmarks/results/*_3b_v5p-32_named_remat.json.)
On v5e-64 (16 GiB chips, 32 batch shards at tensor=2): micro-batches split over the shards, and the
`dots_no_batch` activations (pgpo_7b) do not fit, so recompute everything:
    python scripts/compile_check.py --config=configs/pgpo_3b.py --topology=v5e-64 \
        --config.updates.micro_batch_prompts=32 --config.model.remat_policy=full
(all four programs fit with the named remat policies: at most 10.4 GiB per device, 65%, the rollout
start; train 10.1 GiB, 63%; RL step 41.0 s at peak, minimum 33.0 s:
benchmarks/results/compile_check_pgpo_3b_v5e-64_named_remat.json.)
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
