"""Probes of the frozen vision tower: which chain-task image facts do its features hold?

For each checkpoint, every image goes through the vision tower exactly as in training (the
checkpoint's processor, `prepare_vision`, `encode_images`) and two feature sets are kept:
- `merged`: the tower's output, the visual tokens the language model reads (for 84 px images,
  9 tokens x out_hidden, concatenated in processor order);
- `pre_merger`: the input of the PatchMerger MLP (the ViT blocks' output after `ln_q`, grouped by
  merge unit: 9 x 4 x hidden), captured by spying on the merger's first matmul (library untouched).
Features are standardised with the fit rows' mean/std. On them, a multinomial logistic regression
(L2-regularised, L-BFGS; the strength picked on held-out train rows) predicts each image fact of
`chain._describe` (the digit, the total count, the count per colour and per kind, and the largest
shape's colour where `chain._largest_color` defines it), and a one-hidden-layer MLP predicts the
digit. `digit_local` predicts the digit from the one merge unit (token) holding most of its ink,
which takes away the probe's need to be translation invariant. Controls: `random:` checkpoints (the
same architecture, untrained) and `pixels`, the same probes on the raw grey-level image (for
`digit_local`, the 28 x 28 px square of that token). Test accuracy near the majority baseline means
the fact is not (linearly) in the features; high accuracy means the tower sees it, and a failure to
state it lies in the language model.

  JAX_PLATFORMS=cpu python experiments/chain_pgpo/vision_probe.py \\
    --data runs/data --ckpt stage1=runs/warmup_stage1 --ckpt random=random:runs/warmup
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from contextlib import contextmanager
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pyarrow.parquet as pq
import scipy.optimize
from flax import nnx
from PIL import Image

from pgpo_jax import evaluation as ev
from pgpo_jax.demo_task import chain, synthetic
from pgpo_jax.models import qwen2_5_vl as qwen
from pgpo_jax.models.qwen2_5_vl import layers, vision

RUNS = "/work/chain_run/experiments/chain_pgpo/runs"
DEFAULT_CKPTS = (
  f"warmup_stage1={RUNS}/warmup_old_stage1",
  f"warmup={RUNS}/warmup_old",
  f"warmup_desc50={RUNS}/warmup_desc50",
  f"random=random:{RUNS}/warmup_old_stage1",
)
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
MLP_WD_GRID = (1e-4, 1e-2, 1e-1)  # AdamW weight decay of the MLP probe
UNIT_SIDE = 3  # merged tokens per side of an 84 px image (checked against the grid)
MERGER_SPEC = "pud,de->pue"  # the PatchMerger's first matmul in `VisionTower.__call__`


# ------------------------------------------------------------------------------------------ data
def read_rows(path: str, n: int) -> tuple[list[Image.Image], list[dict[str, Any]]]:
  """The first `n` rows' images (decoded as the reader does: RGB) and scenes."""
  table = pq.read_table(path, columns=["images", "scene"]).slice(0, n).to_pylist()
  images = [Image.open(io.BytesIO(r["images"][0]["bytes"])).convert("RGB") for r in table]
  return images, [json.loads(r["scene"]) for r in table]


def largest_color(scene: dict[str, Any]) -> str | None:
  """`chain._largest_color` of a scene dict (None where the largest is not clearly the largest)."""
  d = scene["digit"]
  cs = chain.ChainScene(
    synthetic.Scene.from_json(json.dumps(scene)), d["value"], d["x0"], d["y0"], d["w"], d["h"]
  )
  return chain._largest_color(cs)


def targets(scenes: list[dict[str, Any]]) -> dict[str, np.ndarray]:
  """{target: int labels [N]}, -1 where the target is undefined (largest colour only)."""
  shapes = [s["shapes"] for s in scenes]
  out = {
    "digit": [s["digit"]["value"] for s in scenes],
    "count_total": [len(sh) for sh in shapes],
  }
  for c in synthetic.COLORS:
    out[f"count_{c}"] = [sum(x["color"] == c for x in sh) for sh in shapes]
  for k in synthetic.KINDS:
    out[f"count_{k}"] = [sum(x["kind"] == k for x in sh) for sh in shapes]
  colors = list(synthetic.COLORS)
  out["largest_color"] = [
    -1 if (c := largest_color(s)) is None else colors.index(c) for s in scenes
  ]
  return {k: np.asarray(v, np.int32) for k, v in out.items()}


