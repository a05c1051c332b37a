"""Scoring pass: memory and time of the chunked two-view pass vs a naive full-logits version, CPU.

    .venv/bin/python benchmarks/scoring.py [--vocab 152064 --seq 2048 --hidden 256 --layers 2]

Rows: (a) `sequences.score_rollout` (two views, chunked lm-head + log-softmax, never [N, T, V]);
(b) the same two views with full [2N, T, V] logits materialised; (c) the image view alone
(`response_logprobs`), to give the blind view's overhead. Peak memory is XLA's compiled
temporary + output size (`memory_analysis`), time is the median of warm runs. Writes
benchmarks/results/scoring.json.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from pgpo_jax.models import qwen2_5_vl as qwen  # noqa: E402
from pgpo_jax.rl import scoring, sequences  # noqa: E402


def naive_scores(model, b):
  """Two views, full logits: what a straightforward port does."""
  x, pos, km, vis = sequences._embed_and_positions(model, b)
  both = lambda a, axis=0: jnp.concatenate([a, a], axis=axis)
  h, _ = model.language_model(both(x), both(pos, 1), jnp.concatenate([km, km & ~vis]), None)
  h = sequences._response_hidden(h, b.prompt_ids.shape[1])
  logits = qwen.logits_from_hidden(model, h)  # [2N, L, V]
  logp = jax.nn.log_softmax(logits, -1)
  n = h.shape[0] // 2
  tgt = b.flat_response[..., None]
  li = jnp.take_along_axis(logp[:n], tgt, -1)[..., 0]
  lb = jnp.take_along_axis(logp[n:], tgt, -1)[..., 0]
  return li, lb, scoring.k3(li, lb, b.flat_response_mask)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--vocab", type=int, default=152064)
  ap.add_argument("--seq", type=int, default=2048)
  ap.add_argument("--hidden", type=int, default=256)
  ap.add_argument("--layers", type=int, default=2)
  ap.add_argument("--group", type=int, default=2)
  ap.add_argument("--chunk", type=int, default=256)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "scoring.json"))
  a = ap.parse_args()
  cfg = qwen.tiny_config(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=2 * a.hidden,
                      num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64, num_key_value_heads=1,
                      head_dim=64, mrope_section=(16, 8, 8), image_token_id=a.vocab - 4,
                      video_token_id=a.vocab - 3, vision_start_token_id=a.vocab - 2,
                      vision_end_token_id=a.vocab - 1, vision_out_hidden_size=a.hidden)
  model = qwen.init_model(cfg, "float32")
  rng = np.random.default_rng(0)
  grids = np.array([[1, 16, 16]])
  n_img = 64
  prompt = [5, cfg.vision_start_token_id] + [cfg.image_token_id] * n_img + [cfg.vision_end_token_id, 7, 8]
  L = a.seq - len(prompt)
  ids = np.array([prompt])
  resp = rng.integers(10, a.vocab - 10, (a.group, L))
  batch = sequences.make_sequence_batch(cfg, ids, np.ones_like(ids), rng.standard_normal((256, 1176)).astype(np.float32),
                                        grids, resp, np.ones_like(resp, bool))
  graphdef, state = nnx.split(model)
  fns = {
      "two views, chunked (ours)": lambda s, b: sequences.score_rollout(nnx.merge(graphdef, s), b, chunk_size=a.chunk),
      "two views, full logits (naive)": lambda s, b: naive_scores(nnx.merge(graphdef, s), b),
      "image view only, chunked": lambda s, b: sequences.response_logprobs(nnx.merge(graphdef, s), b, chunk_size=a.chunk),
  }
  rows = {}
  for name, fn in fns.items():
    jf = jax.jit(fn)
    compiled = jf.lower(state, batch).compile()
    mem = compiled.memory_analysis()
    peak = (mem.temp_size_in_bytes + mem.output_size_in_bytes) / 2**20
    jax.block_until_ready(jf(state, batch))
    ts = []
    for _ in range(a.repeats):
      t = time.perf_counter()
      jax.block_until_ready(jf(state, batch))
      ts.append(time.perf_counter() - t)
    rows[name] = {"peak_mib": peak, "time_s": float(np.median(ts))}
  ours, naive, single = (rows[k] for k in fns)
  res = dict(vocab=a.vocab, seq=a.seq, responses=a.group, hidden=a.hidden, layers=a.layers, chunk=a.chunk,
             rows=rows, memory_saving=naive["peak_mib"] / ours["peak_mib"],
             blind_view_overhead=ours["time_s"] / single["time_s"] - 1)
  print(f"{'pass':<34}{'peak MiB':>10}{'time s':>9}")
  for k, v in rows.items():
    print(f"{k:<34}{v['peak_mib']:>10.0f}{v['time_s']:>9.2f}")
  print(f"memory: naive / ours = {res['memory_saving']:.1f}x; blind-view overhead vs image view alone: "
        f"{100 * res['blind_view_overhead']:+.0f}%  (V={a.vocab}, T={a.seq}, {a.group} responses)")
  pathlib.Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
  main()
