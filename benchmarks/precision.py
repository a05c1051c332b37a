"""bfloat16 compute vs float32 compute on the same model (float32 master weights in both), CPU.

    .venv/bin/python benchmarks/precision.py [--batch 4 --seq 256 --hidden 512 --layers 4 --repeats 5]

Forward (logits of a text batch) and one update (value_and_grad of the token NLL + AdamW, the
trainer's `train_step`), each jitted, median over `repeats` after one compile-and-warm-up call.
Prints a table and writes benchmarks/results/precision.json, with the max logit difference between
the two. Numbers are only comparable within one run; on CPU, bfloat16 matmuls are not the native
fast path they are on TPU/GPU, so this measures cost and accuracy here, not accelerator speed-ups.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from pgpo_jax import train_step as ts  # noqa: E402
from pgpo_jax.models import qwen2_5_vl as qwen  # noqa: E402


def _nll(model, batch):
  h = qwen.hidden_states(
    model, batch["ids"][:, :-1], batch["pos"][:, :, :-1], batch["mask"][:, :-1]
  )
  logp = jax.nn.log_softmax(qwen.logits_from_hidden(model, h), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, batch["ids"][:, 1:, None], axis=-1)), {}


def _time(fn, repeats: int) -> tuple[float, float]:
  """(first call incl. compile, median of the next `repeats`) in seconds."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--hidden", type=int, default=512)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument(
    "--out", default=str(pathlib.Path(__file__).parent / "results" / "precision.json")
  )
  a = ap.parse_args()
  heads = a.hidden // 64
  cfg = qwen.tiny_config(
    vocab_size=4096,
    hidden_size=a.hidden,
    intermediate_size=4 * a.hidden,
    num_hidden_layers=a.layers,
    num_attention_heads=heads,
    num_key_value_heads=max(1, heads // 4),
    head_dim=64,
    mrope_section=(8, 12, 12),
    remat_policy="none",
  )
  rng = np.random.default_rng(0)
  B, T = a.batch, a.seq
  batch = {
    "ids": rng.integers(10, 4000, (B, T)).astype(np.int32),
    "pos": np.broadcast_to(np.arange(T, dtype=np.int32)[None, None], (3, B, T)).copy(),
    "mask": np.ones((B, T), bool),
  }
  rows, logits = [], {}
  for compute in ("float32", "bfloat16"):
    model = qwen.init_model(
      cfg, compute, seed=0, param_dtype="float32"
    )  # same float32 weights in both
    opt = ts.make_optimizer(1e-6)
    graphdef, state = ts.init_train_state(model, opt)

    def forward(params, b, graphdef=graphdef):
      m = nnx.merge(graphdef, params)
      return qwen.logits_from_hidden(m, qwen.hidden_states(m, b["ids"], b["pos"], b["mask"]))

    fwd = jax.jit(forward)
    step = ts.make_train_step(graphdef, _nll, opt, donate=False)
    f_first, f_med = _time(lambda: fwd(state.params, batch), a.repeats)
    u_first, u_med = _time(lambda: step(state, batch)[1]["loss"], a.repeats)
    logits[compute] = np.asarray(fwd(state.params, batch))
    rows.append(
      dict(
        compute_dtype=compute,
        param_dtype="float32",
        forward_s=f_med,
        update_s=u_med,
        forward_first_call_s=f_first,
        update_first_call_s=u_first,
        tokens_per_s_forward=B * T / f_med,
        tokens_per_s_update=B * T / u_med,
      )
    )
  diff = float(np.abs(logits["bfloat16"] - logits["float32"]).max())
  rel = diff / float(logits["float32"].std())
  print(
    f"model: text decoder hidden {a.hidden}, {a.layers} layers, vocab 4096 "
    f"({qwen.count_params(qwen.abstract_model(cfg)) / 1e6:.1f}M params, float32 masters); batch {B} x {T} tokens; "
    f"{jax.device_count()} CPU device(s), {os.cpu_count()} cores"
  )
  print(f"{'compute':>9} {'forward s':>10} {'update s':>9} {'fwd tok/s':>10} {'upd tok/s':>10}")
  for r in rows:
    print(
      f"{r['compute_dtype']:>9} {r['forward_s']:10.4f} {r['update_s']:9.4f} "
      f"{r['tokens_per_s_forward']:10.0f} {r['tokens_per_s_update']:10.0f}"
    )
  f32, b16 = rows
  print(
    f"bf16/f32 time: forward {b16['forward_s'] / f32['forward_s']:.2f}x, update {b16['update_s'] / f32['update_s']:.2f}x; "
    f"max |logit diff| {diff:.4f} ({rel:.4f} of the logits' std)"
  )
  out = dict(
    args=vars(a),
    rows=rows,
    max_abs_logit_diff=diff,
    max_logit_diff_over_std=rel,
    jax_version=jax.__version__,
    backend=jax.default_backend(),
  )
  pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(a.out).write_text(json.dumps(out, indent=2))
  print(f"wrote {a.out}")


if __name__ == "__main__":
  main()
