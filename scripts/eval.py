"""Benchmark accuracy of a checkpoint: avg@k (paper: k=8, temperature 1.0, top-p 1.0, 2048 tokens) or greedy.

    python scripts/eval.py --ckpt runs/pgpo_7b --data mathverse=data/mathverse.parquet,data/wemath.jsonl
    python scripts/eval.py --ckpt runs/pgpo_7b/checkpoints/300 --data data/mathvista.parquet --greedy
    python scripts/eval.py --ckpt Qwen2.5-VL-7B-Instruct --data 'bench/*.parquet' --mesh data=4,tensor=2

Multi-host (the paper's avg@8 over eight benchmarks): run the same command on every host; on a TPU pod
slice the hosts find each other, elsewhere name the coordinator (same result as one host; host 0 writes):
    python scripts/eval.py --ckpt ... --data ... --coordinator_address=HOST0:PORT --num_processes=N --process_id=I

CKPT: a trainer WORKDIR (latest finished step), WORKDIR/checkpoints/<step>[/params], an HF folder or a
converted folder. Prints the per-benchmark table and writes results.json, results.csv and
generations.jsonl to --out (default WORKDIR/eval/step<N>_<protocol>, or eval/<name>_<protocol>).
Protocol and layouts: pgpo_jax/evaluation.py.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ckpt", required=True,
                 help="checkpoint: WORKDIR, WORKDIR/checkpoints/<step>, an HF or a converted folder")
  p.add_argument("--data", required=True, help="benchmark files FILE[,FILE...]; NAME=FILE names one; globs allowed")
  p.add_argument("--k", type=int, default=8, help="samples per prompt (avg@k)")
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--top_k", type=int, default=0)
  p.add_argument("--max_new_tokens", type=int, default=2048)
  p.add_argument("--greedy", action="store_true", help="temperature 0, k=1")
  p.add_argument("--batch_size", type=int, default=16, help="prompts per generation call (rows = batch_size * k)")
  p.add_argument("--max_prompt_length", type=int, default=4096)
  p.add_argument("--min_pixels", type=int, default=None)
  p.add_argument("--max_pixels", type=int, default=None)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--reward", default="pgpo_math", help="reward registered in pgpo_jax.rewards")
  p.add_argument("--dtype", default="bfloat16", help="bfloat16 | float32")
  p.add_argument("--mesh", default="", help="e.g. data=8 or data=2,tensor=4 (default: all devices on data)")
  p.add_argument("--processor", default=None, help="processor/tokenizer folder (default: next to the config)")
  p.add_argument("--question_key", default=None)
  p.add_argument("--answer_key", default=None)
  p.add_argument("--image_key", default=None, help="image column ('none': text-only)")
  p.add_argument("--image_dir", default=None, help="base folder of relative image paths")
  p.add_argument("--out", default=None, help="output folder")
  p.add_argument("--no_progress", action="store_true")
  p.add_argument("--distributed", default="auto", choices=("auto", "yes", "no"),
                 help="call jax.distributed.initialize() (auto: with --coordinator_address or on a multi-host TPU)")
  p.add_argument("--coordinator_address", default=None, help="host:port of process 0 (multi-host runs)")
  p.add_argument("--num_processes", type=int, default=None)
  p.add_argument("--process_id", type=int, default=None)
  a = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "orbax", "grain", "jax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)

  import jax

  from pgpo_jax import multihost
  if a.distributed == "yes" or (a.distributed == "auto" and (
      bool(a.coordinator_address) or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""))):
    multihost.initialize(a.coordinator_address, a.num_processes, a.process_id)
  from pgpo_jax import evaluation as ev
  try:
    kw = dict(top_p=a.top_p, top_k=a.top_k, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size,
              max_prompt_length=a.max_prompt_length, min_pixels=a.min_pixels, max_pixels=a.max_pixels,
              seed=a.seed, reward=a.reward)
    cfg = ev.EvalConfig.greedy(**kw) if a.greedy else ev.EvalConfig(k=a.k, temperature=a.temperature, **kw)
    benches = ev.resolve_benchmarks(a.data, question_key=a.question_key, answer_key=a.answer_key,
                                    image_key=a.image_key, image_dir=a.image_dir)
    policy = ev.load_policy(a.ckpt, dtype=a.dtype, mesh=ev.make_eval_mesh(a.mesh), processor_dir=a.processor,
                            min_pixels=a.min_pixels, max_pixels=a.max_pixels)
  except (ValueError, FileNotFoundError, NotImplementedError) as e:
    print(f"eval: error: {e}", file=sys.stderr)
    return 2
  result = ev.evaluate(policy, benches, cfg, progress=not a.no_progress)
  if jax.process_index() != 0:  # every host holds the whole result; host 0 writes it
    return 0
  out = a.out or ev.default_out_dir(policy.ref, cfg)
  paths = ev.write_results(result, out)
  print(f"\n{policy.ref.path} ({cfg.tag})")
  print(ev.format_table(result.table))
  print("\nwrote", ", ".join(paths.values()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
