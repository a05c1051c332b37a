"""Generation throughput: `sampler.generate` vs HF `generate` (KV cache, greedy), same small random model, CPU.

    .venv/bin/python benchmarks/rollout.py [--batches 8,32 --new_tokens 64 --torch_threads 1,2 --skewed 64]

Part 1, for each batch size B (one 112x112 image per prompt, prompts of equal length) and each
implementation, the best of `--repeats` warm calls (interleaved) of
  t_1 = generate(max_new_tokens=1)   -> time to first token (TTFT: processing, vision, prefill, 1 token)
  t_N = generate(max_new_tokens=N)   -> end-to-end
gives decode throughput = B*(N-1) / (t_N - t_1) generated tokens/s (prefill excluded). Stop tokens
are disabled (HF: min_new_tokens=N), so every row generates exactly N tokens. JAX compile time (the
first call of each shape minus a warm call) is reported separately. Both run in `--dtype`: float32,
or bfloat16 (ours: the float32 model sampled with `compute_dtype="bfloat16"`, i.e. a bf16 copy cast
in every call and a bf16 KV cache; HF: the model converted to bf16). PyTorch is
timed at every thread count of `--torch_threads` and each row compares against HF's best one (named
in the table): on a small shared CPU box, two OpenMP threads can make HF's decode-sized matmuls much
slower (spin-waiting barriers under load from other processes).

Part 2 (`--skewed W`, 0 = skip): W text prompts whose response lengths are drawn log-normal
(median `--median`, sigma 1, capped at 8x the median; enforced with per-prompt `length_limits`, no
stop token), greedy, through `sampler.generate`:
  all rows     W rows at once (every row waits for the longest response)
  R rows       W/R successive calls of R rows (the same memory as refill)
  R refilled   R rows with slot refill (`decode_rows=R`)
Generated tokens/s = sum of lengths / wall time (best of `--repeats`), and row-steps wasted =
rows x decode steps - (sum of lengths - W) (steps in which a row computed nothing kept).

Prints tables and writes benchmarks/results/rollout.json; numbers compare only within a run.
"""

from __future__ import annotations

import argparse
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

from pgpo_jax import sampler  # noqa: E402
from pgpo_jax.models import qwen2_5_vl as qwen  # noqa: E402

IMAGE, VSTART, VEND = 4000, 4002, 4003


