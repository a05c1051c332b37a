"""The ground-truth check of the dependency signal on the checkpoints of finished runs.

    python experiments/chain_pgpo/dependency.py experiments/chain_pgpo/runs [--arms pgpo dapo] [--seeds 0 1 2]

For each run dir `<arm>_s<seed>` with a DONE marker and each of its checkpoints (plus the seed's cached
warm-up, as step 0), scores held-out chain prompts two ways with `tools.inspect_dependency`:
`solution` (the worked solutions, teacher-forced; labels exact) and `sample` (one greedy response
each, labelled by `chain.label_response`). Writes `<run>/dependency.json`:
{mode: {step: summary["ground_truth"]}} (AUC / precision of S, ω̃ and the baselines for perception
tokens, S and ω̃ per label; `tools/label_metrics.py`). The arm's own τ, β and cap give ω̃ (for GRPO and
DAPO, the paper's τ 0.4, β 2: what PGPO would weight on that policy). Resumable: finished
(run, step, mode) entries are kept.
"""

import argparse
import glob
import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import config as exp_config  # noqa: E402  (the experiment's arm table)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("runs")
  ap.add_argument("--arms", nargs="*", default=None, help="default: every arm")
  ap.add_argument("--seeds", nargs="*", type=int, default=None, help="default: every seed")
  ap.add_argument("--n", type=int, default=128, help="held-out prompts per (checkpoint, mode)")
  a = ap.parse_args()
  from pgpo_jax import evaluation as ev
  from pgpo_jax.tools import inspect_dependency as idep

  spec = idep.dataset_spec(os.path.join(a.runs, "data", "test.parquet"))
  processor = os.path.join(a.runs, "data", "model")
  for run in sorted(glob.glob(os.path.join(a.runs, "*_s*"))):
    arm, seed = os.path.basename(run).rsplit("_s", 1)
    if arm == "warmup" or not os.path.exists(os.path.join(run, "DONE")):
      continue
    if (a.arms and arm not in a.arms) or (a.seeds and int(seed) not in a.seeds):
      continue
    c = exp_config.get_config(arm)
    out_path = os.path.join(run, "dependency.json")
    done = json.load(open(out_path)) if os.path.exists(out_path) else {}
    warm = os.path.join(a.runs, f"warmup_s{seed}")
    if not os.path.exists(os.path.join(warm, "config.json")):  # the cache holds params only
      shutil.copy(os.path.join(run, "config.json"), os.path.join(warm, "config.json"))
    ckpts = {0: warm}
    for d in glob.glob(os.path.join(run, "checkpoints", "*")):
      if os.path.basename(d).isdigit():
        ckpts[int(os.path.basename(d))] = d
    for step, path in sorted(ckpts.items()):
      for mode in ("solution", "sample"):
        if str(step) in done.get(mode, {}):
          continue
        cfg = idep.InspectConfig(
          n=a.n,
          temperature=0.0,
          max_new_tokens=c.rollout.max_new_tokens,
          tau=c.pgpo.tau,
          beta=c.pgpo.beta,
          responses=mode,
          labeler="chain",
        )
        policy = ev.load_policy(path, dtype="float32", processor_dir=processor)
        records = idep.inspect(policy, spec, cfg, progress=False)
        gt = idep.summarize(records, cfg).get("ground_truth", {})
        if c.pgpo.max_weight is not None:  # the cap is applied after ω̃ (docs/method.md §3)
          gt["note"] = f"omega uncapped here; the arm caps it at {c.pgpo.max_weight}"
        gt["accuracy"] = sum(r.accuracy for r in records) / max(len(records), 1)
        done.setdefault(mode, {})[str(step)] = gt
        with open(out_path + ".tmp", "w") as f:
          json.dump(done, f, indent=1)
        os.replace(out_path + ".tmp", out_path)
        s = gt.get("scorers", {}).get("S", {})
        print(
          f"{os.path.basename(run)} step {step} {mode}: AUC(S) {s.get('auc_pooled')}", flush=True
        )


if __name__ == "__main__":
  main()
