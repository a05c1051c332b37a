"""Scoring and update passes at the paper's proportions, CPU: the blind view's cost, packed vs padded.

    .venv/bin/python benchmarks/scoring.py [--prompts 2 --group 4 --hidden 64 --layers 2 --repeats 2]

Workload (docs/method.md §5 proportions, real token counts, a scaled-down model): each prompt holds one
image of 1,024 visual tokens and ~100 text tokens; responses are log-normal with mean ~600 tokens,
capped at 2,048. The padded layout is what the trainer builds (responses padded to the rollout's
`max_new_tokens` = 2,048); the packed one lays the sequences into rows of `--row` tokens.

Rows (median of `--repeats` warm runs, alternated so that load from other processes on a shared
machine falls on all rows alike; peak = XLA's temporaries + outputs), in each layout:
  image view only            log-probs of the response tokens: the pass a run without PGPO makes.
  two views, blind masked    padded only, the first implementation: the blind view on the full
                             sequence with the visual tokens masked out of attention.
  two views                  `score_rollout`: the blind view without its visual tokens.
  floor: non-visual tokens   one forward over the non-visual tokens only (+ its lm-head on the
                             response tokens): the least a blind view can add.
  update step                one optimizer step (forward + backward + AdamW) on the batch.
blind_overhead = two views / image view − 1 in the packed layout (the 7B/3B recipes' default;
`blind_overhead_padded` for the padded one); packed/padded ratios of scoring and update times.
Also an analytic FLOP estimate of the blind view's share for the 7B model at the same token counts
(`tools/compile_check.text_flops`). Writes benchmarks/results/scoring.json.
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

from pgpo_jax import programs  # noqa: E402
from pgpo_jax import train_step as train_step_lib  # noqa: E402
from pgpo_jax.models import qwen2_5_vl as qwen  # noqa: E402
from pgpo_jax.rl import losses, packing, scoring, sequences  # noqa: E402


def masked_blind_scores(model, b, chunk):
  """Two views, the blind one masking the visual tokens of the full sequence (the first design)."""
  x, pos, km, vis = sequences._embed_and_positions(model, b)
  both = lambda a, axis=0: jnp.concatenate([a, a], axis=axis)  # noqa: E731
  h, _ = qwen.run_decoder(model, both(x), both(pos, 1), jnp.concatenate([km, km & ~vis]))
  h = sequences._response_hidden(h, b.prompt_ids.shape[1])
  n = h.shape[0] // 2
  return scoring.k3_dependency(
    h[:n], h[n:], model.lm_head_weight(), b.flat_response, b.flat_response_mask, chunk_size=chunk
  )


def workload(cfg, rng, prompts, group, text_tokens, image_side, mean_len, cap):
  """Left-padded prompts `[text/2, <vs>, image, <ve>, text/2]` and log-normal responses."""
  n_img = image_side * image_side // 4
  rows, grids = [], []
  for _ in range(prompts):
    t = list(rng.integers(10, cfg.text.vocab_size - 10, text_tokens))
    h = text_tokens // 2
    rows.append(
      t[:h]
      + [cfg.vision_start_token_id]
      + [cfg.image_token_id] * n_img
      + [cfg.vision_end_token_id]
      + t[h:]
    )
    grids.append((1, image_side, image_side))
  ids = np.array(rows, np.int32)
  # Log-normal (sigma 0.8: a long right tail), rescaled so that this small sample has the requested
  # mean, then capped.
  raw = rng.lognormal(0.0, 0.8, prompts * group)
  lengths = np.minimum(np.maximum((raw * mean_len / raw.mean()).astype(int), 1), cap)
  response = rng.integers(10, cfg.text.vocab_size - 10, (prompts * group, cap)).astype(np.int32)
  mask = np.arange(cap)[None] < lengths[:, None]
  pixels = rng.standard_normal((prompts * image_side * image_side, 1176)).astype(np.float32)
  return ids, np.asarray(grids), pixels, response, mask, lengths


def text_only_batch(cfg, b: sequences.SequenceBatch):
  """The floor: the same sequences with the visual tokens removed, as a text-only batch whose
  positions are those of the full sequence."""
  keep = np.asarray(b.blind_index)
  ids = np.take_along_axis(np.asarray(b.prompt_ids), np.maximum(keep, 0), 1)
  pos = np.take_along_axis(np.asarray(b.prompt_pos), np.maximum(keep, 0)[:, None], 2)
  mask = keep >= 0
  return dataclass_replace(
    b,
    prompt_ids=ids,
    prompt_mask=mask,
    prompt_pos=pos,
    prompt_visual=np.zeros_like(mask),
    blind_index=np.where(mask, np.arange(keep.shape[1])[None], -1).astype(np.int32),
    vision=None,
  )


def dataclass_replace(b, **kw):
  return b.__class__(**{**b.__dict__, **kw})


def analytic_7b(prompt_text, n_img, lengths, cap, row_len):
  """FLOP ratios for Qwen2.5-VL-7B's decoder at these token counts (dense masked attention over
  whole rows, as implemented; lm-head on the response tokens)."""
  from pgpo_jax.tools.compile_check import text_flops

  cfg = qwen.PRESETS["7b"]
  Tp, Tb = prompt_text + n_img + 2, prompt_text + 2
  N, resp = len(lengths), int(lengths.sum())
  padded = lambda t: text_flops(cfg, N * (t + cap), t + cap, N * cap)  # noqa: E731
  rows = lambda t: -(-int(N * t + resp) // row_len)  # ideal packing  # noqa: E731
  packed = lambda t: text_flops(cfg, rows(t) * row_len, row_len, resp)  # noqa: E731
  return dict(
    blind_overhead=packed(Tb) / packed(Tp),
    blind_overhead_padded=padded(Tb) / padded(Tp),
    blind_overhead_before=1.0,
    packed_over_padded_scoring=(packed(Tp) + packed(Tb)) / (padded(Tp) + padded(Tb)),
  )


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--prompts", type=int, default=2)
  ap.add_argument("--group", type=int, default=4)
  ap.add_argument("--text", type=int, default=100, help="prompt text tokens")
  ap.add_argument(
    "--image_side", type=int, default=64, help="patches per side: 64 -> 1,024 visual tokens"
  )
  ap.add_argument("--mean_len", type=float, default=600)
  ap.add_argument("--cap", type=int, default=2048)
  ap.add_argument("--row", type=int, default=4096, help="packed row length")
  ap.add_argument("--vocab", type=int, default=2048)
  ap.add_argument("--hidden", type=int, default=64)
  ap.add_argument("--layers", type=int, default=2)
  ap.add_argument("--chunk", type=int, default=256)
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "scoring.json"))
  a = ap.parse_args()
  V = a.vocab
  cfg = qwen.tiny_config(
    vocab_size=V,
    hidden_size=a.hidden,
    intermediate_size=4 * a.hidden,
    num_hidden_layers=a.layers,
    num_attention_heads=a.hidden // 64,
    num_key_value_heads=1,
    head_dim=64,
    mrope_section=(16, 8, 8),
    image_token_id=V - 4,
    video_token_id=V - 3,
    vision_start_token_id=V - 2,
    vision_end_token_id=V - 1,
    vision_hidden_size=64,
    vision_intermediate_size=128,
    vision_num_heads=1,
    vision_window_size=112,
    vision_fullatt_block_indexes=(1,),
    vision_out_hidden_size=a.hidden,
  )
  model = qwen.init_model(cfg, "float32")
  rng = np.random.default_rng(a.seed)
  ids, grids, pixels, response, rmask, lengths = workload(
    cfg, rng, a.prompts, a.group, a.text, a.image_side, a.mean_len, a.cap
  )
  b = sequences.make_sequence_batch(cfg, ids, np.ones_like(ids), pixels, grids, response, rmask)
  floor_b = text_only_batch(cfg, b)
  pk, slot = packing.pack_sequences(b, cfg.image_token_id, 1, a.row)
  pk_train, slot_train = packing.pack_sequences(b, cfg.image_token_id, 1, a.row, blind=False)
  pk_floor, _ = packing.pack_sequences(floor_b, cfg.image_token_id, 1, a.row, blind=False)
  graphdef, state = nnx.split(model)
  m = lambda s: nnx.merge(graphdef, s)  # noqa: E731
  ch = a.chunk

  # Update steps: the trainer's loss on the padded batch and on the packed one.
  N, L = rmask.shape
  old = rng.normal(-3.0, 0.3, (N, L)).astype(np.float32)
  adv = rng.normal(0.0, 1.0, (N, L)).astype(np.float32)
  norms = {k: np.asarray(v) for k, v in losses.loss_normalizers(rmask).items()}

  def padded_loss(model, bt):
    logp = sequences.response_logprobs(model, bt["seq"], chunk_size=ch)
    return losses.policy_loss(
      logp,
      bt["old_logp"].reshape(N, L),
      bt["adv"].reshape(N, L),
      bt["seq"].flat_response_mask,
      token_normalizer=bt["token_normalizer"],
    )

  def packed_loss(model, bt):
    pb = bt["packed"]
    logp = packing.response_logprobs(model, pb, chunk_size=ch)
    return losses.policy_loss(
      logp,
      bt["old_logp"],
      bt["adv"],
      pb.mask,
      token_normalizer=bt["token_normalizer"],
      seq_length_BxT=pb.seq_len,
    )

  P, G = a.prompts, a.group
  pad_batch = {"seq": b, "old_logp": old.reshape(P, G, L), "adv": adv.reshape(P, G, L), **norms}
  shape = pk_train.target.shape
  pk_batch = {
    "packed": pk_train,
    "old_logp": packing.pack_like(old, slot_train, shape),
    "adv": packing.pack_like(adv, slot_train, shape),
    **norms,
  }
  opt = train_step_lib.make_optimizer(1e-6)

  def update(loss_fn):
    gd, st = train_step_lib.init_train_state(qwen.init_model(cfg, "float32"), opt)
    step = programs.make_train_step(gd, loss_fn, opt, donate=False)
    return lambda _, bt: step(st, bt)

  padded_logp = jax.jit(lambda s, x: sequences.response_logprobs(m(s), x, chunk_size=ch))
  packed_logp = jax.jit(lambda s, x: packing.response_logprobs(m(s), x, chunk_size=ch))
  rows = {
    "padded: image view only": (padded_logp, b),
    "padded: two views, blind masked (before)": (
      jax.jit(lambda s, x: masked_blind_scores(m(s), x, ch)),
      b,
    ),
    "padded: two views": (jax.jit(lambda s, x: sequences.score_rollout(m(s), x, chunk_size=ch)), b),
    "padded: floor (non-visual tokens)": (padded_logp, floor_b),
    "packed: image view only": (packed_logp, pk_train),
    "packed: two views": (jax.jit(lambda s, x: packing.score_rollout(m(s), x, chunk_size=ch)), pk),
    "packed: floor (non-visual tokens)": (packed_logp, pk_floor),
    "padded: update step": (update(padded_loss), pad_batch),
    "packed: update step": (update(packed_loss), pk_batch),
  }
  peak = {}
  for name, (fn, x) in rows.items():
    if hasattr(fn, "lower"):
      mem = fn.lower(state, x).compile().memory_analysis()
      peak[name] = (mem.temp_size_in_bytes + mem.output_size_in_bytes) / 2**20
    jax.block_until_ready(fn(state, x))  # compile + warm-up
  times = {k: [] for k in rows}
  for _ in range(a.repeats):
    for name, (fn, x) in rows.items():
      t = time.perf_counter()
      jax.block_until_ready(fn(state, x))
      times[name].append(time.perf_counter() - t)
  med = {k: float(np.median(v)) for k, v in times.items()}

  # The packed scores are the padded ones (tests/rl/test_packing.py); check here too.
  s_pad, s_pk = rows["padded: two views"][0](state, b), rows["packed: two views"][0](state, pk)
  diff = np.abs(
    packing.unpack(s_pk.logp_blind_BxT, slot) - np.where(rmask, np.asarray(s_pad.logp_blind_BxT), 0)
  ).max()

  img, img_pk = med["padded: image view only"], med["packed: image view only"]
  res = dict(
    workload=dict(
      prompts=P,
      group=G,
      prompt_text_tokens=a.text,
      visual_tokens=a.image_side**2 // 4,
      response_mean=float(lengths.mean()),
      response_max=int(lengths.max()),
      cap=a.cap,
      padded_row=int(b.prompt_ids.shape[1] + L),
      blind_prompt=int(b.blind_index.shape[1]),
      packed_row=a.row,
      packed_rows=int(pk.image.ids.shape[1]),
      packed_blind_rows=int(pk.blind.ids.shape[1]),
    ),
    model=dict(hidden=a.hidden, layers=a.layers, vocab=V, heads=a.hidden // 64),
    rows={k: {"time_s": med[k], "peak_mib": peak.get(k)} for k in rows},
    blind_overhead=med["packed: two views"] / img_pk - 1,
    blind_floor=med["packed: floor (non-visual tokens)"] / img_pk,
    blind_overhead_padded=med["padded: two views"] / img - 1,
    blind_floor_padded=med["padded: floor (non-visual tokens)"] / img,
    blind_overhead_before=med["padded: two views, blind masked (before)"] / img - 1,
    packed_over_padded_scoring=med["packed: two views"] / med["padded: two views"],
    packed_over_padded_update=med["packed: update step"] / med["padded: update step"],
    packed_scores_max_abs_diff=float(diff),
    analytic_7b=analytic_7b(a.text, a.image_side**2 // 4, lengths, a.cap, a.row),
    repeats=a.repeats,
    devices=str(jax.devices()),
  )
  w = res["workload"]
  print(
    f"workload: {P} prompts x {G} responses; prompt {a.text} text + {w['visual_tokens']} visual tokens; "
    f"responses mean {w['response_mean']:.0f}, max {w['response_max']} (cap {a.cap}); padded rows of "
    f"{w['padded_row']}, blind prompt {w['blind_prompt']}; packed: {w['packed_rows']} + {w['packed_blind_rows']} "
    f"rows of {a.row}. Model: hidden {a.hidden}, {a.layers} layers, vocab {V}."
  )
  print(f"{'pass':<44}{'time s':>9}{'/ padded image view':>21}{'peak MiB':>10}")
  for k in rows:
    pm = f"{peak[k]:>10.0f}" if k in peak else f"{'-':>10}"
    print(f"{k:<44}{med[k]:>9.2f}{med[k] / img:>20.2f}x{pm}")
  print(
    f"blind_overhead (packed) {100 * res['blind_overhead']:+.0f}%, floor {100 * res['blind_floor']:.0f}%; "
    f"padded {100 * res['blind_overhead_padded']:+.0f}%, floor {100 * res['blind_floor_padded']:.0f}% "
    f"(before: {100 * res['blind_overhead_before']:+.0f}%)"
  )
  print(
    f"packed / padded: scoring {res['packed_over_padded_scoring']:.2f}, update {res['packed_over_padded_update']:.2f}"
    f"  (packed scores = padded to {diff:.1e})"
  )
  an = res["analytic_7b"]
  print(
    f"analytic, 7B decoder at these token counts (FLOPs): blind_overhead packed {100 * an['blind_overhead']:+.0f}%, "
    f"padded {100 * an['blind_overhead_padded']:+.0f}% (before +100%); packed / padded scoring "
    f"{an['packed_over_padded_scoring']:.2f}"
  )
  pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
  main()