def pixel_patches(processor, images: list[Image.Image]) -> tuple[np.ndarray, tuple[int, ...]]:
  """The processor's patches [N_images, P, patch_dim] and the (shared) grid (t, h, w)."""
  out = processor.image_processor(images=images, return_tensors="np")
  grids = np.asarray(out["image_grid_thw"])
  if not (grids == grids[0]).all():
    raise ValueError(f"images of different grids: {np.unique(grids, axis=0).tolist()}")
  pix = np.asarray(out["pixel_values"], np.float32)
  return pix.reshape(len(images), -1, pix.shape[-1]), tuple(int(g) for g in grids[0])


# -------------------------------------------------------------------------------------- features
def load_model(spec: str, processor_dir: str, seed: int = 0):
  """(model, processor) of a checkpoint, or `random:CKPT`: CKPT's architecture, freshly initialised
  as a run from scratch starts (`qwen.init_model`)."""
  random = spec.startswith("random:")
  policy = ev.load_policy(
    spec.removeprefix("random:"), dtype="float32", processor_dir=processor_dir
  )
  model = qwen.init_model(policy.cfg, "float32", seed=seed) if random else policy.model()
  return model, policy.processor


@contextmanager
def capture_merger_input(store: dict[str, jnp.ndarray]):
  """Records the PatchMerger's input (window order) in `store["pre"]` while tracing the tower."""
  dot = layers.dot

  def spy(spec, a, w, *args, **kw):
    if spec == MERGER_SPEC:
      store["pre"] = a
    return dot(spec, a, w, *args, **kw)

  with mock.patch.object(layers, "dot", spy):
    yield


def batched_vision_inputs(cfg, grid: tuple[int, ...]):
  """(to_inputs, n_units) for images that share one grid: `to_inputs(pix [B, P, patch_dim])` is the
  per-row `VisionInputs` of the B images (patches padded as `prepare_vision` pads one), `n_units`
  the merged tokens per image."""
  one = vision.prepare_vision(
    np.zeros((int(np.prod(grid)), cfg.patch_dim)), np.asarray([grid]), cfg
  )
  n_pad = one.pixel_values.shape[0]

  def to_inputs(pix):
    B, P = pix.shape[:2]
    pix = jnp.pad(pix, ((0, 0), (0, n_pad - P), (0, 0)))
    index = {k: jnp.broadcast_to(v, (B, *v.shape)) for k, v in vars(one).items()}
    return vision.VisionInputs(**{**index, "pixel_values": pix})

  return to_inputs, int(np.prod(grid)) // cfg.merge_unit


def make_encoder(model, grid: tuple[int, ...]):
  """A jitted fn: patches [B, P, patch_dim] -> (merged [B, U, D_out], pre_merger [B, U, mu*D])."""
  to_inputs, n_units = batched_vision_inputs(model.cfg.vision, grid)
  graphdef, state = nnx.split(model)

  @jax.jit
  def encode(state, pix):
    vin = to_inputs(pix)
    store: dict[str, jnp.ndarray] = {}
    with capture_merger_input(store):
      merged = qwen.encode_images(nnx.merge(graphdef, state), vin)
    pre = jnp.take_along_axis(store["pre"], vin.unit_restore[:, :, None], axis=1)
    return merged[:, :n_units], pre[:, :n_units]

  return lambda pix: encode(state, pix)


def features(model, patches: np.ndarray, grid, batch: int) -> dict[str, np.ndarray]:
  """{"merged": [N, U*D_out], "pre_merger": [N, U*mu*D]} of every image, in batches."""
  encode = make_encoder(model, grid)
  parts: dict[str, list[np.ndarray]] = {"merged": [], "pre_merger": []}
  for i in range(0, len(patches), batch):
    chunk = patches[i : i + batch]
    pad = batch - len(chunk)  # one compiled shape
    merged, pre = encode(np.pad(chunk, ((0, pad), (0, 0), (0, 0))))
    parts["merged"].append(np.asarray(merged)[: len(chunk)].reshape(len(chunk), -1))
    parts["pre_merger"].append(np.asarray(pre)[: len(chunk)].reshape(len(chunk), -1))
  return {k: np.concatenate(v) for k, v in parts.items()}


