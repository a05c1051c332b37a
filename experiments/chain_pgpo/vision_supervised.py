"""Can the chain model's vision tower *learn* the image facts when taught them directly?

The frozen-feature probes (`vision_probe.py`) say what the warm-up's tower holds; this asks what the
architecture can hold. The tower of a checkpoint (or the same architecture freshly initialised,
`random:CKPT`) is trained end to end, with one linear head per fact on its merged output (the visual
tokens the language model reads, concatenated), by Adam on the summed cross-entropies of every fact
of `vision_probe.targets` (digit, counts, largest colour). Test accuracy per fact is printed and
written every `--eval_every` steps. If the digit reaches high accuracy here but not through the
language model, the warm-up's gradient path is what fails the tower, and a supervised pre-training
of the tower (as a real LVLM's tower is pre-trained before it meets the language model) is the fix.

  JAX_PLATFORMS=cpu PYTHONPATH=. python experiments/chain_pgpo/vision_supervised.py \
    --data runs/data --save runs/vision_pretrained   # a fresh model's tower; warm up from it with
    # --config.model.random_init=False --config.model.init_from=runs/vision_pretrained
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.chain_pgpo import config as experiment_config
from experiments.chain_pgpo import vision_probe as vp
from pgpo_jax import checkpoint, train_setup
from pgpo_jax.data import hf_processor as processor_lib
from pgpo_jax.models.qwen2_5_vl import loading
from pgpo_jax.models.qwen2_5_vl import model as qmodel


def class_counts(ys: dict[str, np.ndarray]) -> dict[str, int]:
  return {k: int(v.max()) + 1 for k, v in ys.items()}


PATCH_MLP_OUT = 64  # features per patch of the control network


def patch_mlp(key, patch_dim: int, width: int = 256, out: int = PATCH_MLP_OUT):
  """A control without attention or the tower: a 2-layer MLP on each patch, outputs concatenated.

  (init params, apply(params, pix [B, P, patch_dim]) -> [B, P*out])."""
  k1, k2 = jax.random.split(key)
  params = {
    "w1": jax.random.normal(k1, (patch_dim, width)) / np.sqrt(patch_dim),
    "b1": jnp.zeros(width),
    "w2": jax.random.normal(k2, (width, out)) / np.sqrt(width),
    "b2": jnp.zeros(out),
  }

  def apply(p, pix):
    h = jax.nn.gelu(pix @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    return h.reshape(h.shape[0], -1)

  return params, apply


def make_step(
  model,
  grid,
  ks: dict[str, int],
  lr: float,
  train_tower: bool,
  arch: str = "tower",
  pool: str = "concat",
):
  """(params, opt_state, step, predict): the tower's params plus linear heads, trained jointly."""
  cfg = model.cfg.vision
  to_inputs, n_units = vp.batched_vision_inputs(cfg, grid)
  is_tower = lambda path, _: path[0] == "visual"
  gdef, tower, rest = nnx.split(model, is_tower, ...)
  d = (n_units if pool == "concat" else 1) * model.cfg.vision.out_hidden_size
  key = jax.random.PRNGKey(0)
  if arch == "patch_mlp":
    tower, control = patch_mlp(jax.random.fold_in(key, 99), cfg.patch_dim)
    d = int(np.prod(grid)) * PATCH_MLP_OUT
  heads = {
    t: {"w": jax.random.normal(jax.random.fold_in(key, i), (d, k)) * 0.01, "b": jnp.zeros((k,))}
    for i, (t, k) in enumerate(sorted(ks.items()))
  }
  params = {"tower": tower, "heads": heads}
  opt = optax.adam(lr)
  opt_state = opt.init(params)

  def feats(tower_state, pix):
    if arch == "patch_mlp":
      x = control(tower_state, pix)
      return (x - x.mean(0)) / (x.std(0) + 1e-3)
    merged = qmodel.encode_images(nnx.merge(gdef, tower_state, rest), to_inputs(pix))
    merged = merged[:, :n_units].astype(jnp.float32)
    # concat: a weight per token position; mean: one readout shared by every token, as the language
    # model's attention reads them (a fact must then look the same wherever in the image it is)
    x = merged.reshape(len(pix), -1) if pool == "concat" else merged.mean(1)
    # standardise per feature over the batch's rows (the tower's scale is ~100s; heads see O(1))
    return (x - x.mean(0)) / (x.std(0) + 1e-3)

  def logits(p, pix):
    x = feats(p["tower"], pix)
    return {t: x @ h["w"] + h["b"] for t, h in p["heads"].items()}

  def loss_fn(p, pix, ys):
    out = logits(p, pix)
    total = 0.0
    for t, z in out.items():
      y = ys[t]
      ok = y >= 0
      ce = optax.softmax_cross_entropy_with_integer_labels(z, jnp.where(ok, y, 0))
      total = total + jnp.sum(jnp.where(ok, ce, 0.0)) / jnp.maximum(ok.sum(), 1)
    return total

  @jax.jit
  def step(p, s, pix, ys):
    loss, g = jax.value_and_grad(loss_fn)(p, pix, ys)
    if not train_tower:
      g = {**g, "tower": jax.tree.map(jnp.zeros_like, g["tower"])}
    upd, s = opt.update(g, s, p)
    return optax.apply_updates(p, upd), s, loss

  @jax.jit
  def predict(p, pix):
    return {t: jnp.argmax(z, -1) for t, z in logits(p, pix).items()}

  return params, opt_state, step, predict


