"""Generation throughput, one side-by-side run: `sampler.generate` vs HF `generate` (KV cache, greedy).

    .venv/bin/python benchmarks/rollout.py [--batches 1,8,32 --new_tokens 64 --torch_threads 1,2]

The same small random model on both sides, on CPU. Settings, all timed in this one run:
  ours default   the shipping rollout: float32 master weights sampled through a bfloat16 copy cast in
                 every call, bf16 KV cache, float32 logits (`compute_dtype="bfloat16"`, the config's
                 `rollout.dtype` default)
  ours float32   the same float32 model sampled in float32 (`compute_dtype=None`)
  HF dtype/thr   HF `generate` in float32 and in bfloat16 (the model converted), each at every torch
                 thread count of `--torch_threads`
Ours is compared with HF's FASTEST setting (named in the table; on a small shared CPU box two OpenMP
threads can make HF's decode-sized matmuls slower, and bf16 helps HF's prefill), and like for like:
ours float32 / HF float32 and ours default (bf16) / HF bfloat16, each at HF's best thread count.

Part 1, for each batch size B (one 112x112 image per prompt, prompts of equal length) and each
setting, the best of `--repeats` warm calls, all settings interleaved in every round, of
  t_1 = generate(max_new_tokens=1)   -> time to first token (TTFT: processing, vision, prefill, 1 token)
  t_N = generate(max_new_tokens=N)   -> end-to-end
gives decode throughput = B*(N-1) / (t_N - t_1) generated tokens/s (prefill excluded) and end-to-end
B*N / t_N. Stop tokens are disabled (HF: min_new_tokens=N), so every row generates exactly N tokens.
One block of rounds per torch thread count (switching counts between calls resizes torch's pool and
slows HF down); ours runs in every block and keeps its best. JAX compile time (the first call of each
shape minus a warm call) is reported separately. Greedy token agreement: the fraction of equal
tokens, ours float32 vs HF float32 (must be 1.0) and between the bf16 runs and float32; bf16 may
differ on a random tiny model because its top-2 logits are often nearly tied (the table gives the
float32 top-1 minus top-2 logit margin along the greedy path, and at the first token where the
ours-bf16 path leaves the float32 one), and a single flip changes the rest of that row.

Part 2 (`--skewed W`, 0 = skip): W text prompts whose response lengths are drawn log-normal
(median `--median`, sigma 1, capped at 8x the median; enforced with per-prompt `length_limits`, no
stop token), greedy, through `sampler.generate`, ours default and ours float32:
  all rows     W rows at once (every row waits for the longest response)
  R rows       W/R successive calls of R rows (the same memory as refill)
  R refilled   R rows with slot refill (`decode_rows=R`)
Generated tokens/s = sum of lengths / wall time (best of `--repeats`), and row-steps wasted =
rows x decode steps - (sum of lengths - W) (steps in which a row computed nothing kept).

Prints tables and writes benchmarks/results/rollout.json; numbers compare only within a run.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import pathlib
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from hf_models import IMAGE, VEND, VSTART, hf_config  # noqa: E402  (benchmarks/, run as a script)

from pgpo_jax import sampler  # noqa: E402
from pgpo_jax.models import qwen2_5_vl as qwen  # noqa: E402

LOAD_BEFORE = os.getloadavg()  # 1, 5, 15 min: the machine is shared; recorded with the results


def prompts(batch: int, text: int, grid: int, rng: np.random.Generator):
  n_img = grid * grid // 4
  rows = []
  for _ in range(batch):
    t = list(rng.integers(10, 3900, text))
    rows.append(t[:8] + [VSTART] + [IMAGE] * n_img + [VEND] + t[8:])
  ids = np.array(rows)
  grids = np.array([[1, grid, grid]] * batch)
  pixels = rng.standard_normal((batch * grid * grid, 1176)).astype(np.float32)
  return ids, np.ones_like(ids), pixels, grids


def best_times(fns, repeats: int) -> list[float]:
  """Best-of-`repeats` wall time of each fn, calls interleaved (robust to load from other processes).

  The objects alive now (compiled programs, models) are frozen out of the garbage collector's scans
  first: otherwise full collections triggered inside HF's Python-heavy decode loop walk them all.
  """
  gc.collect()
  gc.freeze()
  best = [float("inf")] * len(fns)
  for _ in range(repeats):
    for i, fn in enumerate(fns):
      t = time.perf_counter()
      fn()
      best[i] = min(best[i], time.perf_counter() - t)
  return best


OURS = {"default": dict(compute_dtype="bfloat16"), "float32": {}}  # ours: setting -> generate kw
HF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batches", default="1,8,32")
  ap.add_argument("--new_tokens", type=int, default=64)
  ap.add_argument(
    "--text", type=int, default=32, help="text tokens per prompt (plus 16 image tokens)"
  )
  ap.add_argument("--hidden", type=int, default=256)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "rollout.json"))
  ap.add_argument("--torch_threads", default="1,2", help="thread counts to try (0 = torch default)")
  ap.add_argument(
    "--skewed", type=int, default=64, help="samples of the length-skewed workload (0 = skip)"
  )
  ap.add_argument(
    "--median", type=int, default=16, help="median response length of the skewed workload"
  )
  ap.add_argument("--rows", type=int, default=16, help="decode rows R of the skewed workload")
  a = ap.parse_args()
  threads = [int(t) for t in a.torch_threads.split(",")]
  from transformers import Qwen2_5_VLForConditionalGeneration

  torch.manual_seed(0)
  hf32 = Qwen2_5_VLForConditionalGeneration(
    hf_config(
      a.hidden, a.layers, kv_groups=2, vision_depth=2, vision_hidden=128, vision_full_layers=(1,)
    )
  ).eval()
  with tempfile.TemporaryDirectory() as d:
    hf32.save_pretrained(d)
    model = qwen.from_pretrained(d)  # float32 masters, as the trainer holds them
  hf_models = {"float32": hf32, "bfloat16": copy.deepcopy(hf32).to(torch.bfloat16)}
  N = a.new_tokens
  grid = 8  # 112x112 px: 64 patches, 16 image tokens
  rows = []
  for B in (int(b) for b in a.batches.split(",")) if a.batches else ():
    rows.append(compare(model, hf_models, B, N, a.text, grid, threads, a.repeats))
    print(f"B={B}: done", flush=True)
  print_tables(rows, a, threads)
  skewed = {s: skewed_workload(model, a, s) for s in OURS} if a.skewed else None
  res = dict(
    config=dict(
      ours_settings={k: v.get("compute_dtype", "float32") for k, v in OURS.items()},
      master_dtype="float32",
      hf_dtypes=list(HF_DTYPES),
      hidden=a.hidden,
      layers=a.layers,
      vocab=4096,
      new_tokens=N,
      image_px=112,
      text_tokens=a.text,
      repeats=a.repeats,
      torch_threads_tried=threads,
      devices=str(jax.devices()),
      load_average_before=list(LOAD_BEFORE),
      load_average_after=list(os.getloadavg()),
    ),
    rows=rows,
    skewed=skewed,
  )
  pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(a.out).write_text(json.dumps(res, indent=2))


def compare(model, hf_models, B, N, text, grid, threads, repeats) -> dict:
  """Part 1 at batch B: every setting of ours and HF, timed interleaved; agreement and margins."""
  ids, am, pixels, grids = prompts(B, text, grid, np.random.default_rng(B))

  def ours(setting, n):
    return sampler.generate(
      model, ids, am, pixels, grids, max_new_tokens=n, eos_token_ids=(), **OURS[setting]
    )

  def hf_kw(dtype):
    return dict(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(am),
      mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)),
      pixel_values=torch.tensor(pixels).to(HF_DTYPES[dtype]),
      image_grid_thw=torch.tensor(grids),
      do_sample=False,
      pad_token_id=0,
    )

  kws = {dt: hf_kw(dt) for dt in hf_models}

  def theirs(dtype, n, **extra):
    with torch.no_grad():
      return hf_models[dtype].generate(**kws[dtype], max_new_tokens=n, min_new_tokens=n, **extra)

  tokens, compile_s = {}, {}
  for s in OURS:  # cold calls: compile time = cold - warm (below)
    t = time.perf_counter()
    tokens[s] = ours(s, N).tokens  # host numpy: generate() blocks until the tokens are back
    cold_N = time.perf_counter() - t
    t = time.perf_counter()
    ours(s, 1)
    compile_s[s] = (cold_N, time.perf_counter() - t)
  fns = {}
  for s in OURS:
    fns[("ours", s, 1)] = lambda s=s: ours(s, 1)
    fns[("ours", s, N)] = lambda s=s: ours(s, N)
  best_ours = {k: float("inf") for k in fns}
  hf_times = {}
  for th in threads:
    if th:
      torch.set_num_threads(th)
    block = dict(fns)
    for dt in hf_models:
      theirs(dt, N), theirs(dt, 1)  # warm-up at this thread count
      block[("hf", dt, 1)] = lambda dt=dt: theirs(dt, 1)
      block[("hf", dt, N)] = lambda dt=dt: theirs(dt, N)
    times = dict(zip(block, best_times(list(block.values()), repeats)))
    for k in fns:
      best_ours[k] = min(best_ours[k], times[k])
    for dt in hf_models:
      hf_times[f"{dt}/{th}"] = (times[("hf", dt, 1)], times[("hf", dt, N)])

  def stats(t1, tN):
    return dict(
      ttft_ms=1e3 * t1, decode_tok_s=B * (N - 1) / (tN - t1), e2e_tok_s=B * N / tN, e2e_s=tN
    )

  ours_stats = {s: stats(best_ours[("ours", s, 1)], best_ours[("ours", s, N)]) for s in OURS}
  for s, (cold_N, cold_1) in compile_s.items():
    ours_stats[s]["compile_s"] = (cold_N - best_ours[("ours", s, N)]) + (
      cold_1 - best_ours[("ours", s, 1)]
    )
  hf_stats = {k: stats(*v) for k, v in hf_times.items()}
  fastest = min(hf_stats, key=lambda k: hf_stats[k]["e2e_s"])
  best_of = lambda dt: min(
    (k for k in hf_stats if k.startswith(dt + "/")), key=lambda k: hf_stats[k]["e2e_s"]
  )
  ratio = lambda o, h, m: h[m] / o[m] if m == "ttft_ms" else o[m] / h[m]  # > 1: ours faster

  # Greedy agreement, and the float32 top-1 minus top-2 logit margins along the float32 path.
  hf_out = {dt: theirs(dt, N).numpy()[:, ids.shape[1] :] for dt in hf_models}
  with torch.no_grad():
    logits = torch.stack(
      theirs("float32", N, output_logits=True, return_dict_in_generate=True).logits, 1
    ).numpy()  # [B, N, V]: the logits each float32 greedy token was chosen from
  top2 = -np.sort(-logits, -1)[..., :2]
  margin = top2[..., 0] - top2[..., 1]
  agree = lambda x, y: float((x == y).mean())
  flips = [
    float(margin[r, np.nonzero(tokens["default"][r] != tokens["float32"][r])[0][0]])
    for r in range(B)
    if (tokens["default"][r] != tokens["float32"][r]).any()
  ]
  r = dict(
    batch=B,
    prompt_len=int(ids.shape[1]),
    new_tokens=N,
    ours=ours_stats,
    hf=hf_stats,
    hf_fastest=fastest,
    hf_best_float32=best_of("float32"),
    hf_best_bfloat16=best_of("bfloat16"),
    agreement=dict(
      ours_float32_vs_hf_float32=agree(tokens["float32"], hf_out["float32"]),
      ours_default_vs_ours_float32=agree(tokens["default"], tokens["float32"]),
      hf_bfloat16_vs_hf_float32=agree(hf_out["bfloat16"], hf_out["float32"]),
      ours_default_vs_hf_bfloat16=agree(tokens["default"], hf_out["bfloat16"]),
    ),
    float32_margin=dict(
      median=float(np.median(margin)),
      share_below_0_02=float((margin < 0.02).mean()),
      logit_std=float(logits.std()),
      at_first_flip_ours_default=flips,
    ),
  )
  h = hf_stats[fastest]
  for m in ("e2e_tok_s", "decode_tok_s", "ttft_ms"):
    r[f"speedup_{m}_default_vs_hf_fastest"] = ratio(ours_stats["default"], h, m)
    r[f"speedup_{m}_float32_vs_hf_fastest"] = ratio(ours_stats["float32"], h, m)
  r["speedup_e2e_float32_vs_hf_float32"] = ratio(
    ours_stats["float32"], hf_stats[r["hf_best_float32"]], "e2e_tok_s"
  )
  r["speedup_e2e_default_vs_hf_bfloat16"] = ratio(
    ours_stats["default"], hf_stats[r["hf_best_bfloat16"]], "e2e_tok_s"
  )
  return r


def print_tables(rows, a, threads):
  if not rows:
    return
  print(
    "\nend to end through sampler.generate vs HF's fastest setting (dtype/threads); "
    "ours default = bf16 copy of float32 masters"
  )
  print(
    f"{'B':>3} {'HF fastest':>11} {'HF tok/s':>9} {'default':>8} {'ratio':>6} {'float32':>8} "
    f"{'ratio':>6} | {'f32/f32':>7} {'bf16/bf16':>9}"
  )
  for r in rows:
    o = r["ours"]
    print(
      f"{r['batch']:>3} {r['hf_fastest']:>11} {r['hf'][r['hf_fastest']]['e2e_tok_s']:>9.0f} "
      f"{o['default']['e2e_tok_s']:>8.0f} {r['speedup_e2e_tok_s_default_vs_hf_fastest']:>5.2f}x "
      f"{o['float32']['e2e_tok_s']:>8.0f} {r['speedup_e2e_tok_s_float32_vs_hf_fastest']:>5.2f}x | "
      f"{r['speedup_e2e_float32_vs_hf_float32']:>6.2f}x {r['speedup_e2e_default_vs_hf_bfloat16']:>8.2f}x"
    )
  print(
    f"\n{'B':>3} {'setting':>16} {'TTFT ms':>8} {'decode tok/s':>13} {'e2e tok/s':>10} {'compile s':>10}"
  )
  for r in rows:
    settings = [(f"ours {s}", v) for s, v in r["ours"].items()]
    settings += [(f"HF {k}", v) for k, v in r["hf"].items()]
    for name, v in settings:
      star = "*" if name == f"HF {r['hf_fastest']}" else " "
      comp = f"{v['compile_s']:>10.1f}" if "compile_s" in v else ""
      print(
        f"{r['batch']:>3} {name + star:>16} {v['ttft_ms']:>8.1f} {v['decode_tok_s']:>13.0f} "
        f"{v['e2e_tok_s']:>10.0f} {comp}"
      )
  print(
    f"\n{'B':>3} {'agree: ours f32/HF f32':>23} {'ours bf16/f32':>14} {'HF bf16/f32':>12} "
    f"{'ours/HF bf16':>13} | {'f32 margin: median':>19} {'<0.02':>6} {'max at 1st flip':>16}"
  )
  for r in rows:
    g, m = r["agreement"], r["float32_margin"]
    flip = max(m["at_first_flip_ours_default"], default=float("nan"))
    print(
      f"{r['batch']:>3} {g['ours_float32_vs_hf_float32']:>23.3f} "
      f"{g['ours_default_vs_ours_float32']:>14.3f} {g['hf_bfloat16_vs_hf_float32']:>12.3f} "
      f"{g['ours_default_vs_hf_bfloat16']:>13.3f} | {m['median']:>19.4f} "
      f"{m['share_below_0_02']:>6.2f} {flip:>16.4f}"
    )
  print(
    f"(hidden {a.hidden}, {a.layers} layers, vocab 4096, N={a.new_tokens} new tokens, one 112x112 "
    f"image per prompt, torch threads {threads}, best of {a.repeats}, {jax.devices()[0].device_kind}; "
    f"load average before {LOAD_BEFORE[0]:.2f}, now {os.getloadavg()[0]:.2f})"
  )


def skewed_workload(model, a, setting: str) -> dict:
  """Part 2: log-normal response lengths, all rows at once vs R rows in turns vs R rows refilled."""
  compute = OURS[setting]
  W, R, med = a.skewed, a.rows, a.median
  if W % R:
    raise ValueError(f"--skewed {W} must be a multiple of --rows {R}")
  rng = np.random.default_rng(0)
  cap = 8 * med
  limits = np.clip(np.round(np.exp(rng.normal(np.log(med), 1.0, W))), 1, cap).astype(np.int64)
  ids = rng.integers(10, 3900, (W, a.text))
  total = int(limits.sum())

  def run(decode_rows, batch):
    outs = [
      sampler.generate(
        model,
        ids[i : i + batch],
        None,
        max_new_tokens=cap,
        eos_token_ids=(),
        length_limits=limits[i : i + batch],
        decode_rows=decode_rows,
        **compute,
      )
      for i in range(0, W, batch)
    ]
    return outs

  modes = {"all rows": (0, W, W), f"{R} rows": (0, R, R), f"{R} refilled": (R, W, R)}
  outs = {name: run(dr, batch) for name, (dr, batch, _) in modes.items()}  # compile + check
  for name, o in outs.items():
    got = np.concatenate([x.lengths for x in o])
    assert (got == limits).all(), (name, got, limits)
  times = best_times([lambda dr=dr, b=b: run(dr, b) for dr, b, _ in modes.values()], a.repeats)
  table = {}
  for (name, (_, _, rows)), t in zip(modes.items(), times):
    steps = int(sum(int(x.decode_steps) for x in outs[name]))
    table[name] = dict(
      rows=rows,
      decode_steps=steps,
      wasted_row_steps=rows * steps - (total - W),
      wall_s=t,
      tokens_per_s=total / t,
    )
  print(
    f"\nlength-skewed workload: {W} samples, lengths log-normal (median {med}, sigma 1, cap {cap}): "
    f"mean {limits.mean():.1f}, max {limits.max()}, {total} tokens; greedy, text prompts of {a.text} tokens, "
    f"ours {setting} ({compute.get('compute_dtype', 'float32')})"
  )
  print(
    f"{'mode':>14} {'rows':>5} {'decode steps':>13} {'row-steps wasted':>17} {'tok/s':>8} {'wall s':>7}"
  )
  for name, r in table.items():
    print(
      f"{name:>14} {r['rows']:>5} {r['decode_steps']:>13} {r['wasted_row_steps']:>10} "
      f"({100 * r['wasted_row_steps'] / (r['rows'] * r['decode_steps']):3.0f}%) {r['tokens_per_s']:>8.0f} "
      f"{r['wall_s']:>7.2f}"
    )
  return dict(samples=W, rows=R, median=med, cap=cap, lengths=limits.tolist(), modes=table)


if __name__ == "__main__":
  main()
