"""PNG plots: training curves of one or more runs, and the token-dependency figures of the inspector.

    from pgpo_jax.tools import plotting
    runs = plotting.parse_runs(["runs/dapo", "pgpo=runs/pgpo_7b"])   # (label, metrics.jsonl) pairs
    plotting.plot_runs(runs, "plots/")                                # reward.png, entropy.png, ...

Training curves read `WORKDIR/metrics.jsonl` (one JSON object per step, see `train_metrics.MetricsLog`).
Keys may be missing from some rows (eval metrics every `eval_every` steps) or null (non-finite values):
each series keeps only its finite points, a subplot is drawn when at least one run has the key, a file
when at least one of its subplots is. Rows logged again after a resume replace the earlier ones.

matplotlib runs with the Agg backend (no display), imported on first use.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

log = logging.getLogger("pgpo_jax.plotting")


def pyplot():
  """matplotlib.pyplot on the Agg backend."""
  import matplotlib

  matplotlib.use("Agg", force=True)
  import matplotlib.pyplot as plt

  return plt


# ------------------------------------------------------------------------------------------------
# Training curves
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Panel:
  """One PNG: a subplot per metric key; `log_y` uses a log axis where all values are positive."""

  filename: str
  title: str
  keys: tuple[str, ...]
  log_y: bool = False


PANELS: tuple[Panel, ...] = (
  Panel(
    "overview.png",
    "Overview",
    (
      "reward/overall",
      "reward/accuracy",
      "eval/accuracy",
      "entropy/scoring",
      "train/grad_norm",
      "dependency/mean",
      "response/length_mean",
      "pgpo/max_weight",
    ),
  ),
  Panel("reward.png", "Reward", ("reward/overall", "reward/accuracy", "reward/format")),
  Panel("eval_accuracy.png", "Held-out accuracy", ("eval/accuracy", "eval/format")),
  Panel("entropy.png", "Policy entropy", ("entropy/scoring", "train/entropy")),
  Panel(
    "grad_norm.png",
    "Gradient norm",
    ("train/grad_norm", "train/grad_norm_max", "train/update_norm"),
    log_y=True,
  ),
  Panel("loss.png", "Loss", ("train/loss", "train/clip_frac", "train/approx_kl")),
  Panel("dependency.png", "Visual dependency S", ("dependency/mean", "dependency/max"), log_y=True),
  Panel(
    "pgpo_weights.png",
    "PGPO token weights",
    (
      "pgpo/max_weight",
      "pgpo/frac_boosted",
      "pgpo/frac_suppressed",
      "pgpo/frac_zero",
      "pgpo/std_weight",
      "pgpo/norm_entropy",
    ),
  ),
  Panel("response_length.png", "Responses", ("response/length_mean", "response/truncated_share")),
  Panel(
    "dynamic_sampling.png",
    "Dynamic sampling",
    ("dynamic_sampling/kept_share", "dynamic_sampling/rounds", "dynamic_sampling/filled"),
  ),
  Panel(
    "time.png", "Seconds per step", ("time/step", "time/rollout", "time/scoring", "time/update")
  ),
)


def metrics_path(path: str | os.PathLike) -> str:
  """A run's metrics file: `path` itself, or `path/metrics.jsonl` for a WORKDIR."""
  path = os.fspath(path)
  f = os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path
  if not os.path.isfile(f):
    raise FileNotFoundError(
      f"{path}: no metrics file (expected a WORKDIR with metrics.jsonl, or the file)"
    )
  return f


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Rows of a metrics.jsonl (WORKDIR or file), sorted by step; a later row of a step replaces an earlier
  one; unreadable lines are skipped with a warning naming the file and line."""
  f = metrics_path(path)
  by_step: dict[Any, dict[str, Any]] = {}
  with open(f, encoding="utf-8") as fh:
    for i, line in enumerate(fh, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        log.warning("%s:%d: skipping an unreadable line (%s)", f, i, e)
        continue
      if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)):
        log.warning("%s:%d: skipping a row without a numeric 'step'", f, i)
        continue
      by_step[row["step"]] = {**by_step.get(row["step"], {}), **row}
  return [by_step[s] for s in sorted(by_step)]


def parse_runs(args: Sequence[str]) -> list[tuple[str, str]]:
  """['runs/a', 'b=runs/x'] -> [('a', 'runs/a/metrics.jsonl'), ('b', 'runs/x/metrics.jsonl')].

  The default label is the WORKDIR's folder name (the parent folder's for a metrics file); repeated
  labels get a numeric suffix.
  """
  out, seen = [], {}
  for a in args:
    label, sep, path = a.partition("=")
    if not sep or not label or os.path.exists(a):
      label, path = "", a
    f = metrics_path(path)
    if not label:
      label = os.path.basename(os.path.dirname(os.path.abspath(f)))
    n = seen.get(label, 0)
    seen[label] = n + 1
    out.append((label if n == 0 else f"{label}#{n + 1}", f))
  return out


def series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of the rows holding a finite number under `key`."""
  steps, vals = [], []
  for r in rows:
    v = r.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      continue
    steps.append(r["step"])
    vals.append(float(v))
  return np.asarray(steps, np.float64), np.asarray(vals, np.float64)