def load_model(spec: str, data: str):
  """(model, processor): `config:ARM` builds the model a warm-up from scratch starts from (the
  experiment config's tiny architecture, `train_setup.build_model`, seed `config.seed`); otherwise
  `vision_probe.load_model` (a checkpoint, or `random:CKPT`)."""
  if not spec.startswith("config:"):
    return vp.load_model(spec, f"{data}/model")
  c = experiment_config.get_config(spec.removeprefix("config:"))
  c.model.random_init, c.model.init_from = True, ""
  processor = processor_lib.load_processor(f"{data}/model")
  return train_setup.build_model(c, processor.tokenizer), processor


def save_model(model, tower_state, out: str) -> None:
  """`model` with its tower replaced by the trained one, as a checkpoint folder `model.init_from` reads
  (config.json + params/; the language model is left as loaded: random for a fresh model)."""
  os.makedirs(out, exist_ok=True)
  nnx.update(model, tower_state)
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(model.cfg.to_hf_dict(), f, indent=2)
  tmp = os.path.join(out, "params.tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  checkpoint.save_orbax_params(tmp, loading.flat_params(model))
  shutil.rmtree(os.path.join(out, "params"), ignore_errors=True)
  os.replace(tmp, os.path.join(out, "params"))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--data", default=f"{vp.RUNS}/data")
  ap.add_argument(
    "--ckpt",
    default="config:pgpo",
    help="config:ARM (a fresh model of the experiment config), CKPT or random:CKPT",
  )
  ap.add_argument("--n_train", type=int, default=8000)
  ap.add_argument("--n_test", type=int, default=1024)
  ap.add_argument("--steps", type=int, default=1500)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--lr", type=float, default=1e-3)
  ap.add_argument("--eval_every", type=int, default=250)
  ap.add_argument(
    "--arch", default="tower", choices=("tower", "patch_mlp"), help="patch_mlp: a control network"
  )
  ap.add_argument(
    "--pool",
    default="concat",
    choices=("concat", "mean"),
    help="the heads read the visual tokens concatenated, or their mean",
  )
  ap.add_argument("--heads_only", action="store_true", help="freeze the tower (a trained probe)")
  ap.add_argument("--out", default=None)
  ap.add_argument(
    "--save",
    default=None,
    help="write the model with the trained tower here (config.json + params/), for model.init_from",
  )
  args = ap.parse_args(argv)

  t0 = time.time()
  model, processor = load_model(args.ckpt, args.data)
  tr_img, tr_sc = vp.read_rows(f"{args.data}/train.parquet", args.n_train)
  te_img, te_sc = vp.read_rows(f"{args.data}/test.parquet", args.n_test)
  tr_pix, grid = vp.pixel_patches(processor, tr_img)
  te_pix, _ = vp.pixel_patches(processor, te_img)
  ytr, yte = vp.targets(tr_sc), vp.targets(te_sc)
  k_tr, k_te = class_counts(ytr), class_counts(yte)
  ks = {t: max(k_tr[t], k_te[t]) for t in ytr}
  print(f"data {time.time() - t0:.0f}s grid {grid} classes {ks}", flush=True)

  params, opt_state, step, predict = make_step(
    model, grid, ks, args.lr, not args.heads_only, args.arch, args.pool
  )
  rng = np.random.default_rng(0)
  history = []

  def evaluate(p):
    # One batch: the heads standardise the features with the batch's own statistics.
    out = predict(p, te_pix)
    acc = {}
    for t in ks:
      pr, y = np.asarray(out[t]), yte[t]
      ok = y >= 0
      acc[t] = float((pr[ok] == y[ok]).mean())
    return acc

  for s in range(1, args.steps + 1):
    idx = rng.choice(len(tr_pix), args.batch, replace=False)
    params, opt_state, loss = step(params, opt_state, tr_pix[idx], {t: ytr[t][idx] for t in ks})
    if s % args.eval_every == 0 or s == args.steps:
      acc = evaluate(params)
      history.append({"step": s, "loss": float(loss), "test_acc": acc, "s": time.time() - t0})
      if args.save:  # every evaluation: an interrupted run keeps its latest tower
        save_model(model, params["tower"], args.save)
      print(
        f"step {s} loss {float(loss):.3f} {time.time() - t0:.0f}s "
        + " ".join(f"{t}={a:.2f}" for t, a in acc.items()),
        flush=True,
      )
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"args": vars(args), "classes": ks, "history": history}, f, indent=1)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
