"""Table + plots of the synthetic PGPO-vs-DAPO-vs-GRPO runs (reads each run's metrics.jsonl)."""

import argparse
import collections
import glob
import json
import os

import numpy as np


def load(path):
  with open(os.path.join(path, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f if l.strip()]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("runs")
  ap.add_argument("--out", required=True)
  a = ap.parse_args()
  by_method = collections.defaultdict(list)
  for d in sorted(glob.glob(os.path.join(a.runs, "*_s*"))):
    if os.path.isdir(d) and os.path.exists(os.path.join(d, "metrics.jsonl")):
      by_method[os.path.basename(d).rsplit("_s", 1)[0]].append(d)
  rows = []
  for method, dirs in sorted(by_method.items()):
    stats = collections.defaultdict(list)
    for d in dirs:
      m = load(d)
      ev = [(r["step"], r["eval/accuracy"]) for r in m if r.get("eval/accuracy") is not None]
      train = [r for r in m if "reward/overall" in r]
      stats["eval_start"].append(ev[0][1])
      stats["eval_end"].append(ev[-1][1])
      stats["eval_best"].append(max(v for _, v in ev))
      stats["reward_first10"].append(np.mean([r["reward/overall"] for r in train[:10]]))
      stats["reward_last10"].append(np.mean([r["reward/overall"] for r in train[-10:]]))
      gn = [r["train/grad_norm"] for r in train if r.get("train/grad_norm") is not None]
      stats["grad_norm_var"].append(float(np.var(gn)) if gn else float("nan"))
      ent = [r["entropy/scoring"] for r in train if r.get("entropy/scoring") is not None]
      stats["entropy_first10"].append(np.mean(ent[:10]) if ent else float("nan"))
      stats["entropy_last10"].append(np.mean(ent[-10:]) if ent else float("nan"))
      stats["sec_per_step"].append(np.mean([r["time/step"] for r in train if "time/step" in r]))
    rows.append(
      (method, len(dirs), {k: (float(np.mean(v)), float(np.std(v))) for k, v in stats.items()})
    )
  keys = [
    "eval_start",
    "eval_end",
    "eval_best",
    "reward_first10",
    "reward_last10",
    "grad_norm_var",
    "entropy_first10",
    "entropy_last10",
    "sec_per_step",
  ]
  lines = ["| method | seeds | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
  for method, n, st in rows:
    lines.append(
      f"| {method} | {n} | " + " | ".join(f"{st[k][0]:.3f} ± {st[k][1]:.3f}" for k in keys) + " |"
    )
  table = "\n".join(lines)
  print(table)
  with open(os.path.join(a.out, "results.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(a.out, "results.json"), "w") as f:
    json.dump(
      {
        m: {"seeds": n, **{k: {"mean": v[0], "std": v[1]} for k, v in st.items()}}
        for m, n, st in rows
      },
      f,
      indent=2,
    )
  try:
    from pgpo_jax.tools import plotting

    runs = [(os.path.basename(d), d) for ds in by_method.values() for d in ds]
    plotting.plot_runs(runs, os.path.join(a.out, "plots"))
  except Exception as e:  # plots are a convenience; the table is the result
    print("plots skipped:", e)


if __name__ == "__main__":
  main()
