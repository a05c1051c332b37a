"""Token visual dependency S and PGPO weights of a checkpoint's responses: HTML pages, plots, JSON.

    pgpo-inspect --ckpt=runs/pgpo_3b --data=data/mathverse.parquet --config.n=20 --out=insp/
    pgpo-inspect --ckpt=runs/demo --data=demo_data/test.parquet --greedy --config.tau=0.4 --config.beta=2.0

Samples one response per prompt, scores it with the trainer's two-view scoring program (image / visual
tokens masked) at the sampling temperature `--config.temperature`, as training scores at the rollout
temperature (`--greedy` / temperature 0: scored at T = 1), computes ω̃ (docs/method.md §3) and writes
index.html, response_NNN.html, dependency_hist.png, weights_hist.png, dependency_by_category.png,
sparsity.png, summary.json and tokens.jsonl to --out (default WORKDIR/inspect/step<N>, or inspect/<name>). Settings are
`tools.inspect_dependency.InspectConfig`, each a --config.FIELD=VALUE (n, tau, beta, threshold_mode,
estimator, clamp_log_ratio, mask_vision_markers, chunk_size, thresholds and the evaluator's sampling
fields; `--config.responses=solution` scores the data's worked solutions and
`--config.labeler=chain` labels sampled ones, for the chain task's ground-truth check). Needs the `plot` extra. (`python scripts/inspect_dependency.py ...` is the same command.)
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

from absl import flags
from ml_collections import config_flags

from pgpo_jax.cli import common


def _define(fv: flags.FlagValues, argv: list[str]) -> None:
  from pgpo_jax.tools import inspect_dependency as idep

  config_flags.DEFINE_config_dict(
    "config",
    common.config_from_dataclass(idep.InspectConfig()),
    "Sampling, scoring and weight settings (InspectConfig).",
    flag_values=fv,
    lock_config=True,
    sys_argv=argv,
  )
  flags.DEFINE_string(
    "data", None, "One data file (parquet / JSON lines) with images.", flag_values=fv
  )
  flags.mark_flag_as_required("data", flag_values=fv)
  common.define_policy_flags(fv, dtype="float32")  # float32: exact S


def main(argv: Sequence[str] | None = None) -> int:
  fv, _ = common.parse("pgpo-inspect", __doc__, _define, argv)
  common.setup_logging()
  from pgpo_jax.tools import inspect_dependency as idep

  try:
    greedy = dict(temperature=0.0) if fv.greedy else {}
    cfg = common.dataclass_from_config(idep.InspectConfig, fv.config, **greedy)
    spec = idep.dataset_spec(fv.data, **common.data_columns(fv))
    policy = common.load_policy(fv, cfg)
  except (ValueError, FileNotFoundError, NotImplementedError) as e:
    print(f"pgpo-inspect: error: {e}", file=sys.stderr)
    return 2
  records = idep.inspect(policy, spec, cfg, progress=not fv.no_progress)
  summary = idep.summarize(records, cfg)
  ref = policy.ref
  out = fv.out or (
    os.path.join(ref.workdir, "inspect", f"step{ref.step}")
    if ref.workdir
    else os.path.join("inspect", os.path.basename(os.path.normpath(ref.path)))
  )
  title = f"{ref.path} on {os.path.basename(fv.data)}"
  paths = idep.write_report(records, summary, out, spec=spec, title=title)
  shown = ("dependency", "sparsity", "ground_truth")
  print(json.dumps({k: summary[k] for k in shown if k in summary}, indent=2))
  print("open", paths["index"])
  return 0


if __name__ == "__main__":
  sys.exit(main())