def standardize(fit: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
  """Every array standardised with `fit`'s per-dimension mean and std (constant dims left at 0)."""
  mu, sd = fit.mean(0), fit.std(0)
  sd = np.where(sd > 1e-6 * max(float(sd.max()), 1e-12), sd, np.inf)
  return [((x - mu) / sd).astype(np.float32) for x in (fit, *others)]


# ---------------------------------------------------------------------------------------- probes
def fit_logreg(X: np.ndarray, y: np.ndarray, k: int, l2: float, iters: int) -> np.ndarray:
  """Multinomial logistic regression: mean cross-entropy + l2/2 |W|^2 by L-BFGS; [d+1, k] (bias
  last)."""
  n, d = X.shape
  Y = np.eye(k, dtype=np.float32)[y]

  def loss_grad(theta):
    W = theta.reshape(d + 1, k).astype(np.float32)
    z = X @ W[:d] + W[d]
    z -= z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    g = (np.exp(logp) - Y) / n
    gW = np.concatenate([X.T @ g + l2 * W[:d], g.sum(0, keepdims=True)])
    loss = -(Y * logp).sum() / n + 0.5 * l2 * float((W[:d] ** 2).sum())
    return float(loss), gW.ravel().astype(np.float64)

  res = scipy.optimize.minimize(
    loss_grad, np.zeros((d + 1) * k), jac=True, method="L-BFGS-B", options={"maxiter": iters}
  )
  return res.x.reshape(d + 1, k).astype(np.float32)


def logreg_predictor(X, y, k: int, l2: float, iters: int):
  """`fit_logreg` as a predict function X -> labels."""
  W = fit_logreg(X, y, k, l2, iters)
  return lambda Xq: (Xq @ W[:-1] + W[-1]).argmax(1)


def mlp_predictor(X, y, Xv, yv, k: int, wd: float, hidden: int, epochs: int, seed: int = 0):
  """A one-hidden-layer ReLU MLP fit by minibatch AdamW (weight decay `wd`), kept at its best epoch
  on (Xv, yv); returned as a predict function X -> labels."""
  d = X.shape[1]
  k1, k2 = jax.random.split(jax.random.key(seed))
  params = {
    "w1": jax.random.normal(k1, (d, hidden)) * np.sqrt(2.0 / d),
    "b1": jnp.zeros(hidden),
    "w2": jax.random.normal(k2, (hidden, k)) * np.sqrt(1.0 / hidden),
    "b2": jnp.zeros(k),
  }
  apply = lambda p, x: jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
  opt = optax.adamw(1e-3, weight_decay=wd)

  @jax.jit
  def step(p, s, xb, yb):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(apply(p, xb), yb).mean()
    upd, s = opt.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, upd), s

  predict = jax.jit(lambda p, x: apply(p, x).argmax(1))
  state, rng, bs = opt.init(params), np.random.default_rng(seed), 128
  best = (-1.0, params)
  for _ in range(epochs):
    order = rng.permutation(len(X))
    for i in range(0, len(X) - bs + 1, bs):
      params, state = step(params, state, X[order[i : i + bs]], y[order[i : i + bs]])
    acc = float((np.asarray(predict(params, Xv)) == yv).mean())
    if acc > best[0]:
      best = (acc, params)
  return lambda Xq: np.asarray(predict(best[1], Xq))


def select_and_test(fit, train, val, test, grid) -> dict[str, Any]:
  """`fit(X, y, reg) -> predict` for each strength in `grid`; the best on `val` scores `test`."""
  acc = lambda pred, data: float((pred(data[0]) == data[1]).mean())
  fits = {reg: fit(*train, reg) for reg in grid}
  vals = {reg: acc(pred, val) for reg, pred in fits.items()}
  reg = max(vals, key=vals.get)
  return {"test_acc": acc(fits[reg], test), "val_acc": vals[reg], "reg": reg, "val_by_reg": vals}


def probe_target(feats, ys, n_val: int, args, mlp: bool) -> dict[str, Any]:
  """One target on one feature set: logistic (and optionally MLP) test accuracy, majority baseline.

  The fit rows' last `n_val` (of those where the target is defined) select the regularisation."""
  (Xf, Xt), (yf, yt) = feats, ys
  keep_f, keep_t = yf >= 0, yt >= 0
  Xf, yf, Xt, yt = Xf[keep_f], yf[keep_f], Xt[keep_t], yt[keep_t]
  n_fit = len(yf) - round(n_val * keep_f.mean())
  Xa, Xv, Xt = standardize(Xf[:n_fit], Xf[n_fit:], Xt)
  train, val, test = (Xa, yf[:n_fit]), (Xv, yf[n_fit:]), (Xt, yt)
  k = int(max(yf.max(), yt.max())) + 1
  majority = int(np.bincount(train[1], minlength=k).argmax())
  out = {"n_fit": n_fit, "n_val": len(val[1]), "n_test": len(yt), "classes": k}
  out["majority_acc"] = float((yt == majority).mean())
  logreg = lambda X, y, l2: logreg_predictor(X, y, k, l2, args.iters)
  out["linear"] = select_and_test(logreg, train, val, test, L2_GRID)
  if mlp:
    net = lambda X, y, wd: mlp_predictor(X, y, *val, k, wd, args.hidden, args.epochs)
    out["mlp"] = select_and_test(net, train, val, test, MLP_WD_GRID)
  return out


