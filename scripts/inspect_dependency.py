"""Token visual dependency S and PGPO weights of a checkpoint's responses: HTML pages, plots, JSON.

    python scripts/inspect_dependency.py --ckpt runs/pgpo_3b --data data/mathverse.parquet --n 20 --out insp/
    python scripts/inspect_dependency.py --ckpt runs/demo --data demo_data/test.parquet --greedy --tau 0.4 --beta 2.0

Samples one response per prompt, scores it with the trainer's two-view pass (image / visual tokens
masked), computes ω̃ (docs/method.md §3) and writes index.html, response_NNN.html, dependency_hist.png,
weights_hist.png, dependency_by_category.png, sparsity.png, summary.json and tokens.jsonl to --out
(default WORKDIR/inspect/step<N>, or inspect/<name>). Details: pgpo_jax/inspect_dependency.py.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ckpt", required=True)
  p.add_argument("--data", required=True, help="one data file (parquet / JSON lines) with images")
  p.add_argument("--n", type=int, default=20, help="responses (one per prompt)")
  p.add_argument("--tau", type=float, default=0.4)
  p.add_argument("--beta", type=float, default=2.0)
  p.add_argument("--threshold_mode", default="absolute", choices=("absolute", "quantile"))
  p.add_argument("--estimator", default="k3", choices=("k3", "full_kl"))
  p.add_argument("--clamp_log_ratio", type=float, default=None)
  p.add_argument("--mask_vision_markers", action="store_true")
  p.add_argument("--thresholds", default="0.001,0.01,0.1,1", help="S levels of the sparsity statistics")
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--top_k", type=int, default=0)
  p.add_argument("--greedy", action="store_true")
  p.add_argument("--max_new_tokens", type=int, default=2048)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--chunk_size", type=int, default=256, help="scoring chunk (tokens) of the vocabulary pass")
  p.add_argument("--max_prompt_length", type=int, default=4096)
  p.add_argument("--min_pixels", type=int, default=None)
  p.add_argument("--max_pixels", type=int, default=None)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dtype", default="float32", help="float32 (default: exact S) | bfloat16")
  p.add_argument("--mesh", default="")
  p.add_argument("--processor", default=None)
  p.add_argument("--question_key", default=None)
  p.add_argument("--answer_key", default=None)
  p.add_argument("--image_key", default=None)
  p.add_argument("--image_dir", default=None)
  p.add_argument("--out", default=None)
  p.add_argument("--no_progress", action="store_true")
  a = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "orbax", "grain", "jax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)

  from pgpo_jax import evaluation as ev
  from pgpo_jax.tools import inspect_dependency as idep
  try:
    cfg = idep.InspectConfig(
        n=a.n, temperature=0.0 if a.greedy else a.temperature, top_p=a.top_p, top_k=a.top_k,
        max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, tau=a.tau, beta=a.beta,
        threshold_mode=a.threshold_mode, estimator=a.estimator, clamp_log_ratio=a.clamp_log_ratio,
        mask_vision_markers=a.mask_vision_markers, chunk_size=a.chunk_size,
        thresholds=tuple(float(t) for t in a.thresholds.split(",") if t.strip()),
        max_prompt_length=a.max_prompt_length, min_pixels=a.min_pixels, max_pixels=a.max_pixels, seed=a.seed)
    spec = idep.dataset_spec(a.data, question_key=a.question_key, answer_key=a.answer_key, image_key=a.image_key,
                             image_dir=a.image_dir)
    policy = ev.load_policy(a.ckpt, dtype=a.dtype, mesh=ev.make_eval_mesh(a.mesh), processor_dir=a.processor,
                            min_pixels=a.min_pixels, max_pixels=a.max_pixels)
  except (ValueError, FileNotFoundError, NotImplementedError) as e:
    print(f"inspect_dependency: error: {e}", file=sys.stderr)
    return 2
  records = idep.inspect(policy, spec, cfg, progress=not a.no_progress)
  summary = idep.summarize(records, cfg)
  ref = policy.ref
  out = a.out or (os.path.join(ref.workdir, "inspect", f"step{ref.step}") if ref.workdir else
                  os.path.join("inspect", os.path.basename(os.path.normpath(ref.path))))
  title = f"{ref.path} on {os.path.basename(a.data)}"
  paths = idep.write_report(records, summary, out, spec=spec, title=title)
  print(json.dumps({"dependency": summary["dependency"], "sparsity": summary["sparsity"]}, indent=2))
  print("open", paths["index"])
  return 0


if __name__ == "__main__":
  sys.exit(main())