def hf_config(hidden: int, layers: int):
  from transformers import Qwen2_5_VLConfig

  heads = hidden // 64
  return Qwen2_5_VLConfig(
    text_config=dict(
      vocab_size=4096,
      hidden_size=hidden,
      intermediate_size=4 * hidden,
      num_hidden_layers=layers,
      num_attention_heads=heads,
      num_key_value_heads=max(1, heads // 2),
      rms_norm_eps=1e-6,
      max_position_embeddings=4096,
      rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
      bos_token_id=0,
      eos_token_id=1,
      pad_token_id=0,
    ),
    vision_config=dict(
      depth=2,
      hidden_size=128,
      intermediate_size=256,
      num_heads=2,
      patch_size=14,
      temporal_patch_size=2,
      spatial_merge_size=2,
      window_size=112,
      fullatt_block_indexes=[1],
      out_hidden_size=hidden,
      tokens_per_second=2,
    ),
    image_token_id=IMAGE,
    video_token_id=4001,
    vision_start_token_id=VSTART,
    vision_end_token_id=VEND,
  )


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


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batches", default="1,8,32")
  ap.add_argument("--new_tokens", type=int, default=64)
  ap.add_argument(
    "--text", type=int, default=32, help="text tokens per prompt (plus 16 image tokens)"
  )
  ap.add_argument("--hidden", type=int, default=256)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--repeats", type=int, default=4)
  ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "rollout.json"))
  ap.add_argument("--torch_threads", default="1,2", help="thread counts to try (0 = torch default)")
  ap.add_argument(
    "--skewed", type=int, default=64, help="samples of the length-skewed workload (0 = skip)"
  )
  ap.add_argument(
    "--median", type=int, default=16, help="median response length of the skewed workload"
  )
  ap.add_argument("--rows", type=int, default=16, help="decode rows R of the skewed workload")
  ap.add_argument(
    "--dtype", default="float32", choices=("float32", "bfloat16"), help="both sides compute in it"
  )
  a = ap.parse_args()
  threads = [int(t) for t in a.torch_threads.split(",")]
  from transformers import Qwen2_5_VLForConditionalGeneration

  torch.manual_seed(0)
  hf = Qwen2_5_VLForConditionalGeneration(hf_config(a.hidden, a.layers)).eval()
  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    model = qwen.from_pretrained(d)
  bf16 = a.dtype == "bfloat16"
  if bf16:
    hf = hf.to(torch.bfloat16)
  compute = dict(compute_dtype="bfloat16") if bf16 else {}
  N = a.new_tokens
  grid = 8  # 112x112 px: 64 patches, 16 image tokens
  rows = []
  for B in (int(b) for b in a.batches.split(",")) if a.batches else ():
    ids, am, pixels, grids = prompts(B, a.text, grid, np.random.default_rng(B))

    def ours(n):
      return sampler.generate(
        model, ids, am, pixels, grids, max_new_tokens=n, eos_token_ids=(), **compute
      )

    hf_kw = dict(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(am),
      mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)),
      pixel_values=torch.tensor(pixels).to(hf.dtype),
      image_grid_thw=torch.tensor(grids),
      do_sample=False,
      pad_token_id=0,
    )

    def theirs(n):
      with torch.no_grad():
        return hf.generate(**hf_kw, max_new_tokens=n, min_new_tokens=n)

    t = time.perf_counter()
    first = ours(N)  # outputs are host numpy: generate() blocks until the tokens are back
    cold_N = time.perf_counter() - t
    t = time.perf_counter()
    ours(1)
    cold_1 = time.perf_counter() - t
    # One block per torch thread count (switching counts between calls resizes torch's pool and
    # slows HF down), ours interleaved in every block; ours keeps its best over all blocks.
    ours_1 = ours_N = float("inf")
    by_thread = {}
    for th in threads:
      if th:
        torch.set_num_threads(th)
      ref = theirs(N)  # warm-up at this thread count
      theirs(1)
      o1, oN, h1, hN = best_times(
        [lambda: ours(1), lambda: ours(N), lambda: theirs(1), lambda: theirs(N)], a.repeats
      )
      ours_1, ours_N = min(ours_1, o1), min(ours_N, oN)
      by_thread[th] = (h1, hN)
    best_th = min(by_thread, key=lambda th: by_thread[th][1])  # HF's best end-to-end time
    hf_1, hf_N = by_thread[best_th]
    match = float((ref[:, ids.shape[1] :].numpy() == first.tokens).mean())
    r = dict(
      batch=B,
      prompt_len=int(ids.shape[1]),
      new_tokens=N,
      torch_threads=best_th,
      hf_e2e_tok_s_by_threads={str(th): B * N / v[1] for th, v in by_thread.items()},
      ours_ttft_ms=1e3 * ours_1,
      hf_ttft_ms=1e3 * hf_1,
      ours_decode_tok_s=B * (N - 1) / (ours_N - ours_1),
      hf_decode_tok_s=B * (N - 1) / (hf_N - hf_1),
      ours_e2e_tok_s=B * N / ours_N,
      hf_e2e_tok_s=B * N / hf_N,
      ours_compile_s=(cold_N - ours_N) + (cold_1 - ours_1),
      greedy_token_agreement=match,
    )
    r["decode_speedup"] = r["ours_decode_tok_s"] / r["hf_decode_tok_s"]
    r["ttft_speedup"] = r["hf_ttft_ms"] / r["ours_ttft_ms"]
    r["e2e_speedup"] = r["ours_e2e_tok_s"] / r["hf_e2e_tok_s"]
    rows.append(r)
    print(f"B={B}: done", flush=True)

  hdr = (
    f"{'B':>3} {'decode tok/s ours':>18} {'HF':>9} {'ratio':>6} {'TTFT ms ours':>13} {'HF':>8} "
    f"{'ratio':>6} {'e2e tok/s ours':>15} {'HF':>9} {'ratio':>6} {'HF thr':>6} {'compile s':>10} {'agree':>6}"
  )
  if rows:
    print(hdr)
  for r in rows:
    print(
      f"{r['batch']:>3} {r['ours_decode_tok_s']:>18.0f} {r['hf_decode_tok_s']:>9.0f} "
      f"{r['decode_speedup']:>5.2f}x {r['ours_ttft_ms']:>13.1f} {r['hf_ttft_ms']:>8.1f} "
      f"{r['ttft_speedup']:>5.2f}x {r['ours_e2e_tok_s']:>15.0f} {r['hf_e2e_tok_s']:>9.0f} "
      f"{r['e2e_speedup']:>5.2f}x {r['torch_threads']:>6} {r['ours_compile_s']:>10.1f} "
      f"{r['greedy_token_agreement']:>6.2f}"
    )
  print(
    f"({a.dtype}, hidden {a.hidden}, {a.layers} layers, vocab 4096, N={N} new tokens, one 112x112 image per "
    f"prompt, HF at its best of torch threads {threads} per row ('HF thr'), {jax.devices()[0].device_kind})"
  )
  skewed = skewed_workload(model, a, compute) if a.skewed else None
  res = dict(
    config=dict(
      dtype=a.dtype,
      hidden=a.hidden,
      layers=a.layers,
      vocab=4096,
      new_tokens=N,
      image_px=112,
      text_tokens=a.text,
      repeats=a.repeats,
      torch_threads_tried=threads,
      devices=str(jax.devices()),
    ),
    rows=rows,
    skewed=skewed,
  )
  pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(a.out).write_text(json.dumps(res, indent=2))


def skewed_workload(model, a, compute: dict) -> dict:
  """Part 2: log-normal response lengths, all rows at once vs R rows in turns vs R rows refilled."""
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
    f"{a.dtype}"
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
