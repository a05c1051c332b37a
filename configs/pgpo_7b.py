"""PGPO on Qwen2.5-VL-7B-Instruct: the paper's setup (docs/method.md §5), for a TPU v5p-64 slice.

Data: ViRL39K as VPPO trains on it (HF `chamber111/VPPO_ViRL39K_train`; README "Reproduce the
paper"): parquet shards with `problem` (one `<image>` per image), `answer` and `images` (a list of
{bytes, path}), the `data.question_key / answer_key / image_key` defaults, so `data.train_files` is all
it needs; rows without a usable image are skipped and counted (docs/method.md §5).

Convert the HF checkpoint once, then train (every worker of the slice runs the same command):
    huggingface-cli download chamber111/VPPO_ViRL39K_train --repo-type dataset --local-dir /data/virl39k
    python scripts/convert_hf.py --hf_dir /data/Qwen2.5-VL-7B-Instruct --out_dir /ckpt/qwen2_5_vl_7b
    python scripts/train.py --config=configs/pgpo_7b.py --config.model.init_from=/ckpt/qwen2_5_vl_7b \
        --config.data.train_files='/data/virl39k/data/*.parquet' --workdir=gs://BUCKET/runs/pgpo_7b
Evaluate on the paper's benchmarks (HF `chamber111/VPPO-Eval`, avg@8 at temperature 1.0):
    pgpo-eval --ckpt=gs://BUCKET/runs/pgpo_7b --benchmarks=/data/VPPO-Eval

Check that every program compiles and fits before asking for the slice (CPU host, needs libtpu):
    python scripts/compile_check.py --config=configs/pgpo_7b.py --topology=v5p-64
On v5e-256 (16 GiB per chip): 64 batch shards, so micro-batches (and the scoring slice, which
defaults to one) must split over them, and the saved matmul outputs of `dots_no_batch` (~22 GiB per
device at one prompt per device) do not fit, so recompute everything:
    python scripts/compile_check.py --config=configs/pgpo_7b.py --topology=v5e-256 \
        --config.updates.micro_batch_prompts=64 --config.model.remat_policy=full

compile_check on this recipe (worst case: every response at max_new_tokens; GiB per device; t@peak
and the minimum at the bf16 peak; runs per RL step; docs/design.md "Fitting the recipes" has more):
  program          v5p-64: GiB (HBM)  t@peak  x min  runs   v5e-256: GiB (HBM)  t@peak  x min  runs
  rollout_start            26.4 (28%)   0.93 s  1.07    1            6.5 (41%)   0.27 s  1.07    1
  rollout_decode           14.8 (16%)   7.38 s  1.10    1            5.0 (31%)  12.19 s  1.02    1
  score                     8.1  (9%)   0.34 s  1.12   48            3.8 (24%)   0.80 s  1.12    6
  train                    35.4 (37%)   8.65 s  1.16    3            9.4 (59%)   3.01 s  1.39    3
  RL step at peak          50.8 s (minimum 44.7 s)                  26.3 s (minimum 23.0 s)
(splash attention: `model.attention_impl = "auto"`; named remat policies, issue 23:
`benchmarks/results/compile_check_pgpo_7b_*_named_remat.json`.)
"""

from pgpo_jax.config import base_config


def get_config():
  c = base_config()
  c.model.init_from = ""  # required for training: an HF folder or a converted checkpoint
  # Architecture when `init_from` has no config.json yet (compile_check, shape tests): a
  # `qwen2_5_vl.PRESETS` key.
  c.model.preset = "7b"
  # float32 master weights (and AdamW moments): at lr 1e-6 an AdamW step moves a weight by ~1e-6, far
  # below bfloat16's resolution (ulp ~1.2e-4 at |w| = 0.02), so bf16 weights would never change
  # (tests/models/test_precision.py). Matmuls run in bfloat16 (each layer casts its weights where it uses
  # them); RMSNorm, softmax, log-softmax and the loss stay float32.
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  # Backward-pass recompute: `dots_no_batch` keeps every weight matmul's output (q/k/v/o, gate/up/down:
  # ~20 GiB per device at one prompt x 5 responses x 4,096 tokens per micro-batch) and recomputes only
  # the attention scores. On v5p-64 the update then needs 36.1 GiB of 95 (`full`: 25.7) and its
  # t@peak drops from 11.13 s to 8.94 s (x3 updates per RL step). 16 GiB chips: `full`.
  c.model.remat_policy = "dots_no_batch"
  c.model.scan_layers = True
  # Splash (Pallas flash) attention on TPU, cuDNN on NVIDIA GPUs; xla on CPU, where query chunks of
  # 1024 bound the [rows, heads, T, S] attention scores.
  c.model.attention_impl = "auto"
  c.model.attention_chunk_size = 1024

  # v5p-64 = 32 chips: tensor=4 (28 heads, 4 KV heads), fsdp over the rest (8 on v5p-64).
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 4

  # Image sizes as in VPPO's EasyR1 recipe (the setup PGPO follows): every image is resized to between
  # 256 and 1280 LM tokens (one token per 28x28 pixels), i.e. 1,024 to 5,120 ViT patches.
  c.data.min_pixels = 256 * 28 * 28  # 200,704
  c.data.max_pixels = 1280 * 28 * 28  # 1,003,520
  # VPPO allows 4,096 prompt tokens; we keep 2,048. A rollout batch is padded to the length bucket of
  # its longest prompt and the compile check sizes every program for max_prompt_length + max_new_tokens,
  # so 4,096 would make the worst case 1.5x longer for the few prompts that need it: 2,048 holds any
  # one-image prompt (<= 1,280 image tokens) with a question of up to ~750 tokens; longer (multi-image)
  # prompts are skipped and counted (`prompt_too_long`). Set 4,096 where memory allows (compile_check).
  c.data.max_prompt_length = 2048
  c.data.num_epochs = 2

  c.rollout.prompts_per_step = 384
  c.rollout.group_size = 5
  c.rollout.max_new_tokens = 2048
  c.rollout.temperature = 1.0
  c.rollout.top_p = 0.99

  c.updates.prompts_per_update = 128  # 640 responses -> 3 optimizer steps per rollout batch
  c.updates.micro_batch_prompts = (
    8  # 40 sequences; must be a multiple of the batch shards (data x fsdp)
  )
  c.updates.passes = 1

  c.optim.learning_rate = 1e-6
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.optim.weight_decay = 1e-2
  c.optim.grad_clip_norm = 1.0

  c.loss.clip_low = 0.2
  c.loss.clip_high = 0.28
  c.loss.agg = "token-mean"
  # Dual-clip PPO (Ye et al. 2020) as EasyR1/VPPO run it by default (clip_ratio_dual = 3.0): for Ã < 0 the
  # per-token loss is capped at -3·Ã, so a token whose ratio ran far above 1 cannot dominate the step.
  # The paper's loss (docs/method.md §4) has no such term; it only acts on ρ > 3 with Ã < 0.
  c.loss.dual_clip = 3.0

  c.pgpo.enabled = True
  c.pgpo.tau = 0.4
  c.pgpo.beta = 2.0
  c.pgpo.dependency_estimator = "k3"

  c.train.num_steps = 200  # ~2 epochs of ViRL39K (~39k prompts / 384 per step)
  c.train.packing = True  # padding-free scoring and updates (rl/packing.py)
  c.train.packed_row_length = 4096  # >= max_prompt_length + max_new_tokens
  c.checkpoint.every = 25
  c.checkpoint.keep = 3
  return c
