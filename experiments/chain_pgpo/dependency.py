"""The ground-truth check of the dependency signal on the checkpoints of finished runs.

    python experiments/chain_pgpo/dependency.py experiments/chain_pgpo/runs [--arms pgpo dapo] [--seeds 0 1 2]

For each run dir `<arm>_s<seed>` with a DONE marker and each of its checkpoints (plus the shared
warm-up `runs/warmup`, as step 0), `measure.measure` with the candidate signals: held-out prompts
scored as worked solutions (teacher-forced; exact labels) and as greedy responses (labelled by
`chain.label_response`; accuracy and perception-token accuracy). Writes `<run>/dependency.json`:
{step: measure's JSON}. The arm's own τ, β and threshold mode give ω̃ (for GRPO and DAPO, the
paper's τ 0.4, β 2: what PGPO would weight on that policy). Resumable: finished steps are kept.
"""

import argparse
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import config as exp_config  # noqa: E402  (the experiment's arm table)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("runs")
  ap.add_argument("--arms", nargs="*", default=None, help="default: every arm")
  ap.add_argument("--seeds", nargs="*", type=int, default=None, help="default: every seed")
  ap.add_argument("--n", type=int, default=256, help="held-out prompts per checkpoint")
  a = ap.parse_args()
  import measure

  warm = os.path.join(a.runs, "warmup")
  for run in sorted(glob.glob(os.path.join(a.runs, "*_s*"))):
    arm, seed = os.path.basename(run).rsplit("_s", 1)
    if not os.path.exists(os.path.join(run, "DONE")):
      continue
    if (a.arms and arm not in a.arms) or (a.seeds and int(seed) not in a.seeds):
      continue
    c = exp_config.get_config(arm)
    c.data.eval_files = os.path.join(a.runs, "data", "test.parquet")
    c.data.processor_dir = os.path.join(a.runs, "data", "model")
    out_path = os.path.join(run, "dependency.json")
    done = json.load(open(out_path)) if os.path.exists(out_path) else {}
    ckpts = {0: warm}
    for d in glob.glob(os.path.join(run, "checkpoints", "*")):
      if os.path.basename(d).isdigit():
        ckpts[int(os.path.basename(d))] = d
    for step, path in sorted(ckpts.items()):
      if str(step) in done:
        continue
      res = measure.measure(path, c, n=a.n, signals=True)
      if c.pgpo.max_weight is not None:  # the cap is applied after ω̃ (docs/method.md §3)
        res["note"] = f"omega uncapped here; the arm caps it at {c.pgpo.max_weight}"
      done[str(step)] = res
      with open(out_path + ".tmp", "w") as f:
        json.dump(done, f, indent=1)
      os.replace(out_path + ".tmp", out_path)
      print(f"{os.path.basename(run)} step {step}: {measure.headline(res)}", flush=True)


if __name__ == "__main__":
  main()
