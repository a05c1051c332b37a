"""Ahead-of-time compile of the trainer's programs for a TPU slice on this (CPU) host.

    pgpo-compile-check --config=configs/pgpo_7b.py --topology=v5p-64
    pgpo-compile-check --config=configs/pgpo_7b.py --topology=v5e-256 \\
        --config.mesh.tensor=4 --config.updates.micro_batch_prompts=64 --steps=train

(`python scripts/compile_check.py ...` is the same command.) Prints per-step per-device memory vs HBM
and FLOPs; exit code 1 if a step does not fit or its compiler crashes (each program compiles in
its own child process, `--noisolate` to compile in this one), 3 on another compile error, 2 on a
usage error (a bad flag, a --topology that names no TPU slice, an unknown --steps name). Needs
libtpu: pip install 'jax[tpu]==0.10.2' (no TPU is used). Details: pgpo_jax/tools/compile_check.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Sequence

from absl import flags
from ml_collections import config_flags

from pgpo_jax.cli import common


def _define(fv: flags.FlagValues, argv: list[str]) -> None:
  config_flags.DEFINE_config_file(
    "config", None, "Config file in configs/.", flag_values=fv, lock_config=True, sys_argv=argv
  )
  flags.mark_flag_as_required("config", flag_values=fv)
  flags.DEFINE_string(
    "topology", "v5p-64", "v5p-64 | v5e-256 | v4-128 | v6e-16 | raw 'v5e:2x2'.", flag_values=fv
  )
  flags.DEFINE_list(
    "steps",
    "rollout_start,rollout_decode,score,reference,train",
    "Steps to compile (reference: π_ref's program, only with loss.kl_coef > 0).",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "score_prompts",
    None,
    "What-if: score in calls of this many prompts (default: the "
    "trainer's slice, pgpo.scoring_prompts).",
    flag_values=fv,
  )
  flags.DEFINE_bool(
    "isolate",
    True,
    "Compile each program in its own child process, so that a compiler crash (abort) is "
    "reported as that program's failure instead of ending the check.",
    flag_values=fv,
  )
  flags.DEFINE_string("json", None, "Also write the reports to this JSON file.", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
  fv, _ = common.parse("pgpo-compile-check", __doc__, _define, argv)
  # Before jax starts: compile for the topology, never grab a local accelerator; several libtpu
  # users on one host (parallel checks, tests) are fine.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "true")
  from pgpo_jax.tools import compile_check

  unknown = [s for s in fv.steps if s not in compile_check.ALL_STEPS]
  if unknown:
    print(
      f"pgpo-compile-check: error: --steps: unknown {unknown}; valid: "
      f"{','.join(compile_check.ALL_STEPS)}",
      file=sys.stderr,
    )
    return common.USAGE_ERROR
  try:
    compile_check.parse_topology(fv.topology)
    ctx, reports = compile_check.run(
      fv.config,
      fv.topology,
      fv.steps,
      log=lambda m: print(m, file=sys.stderr, flush=True),
      score_prompts=fv.score_prompts,
      isolate=fv.isolate,
    )
  except compile_check.TopologyError as e:  # raised before anything compiles
    print(f"pgpo-compile-check: error: --topology={fv.topology}: {e}", file=sys.stderr)
    return common.USAGE_ERROR
  print(compile_check.format_report(ctx, reports))
  for r in reports:
    if r.traceback:
      print(f"\n{r.name}: {r.traceback}", file=sys.stderr)
  bad = compile_check.failures(reports)
  if bad:
    print("\nFAILED:\n" + "\n".join(f"  {line}" for line in bad))
  if fv.json:
    with open(fv.json, "w") as f:
      json.dump([dataclasses.asdict(r) | {"total": r.total} for r in reports], f, indent=2)
  return compile_check.exit_code(reports)


if __name__ == "__main__":
  sys.exit(main())
