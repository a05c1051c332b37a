"""Tables and plots of the chain-task experiment (reads every run's metrics.jsonl and dependency.json).

    python experiments/chain_pgpo/aggregate.py experiments/chain_pgpo/runs --out experiments/chain_pgpo

Writes results.json, results.md and plots/: per arm, held-out greedy accuracy at the end (mean ± 95% CI
over seeds), the paired per-seed differences PGPO − DAPO and PGPO − GRPO with their CI, training
reward, format reward and entropy early and late (the late-instability question), gradient-norm
variance, seconds per step; the dependency check (AUC and precision of S, ω̃ and baselines; ω̃ mass
per label) per checkpoint. Only runs with a DONE marker count.
"""

import argparse
import collections
import glob
import json
import os

import numpy as np

from pgpo_jax.tools import seed_stats

LATE = 20  # steps in the "early" and "late" windows


def load(run):
  with open(os.path.join(run, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def run_stats(rows):
  ev = [(r["step"], r["eval/accuracy"]) for r in rows if r.get("eval/accuracy") is not None]
  train = [r for r in rows if "reward/overall" in r]

  def window(key, sl):
    vals = [r[key] for r in train[sl] if r.get(key) is not None]
    return float(np.mean(vals)) if vals else float("nan")

  gn = [r["train/grad_norm"] for r in train if r.get("train/grad_norm") is not None]
  return {
    "eval_start": ev[0][1] if ev else float("nan"),
    "eval_end": ev[-1][1] if ev else float("nan"),
    "eval_best": max(v for _, v in ev) if ev else float("nan"),
    "reward_early": window("reward/overall", slice(0, LATE)),
    "reward_late": window("reward/overall", slice(-LATE, None)),
    "format_early": window("reward/format", slice(0, LATE)),
    "format_late": window("reward/format", slice(-LATE, None)),
    "entropy_early": window("entropy/scoring", slice(0, LATE)),
    "entropy_late": window("entropy/scoring", slice(-LATE, None)),
    "grad_norm_var": float(np.var(gn)) if gn else float("nan"),
    "sum_omega_sq_late": window("pgpo/mean_sq_weight", slice(-LATE, None)),
    **{
      f"eval_q{i}": v for i, (_, v) in enumerate(ev)
    },  # greedy accuracy at each quarter (q0: start)
    # median: the first step of a run (and of a resumed run) includes compilation
    "sec_per_step": float(np.median([r["time/step"] for r in train if "time/step" in r]))
    if train
    else float("nan"),
  }


KEYS = [
  "eval_start",
  "eval_end",
  "eval_best",
  "reward_early",
  "reward_late",
  "format_early",
  "format_late",
  "entropy_early",
  "entropy_late",
  "grad_norm_var",
  "sum_omega_sq_late",
  "sec_per_step",
]
QUARTERS = ["eval_q0", "eval_q1", "eval_q2", "eval_q3", "eval_q4"]
PAIRS = (
  ("pgpo", "dapo"),
  ("pgpo_dev", "dapo"),
  ("pgpo", "pgpo_dev"),
  ("dapo", "grpo"),
  ("pgpo", "grpo"),
  ("pgpo_tau0", "dapo"),
  ("pgpo_tau1", "dapo"),
  ("pgpo_norenorm", "dapo"),
)


def fmt(ci):
  if ci["mean"] is None:
    return "-"
  return f"{ci['mean']:.3f}" + (f" ± {ci['ci95']:.3f}" if ci["ci95"] is not None else "")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("runs")
  ap.add_argument("--out", required=True)
  a = ap.parse_args()
  per_arm = collections.defaultdict(dict)  # arm -> seed -> stats
  dirs = {}
  for run in sorted(glob.glob(os.path.join(a.runs, "*_s*"))):
    arm, seed = os.path.basename(run).rsplit("_s", 1)
    if arm == "warmup" or not os.path.exists(os.path.join(run, "DONE")):
      continue
    per_arm[arm][int(seed)] = run_stats(load(run))
    dirs[(arm, int(seed))] = run
  commits_file = os.path.join(a.runs, "COMMITS")
  commits = sorted(set(open(commits_file).read().split())) if os.path.exists(commits_file) else []
  results = {"commits": commits, "arms": {}, "paired": {}, "dependency": {}}
  lines = [
    f"Runs made at commit(s) {', '.join(c[:10] for c in commits) or 'unknown'}.",
    "",
    "| arm | seeds | " + " | ".join(KEYS) + " |",
    "|---|---|" + "---|" * len(KEYS),
  ]
  for arm, seeds in sorted(per_arm.items()):
    cis = {k: seed_stats.mean_ci([s[k] for s in seeds.values() if k in s]) for k in KEYS + QUARTERS}
    results["arms"][arm] = {"seeds": sorted(seeds), **cis}
    lines.append(f"| {arm} | {len(seeds)} | " + " | ".join(fmt(cis[k]) for k in KEYS) + " |")
  lines += ["", "| arm | " + " | ".join(QUARTERS) + " |", "|---|" + "---|" * len(QUARTERS)]
  for arm in sorted(results["arms"]):
    lines.append(f"| {arm} | " + " | ".join(fmt(results["arms"][arm][k]) for k in QUARTERS) + " |")
  lines += [
    "",
    "| paired difference (eval_end) | seeds | mean ± 95% CI | per seed |",
    "|---|---|---|---|",
  ]
  for x, y in PAIRS:
    if x in per_arm and y in per_arm:
      d = seed_stats.paired_diff(
        {s: v["eval_end"] for s, v in per_arm[x].items()},
        {s: v["eval_end"] for s, v in per_arm[y].items()},
      )
      results["paired"][f"{x}-{y}"] = d
      per_seed = ", ".join(f"s{s}: {v:+.3f}" for s, v in d["per_seed"].items())
      lines.append(f"| {x} − {y} | {d['n']} | {fmt(d)} | {per_seed} |")
  # The dependency check: mean over seeds of each scorer's AUC / precision and ω̃ share per label.
  dep_lines = [
    "",
    "| arm | mode | step | AUC S | AUC ω̃ | AUC entropy | AUC −log πI | AUC −log π∅ | p@R S | p@R ω̃ "
    "| p@R uniform | ω̃ share perception / reasoning / format |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for arm in sorted(per_arm):
    acc = collections.defaultdict(lambda: collections.defaultdict(list))
    for seed in per_arm[arm]:
      path = os.path.join(dirs[(arm, seed)], "dependency.json")
      if not os.path.exists(path):
        continue
      with open(path) as f:
        dep = json.load(f)
      for step, res in dep.items():
        for mode in ("sample", "solution"):
          gt = res.get(mode, {})
          if "scorers" not in gt:
            continue
          if mode == "sample":
            acc[(mode, int(step))]["perception_accuracy"].append(gt.get("perception_accuracy"))
          for name, sig in gt.get("signals", {}).items():
            if isinstance(sig, dict):
              acc[(mode, int(step))][f"signal {name} auc"].append(sig["auc"])
              acc[(mode, int(step))][f"signal {name} p@R"].append(sig["precision_at_r"])
              acc[(mode, int(step))][f"signal {name} omega share perception"].append(
                sig["share_of_omega"]["perception"]
              )
          sc, bl = gt["scorers"], gt["by_label"]
          acc[(mode, int(step))]["S"].append(sc["S"]["auc_pooled"])
          acc[(mode, int(step))]["omega"].append(sc["omega"]["auc_pooled"])
          acc[(mode, int(step))]["entropy"].append(sc["entropy"]["auc_pooled"])
          acc[(mode, int(step))]["surprisal_image"].append(sc["surprisal_image"]["auc_pooled"])
          acc[(mode, int(step))]["surprisal_blind"].append(sc["surprisal_blind"]["auc_pooled"])
          for name in ("S", "omega", "uniform"):
            acc[(mode, int(step))][f"p@R {name}"].append(sc[name]["precision_at_r"])
          for lab in ("perception", "reasoning", "format"):
            acc[(mode, int(step))][f"omega_share_{lab}"].append(bl[lab]["share_of_omega"])
    out = {}
    for (mode, step), vals in sorted(acc.items()):
      cis = {k: seed_stats.mean_ci([v for v in vs if v is not None]) for k, vs in vals.items()}
      out.setdefault(mode, {})[step] = cis
      m = lambda k: f"{cis[k]['mean']:.3f}" if cis[k]["mean"] is not None else "-"  # noqa: E731
      shares = " / ".join(m(f"omega_share_{lab}") for lab in ("perception", "reasoning", "format"))
      dep_lines.append(
        f"| {arm} | {mode} | {step} | {m('S')} | {m('omega')} | {m('entropy')} | "
        f"{m('surprisal_image')} | {m('surprisal_blind')} | {m('p@R S')} | {m('p@R omega')} | "
        f"{m('p@R uniform')} | {shares} |"
      )
    if out:
      results["dependency"][arm] = out
  table = "\n".join(lines + (dep_lines if results["dependency"] else []))
  print(table)
  os.makedirs(a.out, exist_ok=True)
  with open(os.path.join(a.out, "results.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(a.out, "results.json"), "w") as f:
    json.dump(results, f, indent=2, default=float)
  try:
    from pgpo_jax.tools import plotting

    main_arms = [
      (f"{arm}_s{s}", d)
      for (arm, s), d in sorted(dirs.items())
      if arm in ("dapo", "pgpo", "pgpo_dev")
    ]
    plotting.plot_runs(main_arms, os.path.join(a.out, "plots"))
  except ImportError as e:  # the `plot` extra
    print(f"no plots ({e})")


if __name__ == "__main__":
  main()
