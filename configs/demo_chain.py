"""The demo on the reasoning-chain task (`pgpo_jax/demo_task/chain.py`): PGPO, tiny model, CPU.

    python scripts/train.py --config=configs/demo_chain.py --workdir=runs/demo_chain

Like `configs/demo.py`, but each question needs 1-3 image facts and several image-free arithmetic
steps, so worked responses are 65-108 tokens of which 1-3 state image facts. The warm-up teaches the
chain format from each row's worked `solution`. The data (and a tokenizer trained on chain text) go to
demo_data_chain/ on first use. experiments/chain_pgpo/ runs the comparison on this config.
"""

from pgpo_jax.config import sibling


def get_config():
  c = sibling("demo", __file__).get_config()
  c.data.demo_task = "chain"
  c.data.demo_dir = "demo_data_chain"
  c.data.train_files = "demo_data_chain/train.parquet"
  c.data.eval_files = "demo_data_chain/test.parquet"
  c.data.processor_dir = "demo_data_chain/model"
  c.data.demo_eval_rows = 512

  c.rollout.max_new_tokens = 128  # worked solutions are at most ~110 tokens

  # The paper's PGPO (τ 0.4, β 2, no cap): with ~85-token responses the weight mass spreads over more
  # tokens than on the short-answer demo, which needed the cap.
  c.pgpo.max_weight = None

  c.warmup.target_key = "solution"
  c.warmup.labels_key = "labels"  # the span labels; read when warmup.perception_weight != 1
  c.warmup.sft_steps = 300  # measured: eval accuracy 0.09, format 1.0 after 300 (0.01 after 100)
  return c