# ------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--data", default=f"{RUNS}/data", help="folder with train/test parquet + model/")
  ap.add_argument(
    "--ckpt",
    action="append",
    help="NAME=PATH or NAME=random:PATH (PATH's architecture, random init); repeatable",
  )
  ap.add_argument("--n_train", type=int, default=6000, help="first rows of train.parquet to fit")
  ap.add_argument("--n_val", type=int, default=1000, help="of those, the last ones select L2")
  ap.add_argument("--n_test", type=int, default=1024)
  ap.add_argument("--batch", type=int, default=256, help="images per vision-tower call")
  ap.add_argument("--iters", type=int, default=300, help="L-BFGS iterations per fit")
  ap.add_argument("--hidden", type=int, default=256, help="MLP probe width")
  ap.add_argument("--epochs", type=int, default=40, help="MLP probe epochs")
  ap.add_argument("--feature_sets", default="merged,pre_merger")
  ap.add_argument(
    "--pixel_control",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="also probe the raw grey-level pixels (what a probe of this size can read from the input)",
  )
  ap.add_argument("--out", default="experiments/chain_pgpo/setup/vision_probe.json")
  ap.add_argument(
    "--resume",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="keep the entries --out already holds from a run with the same settings",
  )
  return ap.parse_args(argv)


def grey_pixels(images: list[Image.Image]) -> np.ndarray:
  """The raw images as grey levels in [0, 1], flattened: [N, H*W] (the digit is the darkest ink)."""
  return np.stack([np.asarray(im.convert("L"), np.float32).ravel() / 255.0 for im in images])


def token_scale(model, merged: np.ndarray) -> dict[str, float]:
  """Mean L2 norm of a visual token vs of a text-embedding row (what the decoder sees side by side)."""
  d = model.cfg.text.hidden_size
  emb = np.asarray(model.language_model.embed_tokens[...], np.float32)
  return {
    "visual_token_norm": float(np.linalg.norm(merged.reshape(-1, d), axis=1).mean()),
    "text_embed_norm": float(np.linalg.norm(emb, axis=1).mean()),
  }


def digit_unit(images: list[Image.Image], side: int) -> np.ndarray:
  """Row-major index of the merge unit (of a side x side grid) holding most of the digit's ink
  (the pixels of `chain.DIGIT_COLOR`; shapes are drawn aliased in other colours)."""
  out = []
  for im in images:
    ink = (np.asarray(im) == chain.DIGIT_COLOR).all(-1)
    px = ink.shape[0] // side
    out.append(int(ink.reshape(side, px, side, px).sum((1, 3)).argmax()))
  return np.asarray(out)


def unit_features(x: np.ndarray, units: np.ndarray, side: int, image: bool) -> np.ndarray:
  """Each row's features of one merge unit: x is [N, U*d] in unit order, or (image=True) a flat
  [N, H*W] grey image cut into side x side squares."""
  n = len(x)
  if image:
    px = int(round(np.sqrt(x.shape[1]))) // side
    x = x.reshape(n, side, px, side, px).transpose(0, 1, 3, 2, 4)
  return x.reshape(n, side * side, -1)[np.arange(n), units]


def probe_all(train_x, test_x, ys, units, args, image: bool = False) -> dict[str, Any]:
  """Every target on one feature set (the MLP probe for the digit only), plus `digit_local`: the
  digit from the features of the one merge unit holding most of its ink (`units`: train, test)."""
  out = {}
  for t, y in ys.items():
    out[t] = probe_target((train_x, test_x), y, args.n_val, args, mlp=t == "digit")
  local = [unit_features(x, u, UNIT_SIDE, image) for x, u in zip((train_x, test_x), units)]
  out["digit_local"] = probe_target(local, ys["digit"], args.n_val, args, mlp=True)
  return out