def _smooth(v: np.ndarray, window: int) -> np.ndarray:
  """Trailing mean over `window` points (shorter at the start)."""
  if window <= 1 or len(v) < 2:
    return v
  c = np.cumsum(np.insert(v, 0, 0.0))
  idx = np.arange(1, len(v) + 1)
  lo = np.maximum(idx - window, 0)
  return (c[idx] - c[lo]) / (idx - lo)


def plot_panel(
  runs: Sequence[tuple[str, Sequence[Mapping[str, Any]]]],
  panel: Panel,
  path: str,
  *,
  smooth: int = 1,
) -> bool:
  """Draws `panel` for the (label, rows) runs into `path`; False (nothing written) without data."""
  keys = [k for k in panel.keys if any(len(series(rows, k)[0]) for _, rows in runs)]
  if not keys:
    return False
  plt = pyplot()
  ncols = 1 if len(keys) == 1 else 2 if len(keys) in (2, 4) else 3
  nrows = -(-len(keys) // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.4 * nrows), squeeze=False)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for ax, key in zip(axes.flat, keys):
    positive = True
    for i, (label, rows) in enumerate(runs):
      x, y = series(rows, key)
      if not len(x):
        continue
      positive &= bool((y > 0).all())
      color = colors[i % len(colors)]
      sparse = len(x) <= 30 and len(rows) > 2 * len(x)  # e.g. eval every N steps: show the points
      if smooth > 1 and len(x) > smooth:
        ax.plot(x, y, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(x, _smooth(y, smooth), color=color, label=label, linewidth=1.6)
      else:
        ax.plot(
          x,
          y,
          "o-" if sparse or len(x) == 1 else "-",
          color=color,
          label=label,
          linewidth=1.4,
          markersize=3.5,
        )
    if panel.log_y and positive:
      ax.set_yscale("log")
    ax.set_title(key, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(keys) :]:
    ax.axis("off")
  handles, labels = axes.flat[0].get_legend_handles_labels()
  for ax in list(axes.flat)[
    1 : len(keys)
  ]:  # a run may miss the first key: collect every label once
    for h, l in zip(*ax.get_legend_handles_labels()):
      if l not in labels:
        handles.append(h)
        labels.append(l)
  fig.suptitle(panel.title)
  width = fig.get_size_inches()[0]
  right = 1.0
  if (
    labels
  ):  # the legend sits in a right margin sized for the longest label (about 0.08 inch a character)
    right = 1 - (0.6 + 0.08 * max(len(l) for l in labels)) / width
    fig.legend(handles, labels, loc="center right", fontsize=9, framealpha=0.8)
  fig.tight_layout(rect=(0, 0, max(right, 0.6), 0.96 if nrows > 1 else 0.93))
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def plot_runs(
  runs: Sequence[tuple[str, str]],
  out_dir: str | os.PathLike,
  *,
  panels: Sequence[Panel] = PANELS,
  smooth: int = 1,
) -> list[str]:
  """PNG files of `panels` for (label, metrics path) runs, overlaid; returns the paths written."""
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  loaded = [(label, read_metrics(path)) for label, path in runs]
  for label, rows in loaded:
    if not rows:
      log.warning("run %s has no metrics rows", label)
  written = []
  for panel in panels:
    path = os.path.join(out_dir, panel.filename)
    if plot_panel(loaded, panel, path, smooth=smooth):
      written.append(path)
    else:
      log.info("%s: no run has any of %s; not drawn", panel.filename, panel.keys)
  return written


# ------------------------------------------------------------------------------------------------
# Token-dependency figures (scripts/inspect_dependency.py)
# ------------------------------------------------------------------------------------------------
S_FLOOR = 1e-8  # S below this is drawn in the first bin (k3 of an exact tie is 0)


def plot_dependency_histogram(
  dep: np.ndarray, path: str, *, thresholds: Sequence[float] = ()
) -> None:
  """Histogram of S over all tokens on log-log axes, thresholds marked with their token shares."""
  plt = pyplot()
  dep = np.asarray(dep, np.float64).ravel()
  dep = dep[np.isfinite(dep)]
  fig, ax = plt.subplots(figsize=(7, 4.2))
  if dep.size:
    hi = max(float(dep.max()), S_FLOOR * 10)
    bins = np.logspace(math.log10(S_FLOOR), math.log10(hi) + 1e-9, 60)
    ax.hist(np.clip(dep, S_FLOOR, None), bins=bins, color="#d9480f", alpha=0.85)
    ax.set_xscale("log")
    ax.set_yscale("log")
    for t in thresholds:
      share = float((dep > t).mean())
      ax.axvline(t, color="k", linestyle="--", linewidth=0.8)
      ax.text(
        t,
        ax.get_ylim()[1] * 0.5,
        f" S>{t:g}: {100 * share:.1f}%",
        fontsize=8,
        rotation=90,
        va="top",
      )
  n_floor = int((dep < S_FLOOR).sum())
  ax.set_xlabel(f"visual dependency S (values < {S_FLOOR:g} in the first bin: {n_floor})")
  ax.set_ylabel("tokens")
  ax.set_title(f"S over {dep.size} response tokens")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_weight_histogram(
  weights: np.ndarray, path: str, *, tau: float | None = None, beta: float | None = None
) -> None:
  """Distribution of the PGPO token weights ω̃ (log count axis), ω̃ = 1 marked."""
  plt = pyplot()
  w = np.asarray(weights, np.float64).ravel()
  w = w[np.isfinite(w)]
  fig, ax = plt.subplots(figsize=(7, 4.2))
  if w.size:
    ax.hist(w, bins=60, color="#1c7ed6", alpha=0.85)
    ax.set_yscale("log")
    ax.axvline(1.0, color="k", linestyle="--", linewidth=0.8)
  params = "" if tau is None else f" (τ={tau:g}, β={beta:g})"
  frac = (lambda c: 100 * float(c.mean())) if w.size else (lambda c: float("nan"))
  ax.set_title(
    f"PGPO weights ω̃{params}: {frac(w > 1 + 1e-6):.1f}% boosted, {frac(w < 1 - 1e-6):.1f}% "
    f"suppressed, max {w.max() if w.size else float('nan'):.2f}",
    fontsize=10,
  )
  ax.set_xlabel("ω̃ (mean 1 per response)")
  ax.set_ylabel("tokens")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_dependency_by_category(
  dep: np.ndarray,
  categories: Sequence[str],
  path: str,
  *,
  order: Sequence[str] | None = None,
  value_name: str = "S",
  log: bool = True,
) -> None:
  """Box plot of log10 S (or, `log=False`, of the value itself) per token category (with counts) and
  the mean per category. `value_name` names the value (e.g. ω̃ for the PGPO weights)."""
  plt = pyplot()
  dep = np.asarray(dep, np.float64).ravel()
  cats = np.asarray(categories)
  names = [c for c in (order or sorted(set(cats.tolist()))) if (cats == c).any()]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
  shown = (lambda x: np.log10(np.clip(x, S_FLOOR, None))) if log else (lambda x: x)
  data = [shown(dep[cats == c]) for c in names]
  if names:
    ax1.boxplot(data, showfliers=True, flierprops={"markersize": 2, "alpha": 0.4})
    ax1.set_xticks(
      range(1, len(names) + 1), [f"{c}\n(n={len(d)})" for c, d in zip(names, data)], fontsize=8
    )
    ax2.bar(range(len(names)), [float(dep[cats == c].mean()) for c in names], color="#d9480f")
    ax2.set_xticks(range(len(names)), names, fontsize=8)
  ax1.set_ylabel(f"log10 {value_name}" if log else value_name)
  ax1.set_title(f"{value_name} by token category")
  ax2.set_ylabel(f"mean {value_name}")
  ax2.set_title(f"mean {value_name} by token category")
  for ax in (ax1, ax2):
    ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_sparsity(dep: np.ndarray, path: str) -> None:
  """Sparsity of S: share of tokens above x (left) and share of the total S in the top q% tokens (right)."""
  plt = pyplot()
  dep = np.sort(np.asarray(dep, np.float64).ravel())[::-1]
  dep = dep[np.isfinite(dep)]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
  if dep.size:
    xs = np.logspace(math.log10(S_FLOOR), math.log10(max(dep[0], S_FLOOR * 10)), 200)
    ax1.plot(xs, [(dep > x).mean() for x in xs], color="#d9480f")
    ax1.set_xscale("log")
    total = dep.sum()
    share = np.cumsum(dep) / total if total > 0 else np.zeros_like(dep)
    q = np.arange(1, dep.size + 1) / dep.size
    ax2.plot(100 * q, 100 * share, color="#d9480f")
    ax2.plot([0, 100], [0, 100], color="gray", linestyle=":", linewidth=0.8)
  ax1.set_xlabel("x")
  ax1.set_ylabel("share of tokens with S > x")
  ax1.set_title("complementary CDF of S")
  ax2.set_xlabel("top q% of tokens by S")
  ax2.set_ylabel("% of total S")
  ax2.set_title("concentration of S")
  for ax in (ax1, ax2):
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
