"""Ahead-of-time compile of the trainer's programs for a TPU slice on this (CPU) host.

    python scripts/compile_check.py --config=configs/pgpo_7b.py --topology=v5p-64
    python scripts/compile_check.py --config=configs/pgpo_7b.py --topology=v5e-256 \
        --config.mesh.tensor=4 --config.updates.micro_batch_prompts=64 --steps=train

Prints per-step per-device memory vs HBM and FLOPs; exit code 1 if a step does not fit, 2 on a
compile error. Needs libtpu: pip install 'jax[tpu]==0.10.2' (no TPU is used).
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for the topology; never grab a local accelerator

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file in configs/.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "v5p-64", "v5p-64 | v5e-256 | v4-128 | v6e-16 | raw 'v5e:2x2'.")
_STEPS = flags.DEFINE_list("steps", "rollout_start,rollout_decode,score,train", "Steps to compile.")
_SCORE_PROMPTS = flags.DEFINE_integer("score_prompts", None, "What-if: score in calls of this many prompts "
                                      "(the trainer scores the whole rollout batch in one call).")
_JSON = flags.DEFINE_string("json", None, "Also write the reports to this JSON file.")


def main(argv):
  del argv
  import dataclasses
  from pgpo_jax.tools import compile_check
  ctx, reports = compile_check.run(_CONFIG.value, _TOPOLOGY.value, _STEPS.value,
                                   log=lambda m: print(m, file=sys.stderr, flush=True),
                                   score_prompts=_SCORE_PROMPTS.value)
  print(compile_check.format_report(ctx, reports))
  for r in reports:
    if getattr(r, "traceback", None):
      print(f"\n{r.name}: {r.traceback}", file=sys.stderr)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump([dataclasses.asdict(r) | {"total": r.total} for r in reports], f, indent=2)
  sys.exit(compile_check.exit_code(reports))


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