def format_table(results: dict[str, Any], feature_set: str) -> str:
  """Rows: targets (linear probe; the digit also with the MLP); columns: the majority baseline, then
  test accuracy per checkpoint that has this feature set."""
  names = [n for n in results if feature_set in results[n]["probes"]]
  probes = [results[n]["probes"][feature_set] for n in names]
  head = f"{'target':<20}{'n':>6}{'major':>7}" + "".join(f"{n[:14]:>15}" for n in names)
  lines = [f"[{feature_set}] probe test accuracy", head]
  for t, r0 in probes[0].items():
    lines.append(
      f"{t:<20}{r0['n_test']:>6}{r0['majority_acc']:>7.3f}"
      + "".join(f"{p[t]['linear']['test_acc']:>15.3f}" for p in probes)
    )
    if "mlp" in r0:
      lines.append(
        f"{'  ' + t + ' (MLP)':<20}{'':>13}"
        + "".join(f"{p[t]['mlp']['test_acc']:>15.3f}" for p in probes)
      )
  return "\n".join(lines)


def load_done(path: str, meta: dict[str, Any]) -> dict[str, Any]:
  """The results already in `path` when it was written with the same settings, else {}."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    old = json.load(f)
  return old["results"] if old.get("args") == meta else {}


def save(path: str, meta: dict[str, Any], results: dict[str, Any]) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump({"args": meta, "results": results}, f, indent=1)
  os.replace(path + ".tmp", path)


def main(argv=None) -> int:
  args = parse_args(argv)
  specs = [s.split("=", 1) for s in (args.ckpt or DEFAULT_CKPTS)]
  feature_sets = args.feature_sets.split(",")
  proc_dir = os.path.join(args.data, "model")
  meta = {k: v for k, v in vars(args).items() if k not in ("ckpt", "out", "resume")}
  results = load_done(args.out, meta) if args.resume else {}
  if results:
    print(f"resuming: {list(results)} already in {args.out}")
  t0 = time.time()
  train_imgs, train_scenes = read_rows(os.path.join(args.data, "train.parquet"), args.n_train)
  test_imgs, test_scenes = read_rows(os.path.join(args.data, "test.parquet"), args.n_test)
  test_ys = targets(test_scenes)
  ys = {k: (v, test_ys[k]) for k, v in targets(train_scenes).items()}
  units = [digit_unit(imgs, UNIT_SIDE) for imgs in (train_imgs, test_imgs)]
  print(f"read {len(train_imgs)} + {len(test_imgs)} rows in {time.time() - t0:.1f}s", flush=True)

  patches = proc_cfg = None
  for name, path in specs:
    if name in results:
      continue
    t1 = time.time()
    model, processor = load_model(path, proc_dir)
    if patches is None:  # the images are processed once: every checkpoint has the same processor
      proc_cfg = processor.image_processor.to_dict()
      patches = [pixel_patches(processor, imgs)[0] for imgs in (train_imgs, test_imgs)]
      grid = pixel_patches(processor, test_imgs[:1])[1]
      print(f"grid (t, h, w) = {grid}, patches/image {patches[0].shape[1:]}", flush=True)
      if grid[1] // processor.image_processor.merge_size != UNIT_SIDE:
        raise ValueError(f"grid {grid}: not {UNIT_SIDE} merged tokens per side")
    if processor.image_processor.to_dict() != proc_cfg:
      raise ValueError(f"{name}: a different image processor than the first checkpoint's")
    feats = [features(model, p, grid, args.batch) for p in patches]
    t_feat = time.time() - t1
    probes = {fs: probe_all(feats[0][fs], feats[1][fs], ys, units, args) for fs in feature_sets}
    results[name] = {
      "checkpoint": path,
      "grid_thw": list(grid),
      "feature_dims": {fs: int(feats[0][fs].shape[1]) for fs in feature_sets},
      **token_scale(model, feats[1]["merged"]),
      "seconds_features": round(t_feat, 1),
      "seconds_total": round(time.time() - t1, 1),
      "probes": probes,
    }
    save(args.out, meta, results)
    print(f"{name}: features {t_feat:.0f}s, all {time.time() - t1:.0f}s", flush=True)

  if args.pixel_control and "pixels" not in results:
    t1 = time.time()
    probes = probe_all(grey_pixels(train_imgs), grey_pixels(test_imgs), ys, units, args, True)
    results["pixels"] = {"checkpoint": None, "seconds_total": round(time.time() - t1, 1)}
    results["pixels"]["probes"] = {"pixels": probes}
    save(args.out, meta, results)
    print(f"pixels: {time.time() - t1:.0f}s", flush=True)

  for fs in feature_sets + (["pixels"] if args.pixel_control else []):
    print("\n" + format_table(results, fs))
  print("\nmean norm of a visual token / of a text embedding row:")
  for name, r in results.items():
    if "visual_token_norm" in r:
      print(f"  {name:<16}{r['visual_token_norm']:>10.2f} / {r['text_embed_norm']:.2f}")
  print(f"\nwrote {args.out} ({time.time() - t0:.0f}s)")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
