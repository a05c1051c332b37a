"""Benchmark accuracy of a checkpoint: avg@k (paper: k=8, temperature 1.0, top-p 1.0, 2048 tokens) or greedy.

    pgpo-eval --ckpt=runs/pgpo_7b --benchmarks=data/VPPO-Eval      # the paper's benchmarks, by name
    pgpo-eval --ckpt=runs/pgpo_7b --benchmarks='mmmu_pro=data/MMMU_Pro/standard (10 options)'
    pgpo-eval --ckpt=runs/pgpo_7b --data=mathverse=data/mathverse.parquet,data/wemath.jsonl
    pgpo-eval --ckpt=runs/pgpo_7b/checkpoints/300 --data=data/mathvista.parquet --greedy
    pgpo-eval --ckpt=Qwen2.5-VL-7B-Instruct --data='bench/*.parquet' --mesh=data=4,tensor=2 --config.k=4

CKPT: a trainer WORKDIR (latest finished step), WORKDIR/checkpoints/<step>[/params], an HF folder or a
converted folder. The protocol is `evaluation.EvalConfig`, every field settable as --config.FIELD=VALUE
(k, temperature, top_p, top_k, max_new_tokens, batch_size, max_prompt_length, min_pixels, max_pixels,
seed, reward, match_option_text); --greedy is k=1 at temperature 0.

--benchmarks=DIR reads a VPPO-Eval / PAPO-Eval folder (its `dataset_info.json`, in DIR or DIR/data) and
evaluates the paper's benchmarks in it (Geo3k, We-Math, MMK12, MathVerse, MathVerse-V, MathVision,
DynaMath, LogicVista, MMMU-Pro; others are skipped); --benchmarks=NAME=PATH,... takes them from files or
folders of any known layout (EasyR1, MMMU-Pro, sharegpt, ...). The table comes in the paper's order, with
the paper-style row of accuracies and their average. --data takes any files under their own names.
A benchmark without an image column is refused (--image_key=none evaluates a file text-only on purpose).

Prints the per-benchmark table and writes results.json,
results.csv and generations.jsonl to --out (default WORKDIR/eval/step<N>_<protocol>, or
eval/<name>_<protocol>). (`python scripts/eval.py ...` is the same command.) Protocol and layouts:
pgpo_jax/evaluation.py.

Multi-host (the paper's avg@8 over eight benchmarks): run the same command on every host; on a TPU pod
slice the hosts find each other, elsewhere name the coordinator (same result as one host; host 0 writes):
    pgpo-eval --ckpt=... --data=... --coordinator_address=HOST0:PORT --num_processes=N --process_id=I
"""

from __future__ import annotations

import sys
from typing import Sequence

from absl import flags
from ml_collections import config_flags

from pgpo_jax.cli import common


def _define(fv: flags.FlagValues, argv: list[str]) -> None:
  from pgpo_jax import evaluation as ev

  config_flags.DEFINE_config_dict(
    "config",
    common.config_from_dataclass(ev.EvalConfig()),
    "The evaluation protocol (evaluation.EvalConfig).",
    flag_values=fv,
    lock_config=True,
    sys_argv=argv,
  )
  flags.DEFINE_string(
    "data",
    None,
    "Benchmark files: FILE or NAME=FILE, comma-separated (globs allowed).",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "benchmarks",
    None,
    "The paper's benchmarks: a VPPO-Eval folder (dataset_info.json), or NAME=PATH items.",
    flag_values=fv,
  )
  flags.register_multi_flags_validator(
    ["data", "benchmarks"],
    lambda d: (d["data"] is None) != (d["benchmarks"] is None),
    message="give exactly one of --data and --benchmarks",
    flag_values=fv,
  )
  common.define_policy_flags(fv, dtype="bfloat16")
  common.define_distributed_flags(fv)


def main(argv: Sequence[str] | None = None) -> int:
  fv, _ = common.parse("pgpo-eval", __doc__, _define, argv)
  common.setup_logging()
  import jax

  common.maybe_initialize_distributed(fv)
  from pgpo_jax import evaluation as ev

  try:
    greedy = dict(k=1, temperature=0.0) if fv.greedy else {}
    cfg = common.dataclass_from_config(ev.EvalConfig, fv.config, **greedy)
    if fv.benchmarks is not None:
      benches = ev.paper_benchmarks(fv.benchmarks, image_dir=fv.image_dir)
    else:
      benches = ev.resolve_benchmarks(fv.data, **common.data_columns(fv))
    policy = common.load_policy(fv, cfg)
  except (ValueError, FileNotFoundError, NotImplementedError) as e:
    print(f"pgpo-eval: error: {e}", file=sys.stderr)
    return 2
  result = ev.evaluate(policy, benches, cfg, progress=not fv.no_progress)
  if jax.process_index() != 0:  # every host holds the whole result; host 0 writes it
    return 0
  out = fv.out or ev.default_out_dir(policy.ref, cfg)
  paths = ev.write_results(result, out)
  print(f"\n{policy.ref.path} ({cfg.tag})")
  print(ev.format_table(result.table))
  print("\n" + ev.format_paper_row(result.table))
  print("\nwrote", ", ".join(paths.values()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
