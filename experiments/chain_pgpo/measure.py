"""What a chain-task checkpoint perceives and where its dependency signal lands (one JSON).

`measure(ckpt, c, n)` scores the first `n` held-out prompts of `c.data.eval_files` two ways with
`tools.inspect_dependency`: `sample` (the policy's greedy responses, labelled by `chain.label_response`)
and `solution` (the worked solutions teacher-forced; exact labels). For `sample` it adds the final-answer
accuracy, the format reward and the perception-token accuracy (`chain.perception_accuracy`: the image
facts stated right, against the worked solution of the same row); for both, the ground-truth report of
`tools/label_metrics.py` (AUC / precision@R of S, ω̃ and the baselines; S and ω̃ per label), at the
config's τ, β and threshold mode; optionally the candidate signals' report (`tools/signals.py`).
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
from pgpo_jax.tools import signals as signals_lib


def fact_kind(key: str) -> str:
  """The kind of image fact a `chain.perception_facts` key states."""
  if key.startswith("The number drawn"):
    return "digit"
  if key.startswith("The largest"):
    return "largest_colour"
  if key.startswith("Is "):
    return "relation"
  if key.endswith("shapes in all."):
    return "count_all"
  return "count_colour" if key.endswith(" shapes.") else "count_kind"


def perception_summary(records, solutions: dict[str, list[str]]) -> dict[str, Any]:
  """Perception-token accuracy of sampled records: facts right / facts asked, pooled and by kind of
  fact, plus the share of responses with every fact right. `solutions`: {abs path of a data file: its
  solution column}."""
  right = total = all_right = 0
  kinds: dict[str, list[int]] = {}
  for r in records:
    sol = solutions[os.path.abspath(r.source)][r.row_index]
    k, m = chain.perception_accuracy(r.response, sol)
    right, total, all_right = right + k, total + m, all_right + (k == m)
    said = chain.perception_facts(r.response)
    for key, value in chain.perception_facts(sol).items():
      kinds.setdefault(fact_kind(key), []).append(int(said.get(key) == value))
  return {
    "perception_accuracy": right / total if total else None,
    "all_facts_right": all_right / len(records) if records else None,
    "facts": total,
    "perception_by_kind": {
      k: {"accuracy": float(np.mean(v)), "n": len(v)} for k, v in kinds.items()
    },
  }


def measure(
  ckpt: str, c: ml_collections.ConfigDict, n: int = 256, signals: bool = False
) -> dict[str, Any]:
  """The JSON for checkpoint `ckpt` of an arm with config `c` (module docstring); `signals` adds the
  candidate signals of `tools/signals.py` (two partial blind views and the full KL: ~2x the cost)."""
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
      partial_views=2 if signals else 0,
      full_kl_too=signals,
    )
    records = idep.inspect(policy, spec, cfg, progress=False)
    res = label_metrics.ground_truth_report(records)
    if signals:
      res["signals"] = signals_lib.signal_report(records, tau=c.pgpo.tau, beta=c.pgpo.beta)
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
    "perception_by_kind": {k: round(v["accuracy"], 3) for k, v in s["perception_by_kind"].items()},
    **{
      f"{mode}/{name}": {"auc": sc(res, name, "auc_pooled"), "p@R": sc(res, name, "precision_at_r")}
      for mode, res in (("sample", s), ("solution", f))
      for name in ("S", "omega", "entropy", "surprisal_image")
    },
    "solution/share_of_omega_perception": share(f, "perception", "share_of_omega"),
    "solution/share_of_tokens_perception": share(f, "perception", "share_of_tokens"),
    "solution/mean_S": {k: share(f, k, "mean_S") for k in chain.LABELS},
  }
