"""Token visual dependency of a checkpoint, made visible: the paper's sparsity analysis on any policy.

    from pgpo_jax import evaluation as ev; from pgpo_jax.tools import inspect_dependency as idep
    policy = ev.load_policy("runs/pgpo_3b", dtype="float32")
    spec = idep.dataset_spec("data/mathverse.parquet")
    cfg = idep.InspectConfig(n=20, tau=0.4, beta=2.0)
    records = idep.inspect(policy, spec, cfg)
    summary = idep.summarize(records, cfg)
    idep.write_report(records, summary, "inspect_out")   # index.html, response_*.html, PNGs, JSON

For n prompts, one response each is sampled (temperature 1 by default, or greedy) and scored with the
trainer's dual-condition pass `sequences.score_rollout` (same ids and M-RoPE positions, visual tokens
masked in the blind view; docs/method.md §2), giving per token: log π_I(x_t), log π_∅(x_t), S_t and the
entropy of π_I. As in training, scores are taken at the sampling temperature (logits / T;
`programs.scoring_temperature`): greedy sampling (temperature 0) and worked solutions at temperature 0
are scored at T = 1. The PGPO weights ω̃_t of each response come from `advantages.pgpo_token_weights` with
the given τ, β (docs/method.md §3). Nothing is re-implemented here: the numbers are the trainer's.

Outputs (`write_report`):
- `index.html`: the summary, the plots and one line per response; `response_NNN.html`: the response's
  tokens, each shaded by S (text background, log scale shared by all pages) over a strip shaded by ω̃
  (blue < 1 < red), with every value in the token's tooltip;
- `dependency_hist.png` (S over all tokens, log-log), `weights_hist.png` (ω̃), `dependency_by_category.png`
  (digits / words / punctuation / special / whitespace / other), `sparsity.png` (share of tokens above x,
  share of total S held by the top q% of tokens);
- `summary.json` (sparsity at thresholds, S mass concentration, weight statistics, per-category
  statistics, top tokens) and `tokens.jsonl` (every per-token value, one line per response).

Ground truth (the chain task, `demo_task/chain.py`): with `responses="solution"` each prompt's worked
solution (the data's `solution` column) is scored instead of a sample, its tokens labelled from the
`labels` column's character spans; with `labeler="chain"` sampled responses are labelled by
`chain.label_response`. Labelled records add `summary["ground_truth"]` (`tools/label_metrics.py`: AUC
and precision of S, ω̃ and baselines for finding perception tokens, S and ω̃ per label) and
`dependency_by_label.png` / `weights_by_label.png`.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import logging
import math
import os
import unicodedata
from typing import Any, Sequence

import jax
import numpy as np

from pgpo_jax import evaluation as ev
from pgpo_jax import programs
from pgpo_jax import rewards as rewards_lib
from pgpo_jax.data import hf_processor as processor_lib
from pgpo_jax.data.reader import DatasetReader, DatasetSpec, RawRow
from pgpo_jax.rl import sequences
from pgpo_jax.tools import plotting

log = logging.getLogger("pgpo_jax.inspect_dependency")

CATEGORIES = ("digit", "word", "punctuation", "whitespace", "special", "other")


@dataclasses.dataclass(frozen=True)
class InspectConfig(ev.EvalConfig):
  """The evaluator's sampling settings (one sample per prompt, 8 prompts per call) plus scoring and
  PGPO-weight settings (defaults: the paper's rollout at top-p 1, τ=0.4, β=2).

  n: responses (one per prompt, the first n prompts of the shuffled file).
  temperature: the sampling temperature, also the scoring one (every log-prob, S and entropy are of
    softmax(logits / T), as the trainer scores at the rollout temperature); 0 = greedy sampling,
    scored at T = 1. `responses="solution"` scores the solutions at it too.
  estimator: "k3" (paper) or "full_kl"; clamp_log_ratio / mask_vision_markers: as `pgpo.*`.
  thresholds: S levels of the sparsity statistics.
  responses: "sample" (the policy's own responses) or "solution" (teacher-forced: the data column
    `solution_key`, labelled from the character spans in `labels_key`; the chain task's columns).
  labeler: "" (none) or "chain" (label sampled responses with `chain.label_response`).
  partial_views: also score each response under this many partial blind views, each hiding a
    random `partial_hide` share of the visual tokens (`ResponseRecord.logp_partial`; VPPO masks
    patches at p = 0.5). The hidden tokens are a pure function of (seed, response index, view).
  full_kl_too: with the k3 estimator, also record the full-vocabulary KL (`ResponseRecord.full_kl`).
  """

  k: int = 1
  batch_size: int = 8
  n: int = 20
  tau: float = 0.4
  beta: float = 2.0
  threshold_mode: str = "absolute"
  estimator: str = "k3"
  clamp_log_ratio: float | None = None
  mask_vision_markers: bool = False
  chunk_size: int = 256
  thresholds: tuple[float, ...] = (1e-3, 1e-2, 0.1, 1.0)
  responses: str = "sample"
  labeler: str = ""
  solution_key: str = "solution"
  labels_key: str = "labels"
  partial_views: int = 0
  partial_hide: float = 0.5
  full_kl_too: bool = False

  def __post_init__(self):
    super().__post_init__()
    if self.responses not in ("sample", "solution"):
      raise ValueError(f"responses must be 'sample' or 'solution', got {self.responses!r}")
    if self.labeler not in ("", "chain"):
      raise ValueError(f"labeler must be '' or 'chain', got {self.labeler!r}")
    if self.k != 1:
      raise ValueError(f"the inspector scores one response per prompt: k must be 1, got {self.k}")
    if self.n < 1:
      raise ValueError(f"n must be >= 1, got {self.n}")
    if self.partial_views < 0 or not 0.0 < self.partial_hide < 1.0:
      raise ValueError(
        f"partial_views must be >= 0 and partial_hide in (0, 1), got {self.partial_views}, "
        f"{self.partial_hide}"
      )


@dataclasses.dataclass
class ResponseRecord:
  """One scored response. Per-token lists have the response's length L (stop token included)."""

  index: int
  source: str
  row_index: int
  question: str
  answer: str
  response: str  # decoded without special tokens (what the reward reads)
  accuracy: float
  format: float
  truncated: bool
  token_ids: list[int]
  tokens: list[str]  # each token decoded on its own
  categories: list[str]
  dependency: np.ndarray  # [L] S_t
  logp_image: np.ndarray  # [L] log π_I(x_t)
  logp_blind: np.ndarray  # [L] log π_∅(x_t)
  entropy: np.ndarray  # [L] entropy of π_I
  weights: np.ndarray  # [L] PGPO ω̃_t
  labels: np.ndarray | None = None  # [L] int8 `chain.LABELS` ids, or None (unlabelled)
  logp_partial: np.ndarray | None = None  # [K, L] log π(x_t) under K partial blind views
  full_kl: np.ndarray | None = None  # [L] full-vocabulary KL (InspectConfig.full_kl_too)

  def to_json(self) -> dict[str, Any]:
    d = {k: v for k, v in dataclasses.asdict(self).items() if not isinstance(v, np.ndarray)}
    for k in ("dependency", "logp_image", "logp_blind", "entropy", "weights"):
      d[k] = [float(x) for x in getattr(self, k)]
    d["labels"] = None if self.labels is None else [int(x) for x in self.labels]
    if self.full_kl is not None:
      d["full_kl"] = [float(x) for x in self.full_kl]
    if self.logp_partial is not None:
      d["logp_partial"] = [[float(x) for x in row] for row in self.logp_partial]
    return d


# ------------------------------------------------------------------------------------------------
# Tokens
# ------------------------------------------------------------------------------------------------
def special_ids(tokenizer) -> set[int]:
  ids = set(int(i) for i in tokenizer.all_special_ids)
  for t in processor_lib.SPECIAL_TOKENS:
    tid = tokenizer.convert_tokens_to_ids(t)
    if tid is not None and tid != tokenizer.unk_token_id:
      ids.add(int(tid))
  return ids


def token_category(text: str, special: bool = False) -> str:
  """digit (digits, possibly with . or ,), word (has a letter), punctuation (punctuation and symbols,
  e.g. `{`, `\\`, `=`), whitespace, special (chat/vision control tokens), other."""
  if special:
    return "special"
  s = text.strip()
  if not s:
    return "whitespace"
  if any(c.isdigit() for c in s) and all(c.isdigit() or c in ".," for c in s):
    return "digit"
  if any(c.isalpha() for c in s):
    return "word"
  if all(unicodedata.category(c)[0] in "PS" for c in s):
    return "punctuation"
  return "other"


# ------------------------------------------------------------------------------------------------
# Sampling and scoring
# ------------------------------------------------------------------------------------------------
def dataset_spec(
  path: str,
  *,
  question_key: str | None = None,
  answer_key: str | None = None,
  image_key: str | None = None,
  image_dir: str | None = None,
) -> DatasetSpec:
  """The file's spec with columns detected as in `evaluation.resolve_benchmarks`; rows need an image
  (without one, both views are the same and S is 0)."""
  bench = ev.resolve_benchmarks(
    [path],
    question_key=question_key,
    answer_key=answer_key,
    image_key=image_key,
    image_dir=image_dir,
  )[0]
  if bench.spec.image_key is None:
    raise ValueError(f"{path}: no image column; the dependency S needs images (pass --image_key)")
  return dataclasses.replace(bench.spec, require_images=True)


def inspect(
  policy: ev.Policy,
  spec: DatasetSpec,
  cfg: InspectConfig = InspectConfig(),
  *,
  progress: bool = True,
) -> list[ResponseRecord]:
  """Samples and scores one response for each of the first `cfg.n` prompts of `spec` (one host: a
  diagnostic of tens of responses; `evaluation.evaluate` is the multi-host job)."""
  if jax.process_count() > 1:
    raise NotImplementedError(f"inspect runs on one host; got {jax.process_count()} processes")
  from tqdm import tqdm

  tok = policy.tokenizer
  specials = special_ids(tok)
  reward_fn = rewards_lib.get_batch_reward_fn(cfg.reward)
  # The trainer's scoring program and PGPO's weight function, as `programs.py` builds them.
  score = programs.make_score_program(
    policy.graphdef,
    estimator=cfg.estimator,
    chunk_size=cfg.chunk_size,
    clamp_log_ratio=cfg.clamp_log_ratio,
    temperature=programs.scoring_temperature(cfg.temperature),
  )
  token_weights = programs.make_token_weights_program(threshold_mode=cfg.threshold_mode)
  partial = programs.make_partial_view_program(policy.graphdef, chunk_size=cfg.chunk_size)
  full_kl = None
  if cfg.full_kl_too and cfg.estimator != "full_kl":
    full_kl = programs.make_score_program(
      policy.graphdef, estimator="full_kl", chunk_size=cfg.chunk_size
    )
  it = ev.prompt_iterator(spec, policy.processor, cfg, seed=cfg.seed)
  solutions = _solution_columns(spec, cfg) if cfg.responses == "solution" else None
  key = jax.random.key(cfg.seed)
  records: list[ResponseRecord] = []
  with tqdm(
    total=cfg.n, desc="inspect", unit="response", disable=not progress, dynamic_ncols=True
  ) as bar:
    for pb in it:
      if len(records) >= cfg.n:
        break
      if solutions is None:
        gen = ev.generate_batch(
          policy,
          pb,
          key,
          num_samples=1,
          max_new_tokens=cfg.max_new_tokens,
          sampling=cfg.sampling,
        )
        gold = None
      else:
        gen, gold = _solution_batch(policy, pb, solutions)
      keep = gen.prompts[: cfg.n - len(records)]
      B, N = pb.batch_size, gen.tokens.shape[1]
      resp_BxN = np.full((B, N), policy.cfg.pad_token_id, np.int32)
      mask_BxN = np.zeros(
        (B, N), bool
      )  # filler rows and rows past n are scored with an empty response
      for r, b in enumerate(keep):
        resp_BxN[b], mask_BxN[b] = gen.tokens[r], gen.mask[r]
      seq = sequences.make_sequence_batch(
        policy.cfg,
        pb.input_ids,
        pb.attention_mask,
        pb.pixel_values,
        pb.image_grid_thw,
        resp_BxN,
        mask_BxN,
        prompt_pos=pb.position_ids,
        mask_vision_markers=cfg.mask_vision_markers,
      )
      scores = score(policy.state, seq)
      weights_BxN = token_weights(
        scores.dependency_BxT, seq.flat_response_mask, np.float32(cfg.tau), np.float32(cfg.beta)
      )
      scores, weights_BxN = jax.device_get((scores, weights_BxN))
      kl_BxN = None if full_kl is None else np.asarray(full_kl(policy.state, seq).dependency_BxT)
      partial_KxBxN = []
      for k in range(cfg.partial_views):
        hide = np.zeros(seq.prompt_visual.shape, bool)
        for r, b in enumerate(keep):
          rng = np.random.default_rng([cfg.seed, len(records) + r, k])
          vis = np.asarray(seq.prompt_visual[b])
          hide[b] = vis & (rng.random(vis.shape) < cfg.partial_hide)
        partial_KxBxN.append(np.asarray(partial(policy.state, seq, hide)))
      texts = [tok.decode(resp_BxN[b][mask_BxN[b]], skip_special_tokens=True) for b in keep]
      rewards = reward_fn(texts, [pb.answers[b] for b in keep])
      for r, b in enumerate(keep):
        m = mask_BxN[b]
        ids = [int(t) for t in resp_BxN[b][m]]
        pieces = [tok.decode([t], skip_special_tokens=False) for t in ids]
        if gold is not None:
          labels = gold[b]
        elif cfg.labeler == "chain":
          labels = _label_pieces(pieces, ids, specials)
        else:
          labels = None
        records.append(
          ResponseRecord(
            index=len(records),
            source=pb.sources[b],
            row_index=int(pb.row_indices[b]),
            question=pb.questions[b],
            answer=pb.answers[b],
            response=texts[r],
            accuracy=float(rewards[r]["accuracy"]),
            format=float(rewards[r]["format"]),
            truncated=bool(gen.truncated[r]),
            token_ids=ids,
            tokens=pieces,
            categories=[token_category(p, t in specials) for p, t in zip(pieces, ids)],
            dependency=np.asarray(scores.dependency_BxT[b][m], np.float64),
            logp_image=np.asarray(scores.logp_image_BxT[b][m], np.float64),
            logp_blind=np.asarray(scores.logp_blind_BxT[b][m], np.float64),
            entropy=np.asarray(scores.entropy_BxT[b][m], np.float64),
            weights=np.asarray(weights_BxN[b][m], np.float64),
            labels=labels,
            logp_partial=np.stack([p[b][m] for p in partial_KxBxN]).astype(np.float64)
            if partial_KxBxN
            else None,
            full_kl=None if kl_BxN is None else np.asarray(kl_BxN[b][m], np.float64),
          )
        )
      bar.update(len(keep))
  if len(records) < cfg.n:
    log.warning("inspect: the data gave %d usable prompts, fewer than n=%d", len(records), cfg.n)
  return records


def _solution_columns(spec: DatasetSpec, cfg: InspectConfig) -> dict[str, tuple[list, list]]:
  """{data file: (worked solutions, their JSON label spans)} for `responses="solution"`."""
  from pgpo_jax.data.reader import read_column

  out = {}
  for path in DatasetReader(spec).files:
    sols = read_column(path, cfg.solution_key, what="inspect responses='solution' solution_key")
    spans = read_column(path, cfg.labels_key, what="inspect responses='solution' labels_key")
    out[os.path.abspath(path)] = (sols, spans)
  return out


@dataclasses.dataclass(frozen=True)
class _Forced:
  """The fields of `evaluation.generate_batch`'s result that `inspect` reads, for given responses."""

  prompts: list[int]
  tokens: np.ndarray  # [B, N]
  mask: np.ndarray  # [B, N]
  truncated: np.ndarray  # [B]


def _solution_batch(
  policy: ev.Policy, pb, solutions: dict[str, tuple[list, list]]
) -> tuple[_Forced, dict[int, np.ndarray]]:
  """Each valid prompt's worked solution + stop token as its response, and the tokens' labels."""
  from pgpo_jax.demo_task import labels as labels_lib

  rows, gold = [], {}
  for b in range(pb.batch_size):
    if not pb.prompt_valid[b]:
      continue
    sols, spans = solutions[os.path.abspath(pb.sources[b])]
    i = int(pb.row_indices[b])
    ids, lab = labels_lib.tokenize_with_labels(
      policy.tokenizer, sols[i], [tuple(s) for s in json.loads(spans[i])]
    )
    rows.append((b, ids + [policy.cfg.eos_token_id]))
    gold[b] = np.concatenate([lab, [2]]).astype(np.int8)  # the stop token is format
  N = max((len(ids) for _, ids in rows), default=1)
  tokens = np.full((pb.batch_size, N), policy.cfg.pad_token_id, np.int32)
  mask = np.zeros((pb.batch_size, N), bool)
  for b, ids in rows:
    tokens[b, : len(ids)], mask[b, : len(ids)] = ids, True
  prompts = [b for b, _ in rows]
  forced = _Forced(prompts, tokens[prompts], mask[prompts], np.zeros(len(prompts), bool))
  return forced, gold


def _label_pieces(pieces: Sequence[str], ids: Sequence[int], specials: set[int]) -> np.ndarray:
  """Labels of a sampled response's tokens from `chain.label_response` over its decoded text
  (special tokens, e.g. the stop token, count as format and add no text)."""
  from pgpo_jax.demo_task import chain
  from pgpo_jax.demo_task import labels as labels_lib

  text_pieces = ["" if t in specials else p for p, t in zip(pieces, ids)]
  text = "".join(text_pieces)
  chars = labels_lib.char_labels(len(text), chain.label_response(text))
  return labels_lib.token_labels(labels_lib.offsets_from_pieces(text_pieces), chars)


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------
def _flat(records: Sequence[ResponseRecord], field: str) -> np.ndarray:
  parts = [np.asarray(getattr(r, field), np.float64) for r in records]
  return np.concatenate(parts) if parts else np.zeros(0)


def _stats(x: np.ndarray) -> dict[str, float | None]:
  if not x.size:
    return {"mean": None, "median": None, "p90": None, "p99": None, "max": None}
  return {
    "mean": float(x.mean()),
    "median": float(np.median(x)),
    "p90": float(np.quantile(x, 0.9)),
    "p99": float(np.quantile(x, 0.99)),
    "max": float(x.max()),
  }


def summarize(
  records: Sequence[ResponseRecord],
  cfg: InspectConfig = InspectConfig(),
  *,
  top_k: int = 25,
  min_count: int = 3,
) -> dict[str, Any]:
  """Sparsity and weight statistics over all tokens of all responses (see the module docstring).

  sparsity.share_above[t]: share of tokens with S > t, pooled; per_response_share_above[t]: the same,
  averaged over responses. mass_in_top[q]: share of the total S held by the top q of tokens by S.
  top_tokens: the `top_k` highest-S tokens with context; top_token_strings: token strings seen at least
  `min_count` times, by mean S.
  """
  dep = _flat(records, "dependency")
  w = _flat(records, "weights")
  cats = np.array([c for r in records for c in r.categories])
  order = np.sort(dep)[::-1]
  total = float(order.sum())
  mass = {}
  for q in (0.01, 0.05, 0.1, 0.2):
    top = max(1, int(math.ceil(q * order.size))) if order.size else 0
    mass[f"top{q * 100:g}%"] = float(order[:top].sum() / total) if total > 0 else None
  sparsity = {
    "share_above": {
      f"{t:g}": float((dep > t).mean()) if dep.size else None for t in cfg.thresholds
    },
    "per_response_share_above": {
      f"{t:g}": float(np.mean([(r.dependency > t).mean() for r in records if len(r.dependency)]))
      if records
      else None
      for t in cfg.thresholds
    },
    "share_zero": float((dep < plotting.S_FLOOR).mean()) if dep.size else None,
    "mass_in_top": mass,
  }
  tol = 1e-6
  weights = {
    **_stats(w),
    "min": float(w.min()) if w.size else None,
    "frac_boosted": float((w > 1 + tol).mean()) if w.size else None,
    "frac_suppressed": float((w < 1 - tol).mean()) if w.size else None,
    "frac_zero": float((w <= tol).mean()) if w.size else None,
    "std": float(w.std()) if w.size else None,
  }
  by_cat = {}
  for c in CATEGORIES:
    sel = cats == c
    if not sel.any():
      continue
    by_cat[c] = {
      "count": int(sel.sum()),
      "share_of_tokens": float(sel.mean()),
      "share_of_S": float(dep[sel].sum() / total) if total > 0 else None,
      **{f"S_{k}": v for k, v in _stats(dep[sel]).items()},
      **{f"share_S>{t:g}": float((dep[sel] > t).mean()) for t in cfg.thresholds},
      "mean_weight": float(w[sel].mean()),
    }
  flat_pos = [(r.index, t) for r in records for t in range(len(r.token_ids))]
  top_tokens = []
  for i in np.argsort(-dep, kind="stable")[:top_k]:
    ri, t = flat_pos[int(i)]
    r = records[ri]
    top_tokens.append(
      {
        "text": r.tokens[t],
        "id": r.token_ids[t],
        "S": float(r.dependency[t]),
        "weight": float(r.weights[t]),
        "category": r.categories[t],
        "response": ri,
        "position": t,
        "context": "".join(r.tokens[max(0, t - 6) : t])
        + "[["
        + r.tokens[t]
        + "]]"
        + "".join(r.tokens[t + 1 : t + 4]),
      }
    )
  groups: dict[str, list[float]] = {}
  for r in records:
    for text, s in zip(r.tokens, r.dependency):
      groups.setdefault(text, []).append(float(s))
  strings = [
    {"text": k, "count": len(v), "mean_S": float(np.mean(v)), "max_S": float(np.max(v))}
    for k, v in groups.items()
    if len(v) >= min_count
  ]
  strings.sort(key=lambda x: -x["mean_S"])
  ground_truth = {}
  if any(r.labels is not None for r in records):
    from pgpo_jax.tools import label_metrics

    ground_truth = {"ground_truth": label_metrics.ground_truth_report(records)}
  return {
    **ground_truth,
    "num_responses": len(records),
    "num_tokens": int(dep.size),
    "mean_response_tokens": float(dep.size / len(records)) if records else None,
    "accuracy": float(np.mean([r.accuracy for r in records])) if records else None,
    "dependency": _stats(dep),
    "sparsity": sparsity,
    "weights": weights,
    "by_category": by_cat,
    "top_tokens": top_tokens,
    "top_token_strings": strings[:top_k],
    "config": dataclasses.asdict(cfg),
  }


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
_S_LOW = 1e-4  # S at or below this is white on the pages


def s_color(s: float, s_max: float) -> str:
  """White (S <= 1e-4) to red (S = the largest S of the report), on a log scale."""
  hi = math.log10(max(s_max, _S_LOW * 10))
  t = (math.log10(max(s, _S_LOW)) - math.log10(_S_LOW)) / (hi - math.log10(_S_LOW))
  t = min(max(t, 0.0), 1.0)
  return f"rgb(255,{round(255 - 175 * t)},{round(255 - 225 * t)})"


def w_color(w: float, w_max: float) -> str:
  """Blue for ω̃ < 1 (white at 1, full at 0), red for ω̃ > 1 (full at the report's largest ω̃, log scale)."""
  if w < 1:
    t = min(max(1 - w, 0.0), 1.0)
    return f"rgb({round(255 - 200 * t)},{round(255 - 130 * t)},255)"
  t = min(math.log(w) / math.log(max(w_max, 1.0001)), 1.0) if w > 1 else 0.0
  return f"rgb(255,{round(255 - 210 * t)},{round(255 - 210 * t)})"


_CSS = """
body{font-family:system-ui,sans-serif;margin:20px;max-width:1200px;color:#222}
.toks{line-height:1.15;border:1px solid #ddd;padding:8px;background:#fafafa}
.tok{display:inline-flex;flex-direction:column;vertical-align:top;margin:0 0 3px 0}
.tok .s{white-space:pre;font-family:ui-monospace,monospace;font-size:13px;padding:1px 0}
.tok .w{height:6px}
.tok:hover{outline:1px solid #000}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}
td.l,th.l{text-align:left}.legend span{display:inline-block;width:34px;height:12px;border:1px solid #ccc}
img.plot{max-width:49%;border:1px solid #eee}.q{white-space:pre-wrap;background:#f4f4f4;padding:6px}
"""


def _thumb(image) -> str:
  img = image.copy()
  img.thumbnail((384, 384))
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _legend(s_max: float, w_max: float) -> str:
  s_vals = [0, 1e-3, 1e-2, 1e-1, 1, s_max]
  w_vals = [0, 0.5, 1, 2, w_max]
  box = lambda color, v: f'<span style="background:{color}"></span> {v:.3g} '  # noqa: E731
  s = "".join(box(s_color(v, s_max), v) for v in sorted(set(s_vals)) if v <= s_max)
  w = "".join(box(w_color(v, w_max), v) for v in sorted(set(w_vals)) if v <= w_max)
  return (
    f'<p class="legend">text background = S (log scale): {s}<br>strip under each token = PGPO weight ω̃: '
    f'{w}<br>Hover a token for its values.</p>'
  )


def _response_page(
  r: ResponseRecord, s_max: float, w_max: float, image_uri: str | None, cfg: InspectConfig, n: int
) -> str:
  esc = html.escape
  toks = []
  for t, (text, tid, cat) in enumerate(zip(r.tokens, r.token_ids, r.categories)):
    s, w = float(r.dependency[t]), float(r.weights[t])
    d = float(r.logp_image[t] - r.logp_blind[t])
    tip = (
      f"#{t} id={tid} {text!r} [{cat}]\nS={s:.4g}   d=log πI−log π∅={d:.4g}\n"
      f"log πI={r.logp_image[t]:.4f}   log π∅={r.logp_blind[t]:.4f}\n"
      f"entropy={r.entropy[t]:.3f}   ω̃={w:.4f}"
    )
    shown = text.replace("\n", "↵").replace("\t", "→") if text else "∅"
    toks.append(
      f'<span class="tok" title="{esc(tip)}"><span class="s" style="background:{s_color(s, s_max)}">'
      f'{esc(shown)}</span><span class="w" style="background:{w_color(w, w_max)}"></span></span>'
    )
    if "\n" in text:
      toks.append("<br>")
  top = np.argsort(-r.dependency, kind="stable")[:15]
  rows = "".join(
    f'<tr><td>{t}</td><td class="l">{esc(repr(r.tokens[t]))}</td><td class="l">{r.categories[t]}</td>'
    f'<td>{r.dependency[t]:.4g}</td><td>{r.weights[t]:.3f}</td></tr>'
    for t in top
  )
  L = len(r.token_ids)
  share = " · ".join(
    f"S&gt;{t:g}: {100 * float((r.dependency > t).mean()) if L else 0:.1f}%" for t in cfg.thresholds
  )
  nav = (
    '<a href="index.html">index</a>'
    + (f' · <a href="response_{r.index - 1:03d}.html">previous</a>' if r.index > 0 else "")
    + (f' · <a href="response_{r.index + 1:03d}.html">next</a>' if r.index + 1 < n else "")
  )
  img = (
    f'<img src="{image_uri}" style="float:right;max-width:320px;margin-left:12px">'
    if image_uri
    else ""
  )
  return f"""<!doctype html><html><head><meta charset="utf-8"><title>response {r.index}</title>
<style>{_CSS}</style></head><body>
<p>{nav}</p>{img}
<h2>Response {r.index}</h2>
<p>{esc(r.source)} row {r.row_index} · {L} tokens{' (truncated)' if r.truncated else ''} · accuracy
{r.accuracy:g} · format {r.format:g} · gold <b>{esc(r.answer)}</b> · predicted
<b>{esc(str(rewards_lib.extract_boxed(r.response)))}</b></p>
<p>max S {r.dependency.max() if L else 0:.4g} · mean S {r.dependency.mean() if L else 0:.4g} · {share} ·
max ω̃ {r.weights.max() if L else 0:.3f}</p>
<div class="q"><b>Question:</b> {esc(r.question)}</div>
<div style="clear:both"></div>
{_legend(s_max, w_max)}
<div class="toks">{''.join(toks)}</div>
<h3>Highest-S tokens</h3>
<table><tr><th>pos</th><th class="l">token</th><th class="l">category</th><th>S</th><th>ω̃</th></tr>{rows}</table>
</body></html>"""


def _ground_truth_html(gt: dict[str, Any]) -> str:
  """The index page's "finding perception tokens" section: how many responses the numbers rest on
  and why the others add nothing (`label_metrics.coverage_text`), then the scorers' table, or, when
  no score can be ranked, the reason instead of a table ("-": not computable, e.g. no response with
  both perception and other tokens)."""
  from pgpo_jax.tools import label_metrics

  esc = html.escape
  head = "<h3>Finding perception tokens (labelled responses)</h3>"
  scorers = gt.get("scorers")
  if not scorers:
    return f"{head}<p>No scores: {esc(gt['unscored_reason'])}.</p>"
  cells = "".join(
    f'<tr><td class="l">{esc(k)}</td>'
    + "".join(f"<td>{v[f]:.3f}</td>" if v[f] is not None else "<td>-</td>" for f in v)
    + "</tr>"
    for k, v in scorers.items()
  )
  heads = "".join(f"<th>{esc(f)}</th>" for f in next(iter(scorers.values())))
  coverage = label_metrics.coverage_text(gt["coverage"])
  return (
    f"{head}<p>{esc(coverage)}; pooled over {gt['num_tokens']} tokens of {gt['num_responses']} "
    f'labelled responses, {gt["num_perception"]} of them perception.</p><table><tr><th class="l">'
    f"score</th>{heads}</tr>{cells}</table>"
  )


def _index_page(
  records: Sequence[ResponseRecord], summary: dict[str, Any], plots: Sequence[str], title: str
) -> str:
  esc = html.escape
  sp = summary["sparsity"]
  share = " · ".join(
    f"S&gt;{k}: {100 * v:.2f}%" for k, v in sp["share_above"].items() if v is not None
  )
  mass = " · ".join(f"{k}: {100 * v:.1f}%" for k, v in sp["mass_in_top"].items() if v is not None)
  wt = summary["weights"]
  head = "".join(f"<th>S&gt;{t:g}</th>" for t in summary["config"]["thresholds"])
  rows = []
  for r in records:
    L = len(r.token_ids)
    cells = "".join(
      f"<td>{100 * float((r.dependency > t).mean()) if L else 0:.1f}%</td>"
      for t in summary["config"]["thresholds"]
    )
    rows.append(
      f'<tr><td><a href="response_{r.index:03d}.html">{r.index}</a></td><td class="l">'
      f'{esc(os.path.basename(r.source))}:{r.row_index}</td><td class="l">{esc(r.answer[:30])}</td>'
      f'<td>{r.accuracy:g}</td><td>{L}</td><td>{r.dependency.mean() if L else 0:.3g}</td>'
      f'<td>{r.dependency.max() if L else 0:.3g}</td>{cells}<td>{r.weights.max() if L else 0:.2f}</td></tr>'
    )
  cats = "".join(
    f'<tr><td class="l">{c}</td><td>{v["count"]}</td><td>{100 * v["share_of_tokens"]:.1f}%</td>'
    f'<td>{v["S_mean"]:.4g}</td><td>{v["S_median"]:.3g}</td><td>{v["mean_weight"]:.3f}</td></tr>'
    for c, v in summary["by_category"].items()
  )
  imgs = "".join(f'<img class="plot" src="{os.path.basename(p)}">' for p in plots)
  if "ground_truth" in summary:
    imgs = _ground_truth_html(summary["ground_truth"]) + imgs
  return f"""<!doctype html><html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>{_CSS}</style></head><body>
<h1>Visual dependency: {esc(title)}</h1>
<p>{summary['num_responses']} responses, {summary['num_tokens']} tokens, accuracy {summary['accuracy'] or 0:.3f};
estimator {summary['config']['estimator']}, τ={summary['config']['tau']:g}, β={summary['config']['beta']:g},
sampled at temperature {summary['config']['temperature']:g}, scored at
{programs.scoring_temperature(summary['config']['temperature']):g}.</p>
<p><b>Sparsity</b> (share of tokens): {share}<br><b>Share of total S</b> held by the top tokens: {mass}<br>
<b>Weights</b>: {100 * (wt['frac_boosted'] or 0):.1f}% boosted, {100 * (wt['frac_suppressed'] or 0):.1f}% suppressed,
max {wt['max'] or 0:.2f}</p>
{imgs}
<h3>By token category</h3>
<table><tr><th class="l">category</th><th>tokens</th><th>share</th><th>mean S</th><th>median S</th>
<th>mean ω̃</th></tr>{cats}</table>
<h3>Responses</h3>
<table><tr><th>#</th><th class="l">row</th><th class="l">gold</th><th>acc</th><th>tokens</th><th>mean S</th>
<th>max S</th>{head}<th>max ω̃</th></tr>{''.join(rows)}</table>
</body></html>"""


def write_report(
  records: Sequence[ResponseRecord],
  summary: dict[str, Any],
  out_dir: str | os.PathLike,
  *,
  spec: DatasetSpec | None = None,
  title: str = "",
) -> dict[str, Any]:
  """Writes the HTML pages, the PNG plots, summary.json and tokens.jsonl; returns their paths.

  With `spec`, each page shows the prompt's image (re-read from the data file).
  """
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  cfg = summary["config"]
  dep, w = _flat(records, "dependency"), _flat(records, "weights")
  cats = [c for r in records for c in r.categories]
  plots = {
    name: os.path.join(out_dir, name)
    for name in (
      "dependency_hist.png",
      "weights_hist.png",
      "dependency_by_category.png",
      "sparsity.png",
    )
  }
  plotting.plot_dependency_histogram(
    dep, plots["dependency_hist.png"], thresholds=cfg["thresholds"]
  )
  plotting.plot_weight_histogram(w, plots["weights_hist.png"], tau=cfg["tau"], beta=cfg["beta"])
  plotting.plot_dependency_by_category(
    dep, cats, plots["dependency_by_category.png"], order=CATEGORIES
  )
  plotting.plot_sparsity(dep, plots["sparsity.png"])
  labelled = [r for r in records if r.labels is not None]
  if labelled:
    from pgpo_jax.demo_task.chain import LABELS

    names = [LABELS[int(x)] for r in labelled for x in r.labels]
    for name, field, value_name, log_scale in (
      ("dependency_by_label.png", "dependency", "S", True),
      ("weights_by_label.png", "weights", "ω̃", False),
    ):
      plots[name] = os.path.join(out_dir, name)
      plotting.plot_dependency_by_category(
        _flat(labelled, field),
        names,
        plots[name],
        order=LABELS,
        value_name=value_name,
        log=log_scale,
      )
  s_max = float(dep.max()) if dep.size else 1.0
  w_max = float(w.max()) if w.size else 1.0
  readers: dict[str, DatasetReader] = {}
  pages = []
  for r in records:
    uri = None
    if spec is not None:
      if r.source not in readers:
        readers[r.source] = DatasetReader(dataclasses.replace(spec, paths=(r.source,)))
      row = readers[r.source].load(r.row_index)
      if isinstance(row, RawRow) and row.images:
        uri = _thumb(row.images[0])
    page = os.path.join(out_dir, f"response_{r.index:03d}.html")
    with open(page, "w", encoding="utf-8") as f:
      f.write(_response_page(r, s_max, w_max, uri, _cfg_from_dict(cfg), len(records)))
    pages.append(page)
  index = os.path.join(out_dir, "index.html")
  with open(index, "w", encoding="utf-8") as f:
    f.write(_index_page(records, summary, list(plots.values()), title or out_dir))
  summary_path = os.path.join(out_dir, "summary.json")
  with open(summary_path, "w", encoding="utf-8") as f:
    json.dump(ev.json_safe(summary), f, indent=2, ensure_ascii=False)
  tokens_path = os.path.join(out_dir, "tokens.jsonl")
  with open(tokens_path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
  return {
    "index": index,
    "pages": pages,
    "plots": list(plots.values()),
    "summary": summary_path,
    "tokens": tokens_path,
  }


def _cfg_from_dict(d: dict[str, Any]) -> InspectConfig:
  return InspectConfig(**{**d, "thresholds": tuple(d["thresholds"])})


def read_tokens(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The per-response records of a `tokens.jsonl`."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
