"""Forward latency: our jitted Flax Qwen2.5-VL vs HF PyTorch eager, same small random model, CPU.

    .venv/bin/python benchmarks/forward.py [--batch 4 --text 512 --image 448 --repeats 5]

Prints a table and writes benchmarks/results/forward.json. Two like-for-like comparisons in one
run: float32 vs float32 (the headline), and bfloat16 compute (ours: float32 parameters cast to
bfloat16 where used; HF: the model in bfloat16) vs bfloat16. The JAX times exclude compilation
(reported separately). PyTorch runs at 1 and at 2 threads and the faster one is compared. Each
framework's matmul rate at the decoder MLP's shape (ours: the faster of `layers.dot` and a plain
`jnp.dot`) turns the forward's matmul FLOPs (counted from the config) into a floor: the time with
nothing but matmuls, and the speed-up over HF's measured time that it caps ours at. Runs
alternate (ours, torch@1, torch@2, ours, ...) so that load from other processes on a shared machine
falls on all of them alike; times are medians. Numbers are only comparable within one run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402
from hf_models import forward_flops, hf_config  # noqa: E402  (benchmarks/, run as a script)

from pgpo_jax.models import qwen2_5_vl as qwen  # noqa: E402
from pgpo_jax.models.qwen2_5_vl import layers  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--text", type=int, default=512)
  ap.add_argument("--image", type=int, default=448)
  ap.add_argument("--hidden", type=int, default=512)
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "forward.json"))
  a = ap.parse_args()
  from transformers import Qwen2_5_VLForConditionalGeneration

  torch.manual_seed(0)
  hf = Qwen2_5_VLForConditionalGeneration(
    hf_config(
      a.hidden, a.layers, kv_groups=4, vision_depth=4, vision_hidden=256, vision_full_layers=(3,)
    )
  ).eval()
  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    models = {
      "f32": qwen.from_pretrained(d),
      "bf16": qwen.from_pretrained(d, "bfloat16", param_dtype="float32"),
    }
  hfs = {"f32": hf, "bf16": copy.deepcopy(hf).to(torch.bfloat16)}
  g = a.image // 14
  grids = np.array([[1, g, g]] * a.batch)
  n_img = g * g // 4
  rng = np.random.default_rng(0)
  rows = []
  for _ in range(a.batch):
    text = list(rng.integers(10, 3900, a.text))
    rows.append(text[:8] + [4002] + [4000] * n_img + [4003] + text[8:])
  ids = np.array(rows)
  am = np.ones_like(ids)
  pixels = rng.standard_normal((a.batch * g * g, 1176)).astype(np.float32)
  compile_s = {}
  for dt, model in models.items():
    t0 = time.perf_counter()
    jax.block_until_ready(qwen.forward(model, ids, am, pixels, grids))
    compile_s[dt] = time.perf_counter() - t0

  kw = dict(
    input_ids=torch.tensor(ids),
    attention_mask=torch.tensor(am),
    pixel_values=torch.tensor(pixels),
    image_grid_thw=torch.tensor(grids),
    mm_token_type_ids=torch.tensor((ids == 4000).astype(np.int64)),
  )

  def torch_at(threads, fn):
    def run():
      torch.set_num_threads(threads)
      with torch.no_grad():
        fn()

    return run

  # The vision tower alone, on the same images (ours: per-row inputs, as `forward` builds them).
  vin = qwen.prepare_vision_rows(pixels, grids, ids, models["f32"].cfg.vision, 4000)
  gemm_np = (
    rng.standard_normal((ids.size, a.hidden)).astype(np.float32),
    rng.standard_normal((a.hidden, 4 * a.hidden)).astype(np.float32),
  )
  gemm = jax.jit(lambda x, w: layers.dot("td,di->ti", x, w))  # our weight-matmul path
  gemm_plain = jax.jit(jnp.dot)  # in the input dtype (no float32 accumulation): often faster
  flops = forward_flops(hf.config, a.batch, ids.shape[1], tuple(grids[0]))
  gemm_flops = 2 * gemm_np[0].shape[0] * a.hidden * 4 * a.hidden
  fns = {}
  for dt, model in models.items():  # each dtype: ours, HF at 1 and 2 threads; forward, then vision
    graphdef, state = nnx.split(model)
    encode = jax.jit(lambda s, v, g=graphdef: qwen.encode_images(nnx.merge(g, s), v))
    m, h = model, hfs[dt]
    hf_visual = lambda h=h: h.model.visual(
      kw["pixel_values"].to(h.dtype), grid_thw=kw["image_grid_thw"]
    )
    fns[f"{dt}/jax"] = lambda m=m: jax.block_until_ready(qwen.forward(m, ids, am, pixels, grids))
    for n in (1, 2):
      fns[f"{dt}/torch{n}"] = torch_at(n, lambda h=h: h(**kw))
    fns[f"{dt}/jax_vision"] = lambda e=encode, s=state: jax.block_until_ready(e(s, vin))
    for n in (1, 2):
      fns[f"{dt}/torch{n}_vision"] = torch_at(n, hf_visual)
    # Matmul throughput at the decoder MLP's shape, for the floor (the forward's FLOPs at this rate).
    jdt = jnp.bfloat16 if dt == "bf16" else jnp.float32
    ga, gb = (jnp.asarray(x, jdt) for x in gemm_np)
    fns[f"{dt}/jax_gemm"] = lambda a=ga, b=gb: jax.block_until_ready(gemm(a, b))
    fns[f"{dt}/jax_gemm_plain"] = lambda a=ga, b=gb: jax.block_until_ready(gemm_plain(a, b))
    ta, tb = (torch.tensor(x).to(h.dtype) for x in gemm_np)
    for n in (1, 2):
      fns[f"{dt}/torch{n}_gemm"] = torch_at(n, lambda a=ta, b=tb: torch.mm(a, b))
  for fn in fns.values():
    fn()  # warm-up
  times = {k: [] for k in fns}
  for _ in range(a.repeats):
    for k, fn in fns.items():
      t = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - t)
  med = {k: float(np.median(v)) for k, v in times.items()}

  def summary(dt):
    m = {k.split("/")[1]: v for k, v in med.items() if k.startswith(dt + "/")}
    best = min((1, 2), key=lambda n: m[f"torch{n}"])
    best_v = min((1, 2), key=lambda n: m[f"torch{n}_vision"])
    best_g = min((1, 2), key=lambda n: m[f"torch{n}_gemm"])
    # Ours at the faster of its two matmul forms: the floor is the lowest it could be.
    jax_rate = gemm_flops / min(m["jax_gemm"], m["jax_gemm_plain"])
    torch_rate = gemm_flops / m[f"torch{best_g}_gemm"]
    return dict(
      gemm_gflops_jax_dot=gemm_flops / m["jax_gemm"] / 1e9,
      gemm_gflops_jax_plain=gemm_flops / m["jax_gemm_plain"] / 1e9,
      gemm_gflops_jax=jax_rate / 1e9,
      gemm_gflops_torch=torch_rate / 1e9,
      gemm_torch_threads=best_g,
      # The forward's matmul FLOPs at each framework's GEMM rate: its time with nothing else.
      floor_jax_ms=1e3 * flops["total"] / jax_rate,
      floor_hf_torch_ms=1e3 * flops["total"] / torch_rate,
      # The speed-up ours would have over HF's measured time if it did nothing but matmuls.
      speedup_cap=m[f"torch{best}"] / (flops["total"] / jax_rate),
      jax_ms=1e3 * m["jax"],
      hf_torch_ms=1e3 * m[f"torch{best}"],
      speedup_jax_over_hf=m[f"torch{best}"] / m["jax"],
      jax_compile_s=compile_s[dt],
      torch_threads=best,
      hf_torch_ms_by_threads={n: 1e3 * m[f"torch{n}"] for n in (1, 2)},
      vision_jax_ms=1e3 * m["jax_vision"],
      vision_hf_torch_ms=1e3 * m[f"torch{best_v}_vision"],
      vision_hf_torch_ms_by_threads={n: 1e3 * m[f"torch{n}_vision"] for n in (1, 2)},
      vision_torch_threads=best_v,
      speedup_vision=m[f"torch{best_v}_vision"] / m["jax_vision"],
    )

  # The headline is float32 vs float32 (top-level keys); bfloat16 vs bfloat16 sits under "bfloat16".
  res = dict(
    forward_gflop=flops["total"] / 1e9,
    vision_gflop=flops["vision"] / 1e9,
    batch=a.batch,
    seq_len=int(ids.shape[1]),
    image=a.image,
    hidden=a.hidden,
    layers=a.layers,
    **summary("f32"),
    bfloat16=summary("bf16"),
    repeats=a.repeats,
    devices=str(jax.devices()),
    load_avg_1min=os.getloadavg()[0],
  )
  print(f"{'impl':<30}{'forward ms':>12}{'vision tower ms':>17}")
  for dt, r in (("f32", res), ("bf16", res["bfloat16"])):
    print(f"{f'pgpo-jax (jit), {dt}':<30}{r['jax_ms']:>12.1f}{r['vision_jax_ms']:>17.1f}")
    for n in (1, 2):
      fwd, vis = r["hf_torch_ms_by_threads"][n], r["vision_hf_torch_ms_by_threads"][n]
      print(f"{f'HF torch eager, {dt}, {n} thr':<30}{fwd:>12.1f}{vis:>17.1f}")
    print(
      f"{dt}: speed-up (HF at {r['torch_threads']} thread(s) / ours) "
      f"{r['speedup_jax_over_hf']:.2f}x, vision alone (HF at {r['vision_torch_threads']}) "
      f"{r['speedup_vision']:.2f}x   (JAX compile {r['jax_compile_s']:.1f} s)"
    )
    print(
      f"{dt}: GEMM GFLOP/s ours {r['gemm_gflops_jax_dot']:.0f} (layers.dot) / "
      f"{r['gemm_gflops_jax_plain']:.0f} (jnp.dot), torch {r['gemm_gflops_torch']:.0f} "
      f"({r['gemm_torch_threads']} thr); {res['forward_gflop']:.0f} GFLOP of matmuls = floor ours "
      f"{r['floor_jax_ms']:.0f} ms, HF {r['floor_hf_torch_ms']:.0f} ms; speed-up cap "
      f"(HF / our floor) {r['speedup_cap']:.2f}x"
    )
  print(
    f"B={a.batch}, T={ids.shape[1]}, image {a.image}px; load average {res['load_avg_1min']:.1f}"
  )
  pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
  main()
