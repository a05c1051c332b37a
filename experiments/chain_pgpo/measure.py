"""What a chain-task checkpoint perceives and where its dependency signal lands (one JSON).

`measure(ckpt, c, n)` scores the first `n` held-out prompts of `c.data.eval_files` two ways with
`tools.inspect_dependency`: `sample` (the policy's greedy responses, labelled by `chain.label_response`)
and `solution` (the worked solutions teacher-forced; exact labels). For `sample` it adds the final-answer
accuracy, the format reward and the perception-token accuracy (`chain.perception_accuracy`: the image
facts stated right, against the worked solution of the same row); for both, the ground-truth report of
`tools/label_metrics.py` (AUC / precision@R of S, ω̃ and the baselines; S and ω̃ per label), at the
config's τ, β and threshold mode.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np

from pgpo_jax import evaluation as ev
from pgpo_jax.data.reader import DatasetReader, read_column
from pgpo_jax.demo_task import chain
from pgpo_jax.tools import inspect_dependency as idep
from pgpo_jax.tools import label_metrics


def perception_summary(records, solutions: dict[str, list[str]]) -> dict[str, Any]:
  """Perception-token accuracy of sampled records: facts right / facts asked, pooled, plus the share of
  responses with every fact right. `solutions`: {abs path of a data file: its solution column}."""
  right = total = all_right = 0
  for r in records:
    k, m = chain.perception_accuracy(r.response, solutions[os.path.abspath(r.source)][r.row_index])
    right, total, all_right = right + k, total + m, all_right + (k == m)
  return {
    "perception_accuracy": right / total if total else None,
    "all_facts_right": all_right / len(records) if records else None,
    "facts": total,
  }


def measure(ckpt: str, c: ml_collections.ConfigDict, n: int = 256) -> dict[str, Any]:
  policy = ev.load_policy(ckpt, dtype="float32", processor_dir=c.data.processor_dir)
  spec = idep.dataset_spec(c.data.eval_files)
  solutions = {
    os.path.abspath(p): read_column(p, "solution", what="chain solutions")
    for p in DatasetReader(spec).files
  }
  out: dict[str, Any] = {"checkpoint": os.path.abspath(ckpt), "n": n}
  for mode in ("sample", "solution"):
    cfg = idep.InspectConfig(
      n=n,
      temperature=0.0,
      max_new_tokens=c.rollout.max_new_tokens,
      tau=c.pgpo.tau,
      beta=c.pgpo.beta,
      threshold_mode=c.pgpo.threshold_mode,
      responses=mode,
      labeler="chain",
    )
    records = idep.inspect(policy, spec, cfg, progress=False)
    res = label_metrics.ground_truth_report(records)
    if mode == "sample":
      res["accuracy"] = float(np.mean([r.accuracy for r in records]))
      res["format"] = float(np.mean([r.format for r in records]))
      res.update(perception_summary(records, solutions))
    out[mode] = res
  return out


def headline(out: dict[str, Any]) -> dict[str, Any]:
  """The few numbers that decide the set-up."""
  s, f = out["sample"], out["solution"]

  def sc(res, name, key):
    v = res.get("scorers", {}).get(name, {}).get(key)
    return None if v is None else round(v, 3)

  def share(res, label, key):
    v = res.get("by_label", {}).get(label, {}).get(key)
    return None if v is None else round(v, 4)

  return {
    "accuracy": round(s["accuracy"], 3),
    "format": round(s["format"], 3),
    "perception_accuracy": s["perception_accuracy"],
    "all_facts_right": s["all_facts_right"],
    **{
      f"{mode}/{name}": {"auc": sc(res, name, "auc_pooled"), "p@R": sc(res, name, "precision_at_r")}
      for mode, res in (("sample", s), ("solution", f))
      for name in ("S", "omega", "entropy", "surprisal_image")
    },
    "solution/share_of_omega_perception": share(f, "perception", "share_of_omega"),
    "solution/share_of_tokens_perception": share(f, "perception", "share_of_tokens"),
    "solution/mean_S": {k: share(f, k, "mean_S") for k in chain.LABELS},
  }
