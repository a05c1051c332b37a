"""One process of a (possibly multi-process) tiny training run on CPU devices, for test_multihost.py.

    python tests/multihost_run.py --workdir W --data_dir D --steps N --devices 4 [--override k=v ...]
        [--coordinator localhost:PORT --num_processes 2 --process_id I]

Each process gets `devices / num_processes` CPU devices; with a coordinator the processes join one
jax.distributed run (gloo collectives) exactly as `scripts/train.py --coordinator_address` does.
Host 0 prints the last step's metrics as one JSON line.
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--data_dir", required=True)
  ap.add_argument("--steps", type=int, required=True)
  ap.add_argument("--devices", type=int, default=4)
  ap.add_argument("--coordinator")
  ap.add_argument("--num_processes", type=int, default=1)
  ap.add_argument("--process_id", type=int, default=0)
  ap.add_argument("--override", action="append", default=[], help="dotted.key=python_literal")
  a = ap.parse_args()
  sys.path.insert(0, ROOT)
  # Default LLVM optimisation here: the 2-host vs 1-host comparison was measured at it.
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={a.devices // a.num_processes}"
  os.environ["JAX_PLATFORMS"] = "cpu"
  import ast

  import jax

  jax.config.update("jax_default_matmul_precision", "highest")
  jax.config.update("jax_compilation_cache_dir", os.path.join(ROOT, ".jax_cache"))
  from pgpo_jax import multihost, rewards, trainer
  from tests.tiny_run import answer_selected_groups, length_parity, tiny_config

  if a.coordinator:
    multihost.initialize(a.coordinator, a.num_processes, a.process_id)
  assert jax.device_count() == a.devices, jax.devices()
  rewards.BATCH_REWARD_FNS["test_length_parity"] = length_parity
  c = tiny_config(a.data_dir)
  c.train.num_steps = a.steps
  for kv in a.override:
    key, value = kv.split("=", 1)
    *path, leaf = key.split(".")
    node = c
    for p in path:
      node = node[p]
    node[leaf] = ast.literal_eval(value)
  rewards.BATCH_REWARD_FNS["test_answer_groups"] = answer_selected_groups(c.rollout.group_size)
  try:
    last = trainer.train(c, a.workdir)
  except trainer.Preempted:
    sys.exit(trainer.EXIT_PREEMPTED)
  if jax.process_index() == 0:
    print(json.dumps(last))


if __name__ == "__main__":
  main()
