"""The reasoning-chain variant of the synthetic task: a few image facts, then image-free arithmetic.

Each example is one image (the shapes of `synthetic.py` plus one digit drawn as a seven-segment glyph)
and one question that needs 1-3 facts read from the image (a count by colour or kind, the total count,
the drawn number, the colour of the largest shape, a left/right/above/below relation) combined by
several arithmetic or logic steps that do not need the image. The worked response reads the facts
first, then computes:

    <think>First I read the image. The number drawn is 7. I count 2 red shapes. So a = 7 and b = 2.
    Now I compute. 7 + 2 = 9. 9 + 4 = 13. 13 - 3 = 10. 10 + 1 = 11. So the answer is 11.</think>
    \\boxed{11}

Every response character carries one of three labels, recorded as character spans of the worked
solution while it is built (never recovered from the text afterwards):
- **perception**: the value of an image fact where the response first states it (the `7`, the `2`,
  a colour word, a yes/no). Only these tokens need the image; everything after them can be predicted
  from the text so far.
- **format**: the `<think>` / `</think>` tags and the `\\boxed{` `}` wrapper (and the stop token,
  added at tokenisation).
- **reasoning**: everything else (copied values, arithmetic, connecting words, the boxed answer).

`label_response(text)` re-derives the same spans from any text in the chain format (a sampled response),
so a policy's own responses can be labelled; on a worked solution it returns exactly the built spans
(tested). Answers are non-negative integers, scored by `pgpo_jax.rewards`.

Row layout: `synthetic.PARQUET_SCHEMA` plus `labels`, the spans as JSON `[[start, end, label], ...]`
(character offsets into `solution`, labels as in `LABELS`, reasoning spans omitted). `scene` holds the
shapes and the digit (`ChainScene.to_json`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from pgpo_jax.demo_task import synthetic

LABELS: tuple[str, ...] = ("perception", "reasoning", "format")
PERCEPTION, REASONING, FORMAT = 0, 1, 2
QTYPES: tuple[str, ...] = ("arith1", "arith2", "arith3", "cond_largest", "cond_relation")
DIGIT_COLOR: tuple[int, int, int] = (30, 30, 30)
# Seven-segment glyphs: a top, b top-right, c bottom-right, d bottom, e bottom-left, f top-left, g middle.
SEGMENTS: dict[int, str] = {
  0: "abcdef",
  1: "bc",
  2: "abged",
  3: "abgcd",
  4: "fgbc",
  5: "afgcd",
  6: "afgedc",
  7: "abc",
  8: "abcdefg",
  9: "abcdfg",
}
PARQUET_SCHEMA = pa.schema([*synthetic.PARQUET_SCHEMA, ("labels", pa.string())])
Span = tuple[int, int, int]  # [start, end) in characters, label id


@dataclasses.dataclass(frozen=True)
class ChainScene:
  """The shapes plus one digit drawn in the box [dx0, dx0+dw) x [dy0, dy0+dh) (pixels)."""

  scene: synthetic.Scene
  digit: int
  dx0: int
  dy0: int
  dw: int
  dh: int

  def to_json(self) -> str:
    d = json.loads(self.scene.to_json())
    d["digit"] = {"value": self.digit, "x0": self.dx0, "y0": self.dy0, "w": self.dw, "h": self.dh}
    return json.dumps(d, sort_keys=True)


@dataclasses.dataclass(frozen=True)
class ChainExample:
  scene: ChainScene
  qtype: str
  question: str
  answer: str
  solution: str
  spans: tuple[Span, ...]  # perception and format spans of `solution`, in order
  describe: bool = False  # the solution states every fact of the image (`sample_chain_example`)


# --------------------------------------------------------------------------------------------- images


def _digit_box(image_size: int) -> tuple[int, int]:
  w = max(8, round(0.16 * image_size))
  return w, 2 * w - 2


def sample_chain_scene(rng: np.random.Generator, image_size: int = 84) -> ChainScene:
  """`synthetic.sample_scene` plus a digit 0-9 placed in free space (scenes resampled until it fits)."""
  dw, dh = _digit_box(image_size)
  for _ in range(synthetic.MAX_TRIES):
    scene = synthetic.sample_scene(rng, image_size)
    digit = int(rng.integers(10))
    for _ in range(50):
      x0 = 2 + int(rng.integers(0, image_size - 4 - dw + 1))
      y0 = 2 + int(rng.integers(0, image_size - 4 - dh + 1))
      gap = synthetic.GAP_PX
      if not any(
        x0 < s.x0 + s.size + gap
        and s.x0 < x0 + dw + gap
        and y0 < s.y0 + s.size + gap
        and s.y0 < y0 + dh + gap
        for s in scene.shapes
      ):
        return ChainScene(scene, digit, x0, y0, dw, dh)
  raise RuntimeError(f"chain: no room for a digit in a {image_size}px image")


def draw_chain_scene(cs: ChainScene) -> Image.Image:
  """The shapes, then the digit's segments as filled rectangles (aliased, one colour)."""
  img = synthetic.draw_scene(cs.scene)
  draw = ImageDraw.Draw(img)
  x0, y0, w, h = cs.dx0, cs.dy0, cs.dw, cs.dh
  t = max(2, w // 4)  # stroke
  x1, y1, ym = x0 + w - 1, y0 + h - 1, y0 + (h - t) // 2
  rects = {
    "a": (x0, y0, x1, y0 + t - 1),
    "d": (x0, y1 - t + 1, x1, y1),
    "g": (x0, ym, x1, ym + t - 1),
    "f": (x0, y0, x0 + t - 1, ym + t - 1),
    "b": (x1 - t + 1, y0, x1, ym + t - 1),
    "e": (x0, ym, x0 + t - 1, y1),
    "c": (x1 - t + 1, ym, x1, y1),
  }
  for seg in SEGMENTS[cs.digit]:
    draw.rectangle(rects[seg], fill=DIGIT_COLOR)
  return img


# ------------------------------------------------------------------------------------ worked solutions


class _Builder:
  """Accumulates the solution text piece by piece, recording each non-reasoning piece's span."""

  def __init__(self):
    self.parts: list[str] = []
    self.spans: list[Span] = []
    self.n = 0

  def add(self, text: str, label: int = REASONING) -> None:
    if label != REASONING and text:
      self.spans.append((self.n, self.n + len(text), label))
    self.parts.append(text)
    self.n += len(text)

  def text(self) -> str:
    return "".join(self.parts)


# A numeric fact: (description in the question, statement before / after the value, value).
_Numeric = tuple[str, str, str, int]


def _numeric_facts(cs: ChainScene) -> list[_Numeric]:
  shapes = cs.scene.shapes
  facts: list[_Numeric] = [
    ("the number drawn in the image", "The number drawn is ", ".", cs.digit),
    ("the number of shapes", "I count ", " shapes in all.", len(shapes)),
  ]
  for c in synthetic.COLORS:
    n = sum(s.color == c for s in shapes)
    facts.append((f"the number of {c} shapes", "I count ", f" {c} shapes.", n))
  for k in synthetic.KINDS:
    n = sum(s.kind == k for s in shapes)
    facts.append((f"the number of {k}s", "I count ", f" {k}s.", n))
  return facts


def _pick(rng: np.random.Generator, items: Sequence, n: int) -> list:
  return [items[int(i)] for i in rng.choice(len(items), size=n, replace=False)]


def _ri(rng: np.random.Generator, lo: int, hi: int) -> int:
  """A uniform integer in [lo, hi]."""
  return int(rng.integers(lo, hi + 1))


# An arithmetic program over the fact values: (question formula, steps) where each step is
# (left, op, right) over earlier results; values are names ("a", "b", "c") or integers. Additions and
# subtractions of small constants (1-5, a subtrahend never above what was added before it, so nothing
# goes negative) keep every intermediate below 25: a tiny model can learn the arithmetic in its
# warm-up, which leaves reading the image as what decides the reward.
def _formula(
  rng: np.random.Generator, names: Sequence[str]
) -> tuple[str, list[tuple[Any, str, Any]]]:
  p = _ri(rng, 1, 5)
  q, r = _ri(rng, 1, p), _ri(rng, 1, 5)  # q <= p
  if len(names) == 1:
    (a,) = names
    return f"{a} + {p} - {q} + {r}", [(a, "+", p), ("_", "-", q), ("_", "+", r)]
  if len(names) == 2:
    a, b = names
    return f"{a} + {b} + {p} - {q} + {r}", [
      (a, "+", b),
      ("_", "+", p),
      ("_", "-", q),
      ("_", "+", r),
    ]
  a, b, c = names
  return f"{a} + {b} + {c} + {p} - {q}", [(a, "+", b), ("_", "+", c), ("_", "+", p), ("_", "-", q)]


def _run_steps(b: _Builder, steps: list[tuple[Any, str, Any]], env: dict[str, int]) -> int:
  """Writes `x op y = z.` for each step ("_" is the previous result); returns the last result."""
  prev = None
  for left, op, right in steps:
    x = prev if left == "_" else env.get(left, left)
    y = env.get(right, right) if isinstance(right, str) else right
    z = {"+": x + y, "-": x - y, "*": x * y}[op]
    b.add(f" {x} {op} {y} = {z}.")
    prev = z
  return prev


def _read_numeric(b: _Builder, fact: _Numeric) -> None:
  _, before, after, value = fact
  b.add(" " + before)
  b.add(str(value), PERCEPTION)
  b.add(after)


def _bind(b: _Builder, names: Sequence[str], values: Sequence[int]) -> None:
  binds = [f"{n} = {v}" for n, v in zip(names, values)]
  b.add(" So " + (binds[0] if len(binds) == 1 else ", ".join(binds[:-1]) + " and " + binds[-1]))
  b.add(".")


def _largest_color(cs: ChainScene) -> str | None:
  """The largest shape's colour when it is clearly the largest (`synthetic.LARGEST_MARGIN`), else None."""
  by_area = sorted(cs.scene.shapes, key=lambda s: s.area, reverse=True)
  if len(by_area) > 1 and by_area[0].area < synthetic.LARGEST_MARGIN * by_area[1].area:
    return None
  return by_area[0].color


def _describe(b: _Builder, cs: ChainScene) -> None:
  """Every fact of the image, each value a perception span: the digit, the counts (all shapes, by
  colour, by kind; zeros included) and the largest shape's colour when it is clearly the largest."""
  for fact in _numeric_facts(cs):
    _read_numeric(b, fact)
  color = _largest_color(cs)
  if color is not None:
    b.add(" The largest shape is ")
    b.add(color, PERCEPTION)
    b.add(".")


def _open(b: _Builder) -> None:
  b.add("<think>", FORMAT)
  b.add("First I read the image.")


def _close(b: _Builder, answer: int) -> None:
  b.add(f" So the answer is {answer}.")
  b.add("</think> \\boxed{", FORMAT)
  b.add(str(answer))
  b.add("}", FORMAT)


def _ask_arith(cs: ChainScene, rng: np.random.Generator, k: int, describe: bool):
  facts = _pick(rng, _numeric_facts(cs), k)
  names = ["a", "b", "c"][:k]
  formula, steps = _formula(rng, names)
  lets = [f"{n} be {f[0]}" for n, f in zip(names, facts)]
  lets_text = lets[0] if k == 1 else ", ".join(lets[:-1]) + " and " + lets[-1]
  question = f"Let {lets_text}. Compute {formula}."
  b = _Builder()
  _open(b)
  if describe:
    _describe(b, cs)
  else:
    for f in facts:
      _read_numeric(b, f)
  _bind(b, names, [f[3] for f in facts])
  b.add(" Now I compute.")
  answer = _run_steps(b, steps, {n: f[3] for n, f in zip(names, facts)})
  _close(b, answer)
  return question, answer, b


def _rules(rng: np.random.Generator) -> tuple[str, list, list]:
  """The two branches of a conditional question over `a`: (text, steps if true, steps if false)."""
  p, q = _ri(rng, 1, 5), _ri(rng, 1, 5)
  r = _ri(rng, 1, q)  # q - r >= 0
  text = f"the answer is a * 2 + {p}; otherwise it is a + {q} - {r}"
  return text, [("a", "*", 2), ("_", "+", p)], [("a", "+", q), ("_", "-", r)]


def _conditional(
  cs: ChainScene,
  rng: np.random.Generator,
  condition: str,
  read: tuple[str, str, str],
  holds: bool,
  why: str,
  describe: bool,
):
  """A conditional question: `read` = (statement before, value, after) of the categorical fact.
  Described (`describe`), the description states the largest shape's colour and the numeric fact,
  so only a relation is read after it."""
  fact = _pick(rng, _numeric_facts(cs), 1)[0]
  rules, if_true, if_false = _rules(rng)
  question = f"Let a be {fact[0]}. If {condition}, {rules}."
  b = _Builder()
  _open(b)
  if describe:
    _describe(b, cs)
  if not describe or not read[0].startswith("The largest"):
    b.add(" " + read[0])
    b.add(read[1], PERCEPTION)
    b.add(read[2])
  if not describe:
    _read_numeric(b, fact)
  _bind(b, ["a"], [fact[3]])
  which = "first" if holds else "second"
  b.add(f" {why}, so the {which} rule applies. Now I compute.")
  answer = _run_steps(b, if_true if holds else if_false, {"a": fact[3]})
  _close(b, answer)
  return question, answer, b


def _ask_cond_largest(cs: ChainScene, rng: np.random.Generator, describe: bool):
  color = _largest_color(cs)
  if color is None:
    return None
  pair = sorted(_pick(rng, list(synthetic.COLORS), 2), key=list(synthetic.COLORS).index)
  holds = color in pair
  condition = f"the largest shape is {pair[0]} or {pair[1]}"
  why = f"{color.capitalize()} is {'' if holds else 'not '}{pair[0]} or {pair[1]}"
  read = ("The largest shape is ", color, ".")
  return _conditional(cs, rng, condition, read, holds, why, describe)


def _ask_cond_relation(cs: ChainScene, rng: np.random.Generator, describe: bool):
  shapes = cs.scene.shapes
  i, j = (int(k) for k in rng.choice(len(shapes), size=2, replace=False))
  a, b = shapes[i], shapes[j]
  rel = list(synthetic.RELATIONS)[int(rng.integers(len(synthetic.RELATIONS)))]
  axis, sign = synthetic.RELATIONS[rel]
  delta = (a.cx - b.cx) if axis == "x" else (a.cy - b.cy)
  if abs(delta) < synthetic.RELATION_MARGIN * cs.scene.image_size:
    return None
  holds = bool(np.sign(delta) == sign)
  da, db = synthetic.describe(cs.scene, a), synthetic.describe(cs.scene, b)
  condition = f"{da} is {rel} {db}"
  why = "The condition holds" if holds else "The condition does not hold"
  read = (f"Is {da} {rel} {db}? ", "yes" if holds else "no", ".")
  return _conditional(cs, rng, condition, read, holds, why, describe)


_ASK = {
  "arith1": lambda cs, rng, describe: _ask_arith(cs, rng, 1, describe),
  "arith2": lambda cs, rng, describe: _ask_arith(cs, rng, 2, describe),
  "arith3": lambda cs, rng, describe: _ask_arith(cs, rng, 3, describe),
  "cond_largest": _ask_cond_largest,
  "cond_relation": _ask_cond_relation,
}
assert tuple(_ASK) == QTYPES


DESCRIBE_PREFIX = "Describe the image, then answer. "


def sample_chain_example(
  rng: np.random.Generator, image_size: int = 84, qtype: str | None = None, describe: bool = False
) -> ChainExample:
  """Draws a question type (uniform unless given), then scenes until that question is well posed.

  `describe`: the question starts with `DESCRIBE_PREFIX` and the worked solution states every fact
  of the image (`_describe`: ~10 perception spans instead of 1-3) before it computes, in the same
  statements; the scene, question and answer are those `describe=False` draws from the same `rng`
  state (the description draws nothing). Dense perception supervision for the warm-up.
  """
  if qtype is None:
    qtype = QTYPES[int(rng.integers(len(QTYPES)))]
  if qtype not in _ASK:
    raise ValueError(f"chain: unknown qtype {qtype!r}; expected one of {QTYPES}")
  for _ in range(synthetic.MAX_TRIES):
    cs = sample_chain_scene(rng, image_size)
    qa = _ASK[qtype](cs, rng, describe)
    if qa is not None:
      question, answer, b = qa
      if describe:
        question = DESCRIBE_PREFIX + question
      return ChainExample(cs, qtype, question, str(answer), b.text(), tuple(b.spans), describe)
  raise RuntimeError(f"chain: no well-posed {qtype!r} question after {synthetic.MAX_TRIES} scenes")


# ----------------------------------------------------------------------------------- labelling text

# Where a perception value stands in the chain format (the value is group 1), and the format pieces.
_PERCEPTION_RE = re.compile(
  r"The number drawn is (\d+)\."
  r"|I count (\d+) (?:shapes in all|\w+ shapes|\w+s)\."
  r"|The largest shape is (\w+)\."
  r"|Is [^?<>]*\? (yes|no)\."
)
_FORMAT_RE = re.compile(r"<think>|</think> ?\\boxed\{|</think>")


def label_response(text: str) -> tuple[Span, ...]:
  """Perception and format spans of a response in the chain format, sorted by start.

  Perception: the value in each fact statement (see `_PERCEPTION_RE`) before the first `Now I compute`
  (later restatements are reasoning). Format: `<think>`, `</think> \\boxed{` (or a bare `</think>`)
  and the `}` closing the last boxed answer. On a worked solution this equals the spans it was built
  with; on other text it labels what it recognises and leaves the rest to reasoning.
  """
  spans: list[Span] = []
  stop = text.find("Now I compute")
  for m in _PERCEPTION_RE.finditer(text, 0, len(text) if stop < 0 else stop):
    g = next(i for i in range(1, 5) if m.group(i) is not None)
    spans.append((m.start(g), m.end(g), PERCEPTION))
  for m in _FORMAT_RE.finditer(text):
    spans.append((m.start(), m.end(), FORMAT))
  last_box = text.rfind("\\boxed{")
  if last_box >= 0:
    depth, i = 0, last_box + len("\\boxed{")
    while i < len(text):
      if text[i] == "{":
        depth += 1
      elif text[i] == "}":
        if depth == 0:
          spans.append((i, i + 1, FORMAT))
          break
        depth -= 1
      i += 1
  return tuple(sorted(spans))


def perception_facts(text: str) -> dict[str, str]:
  """{fact statement with its value blanked: the stated value} of the image facts a chain-format text
  states before `Now I compute` (the first statement of each fact counts).

  E.g. `The number drawn is 7.` -> {"The number drawn is _.": "7"}. Keys are the statements of
  `_PERCEPTION_RE` with the value replaced by `_`, so a response and the worked solution of the same
  question give the same keys when they read the same facts.
  """
  facts: dict[str, str] = {}
  stop = text.find("Now I compute")
  for m in _PERCEPTION_RE.finditer(text, 0, len(text) if stop < 0 else stop):
    g = next(i for i in range(1, 5) if m.group(i) is not None)
    key = text[m.start() : m.start(g)] + "_" + text[m.end(g) : m.end()]
    facts.setdefault(key, m.group(g))
  return facts


def perception_accuracy(response: str, solution: str) -> tuple[int, int]:
  """(facts the response states correctly, facts the worked solution states).

  A fact of the solution is right when the response states the same fact (same statement) with the
  same value; a fact the response omits, misreads or states in another form is wrong. The solution's
  values are the true image facts (it is built from the scene), so correct / total is the
  perception-token accuracy of the response.
  """
  truth = perception_facts(solution)
  said = perception_facts(response)
  return sum(said.get(k) == v for k, v in truth.items()), len(truth)


# ------------------------------------------------------------------------------------------- splits


def example_to_row(ex: ChainExample) -> dict[str, Any]:
  """One row of `PARQUET_SCHEMA` (see the module docstring)."""
  return {
    "problem": synthetic.IMAGE_PLACEHOLDER + ex.question,
    "answer": ex.answer,
    "images": [{"bytes": synthetic.png_bytes(draw_chain_scene(ex.scene)), "path": None}],
    "qtype": ex.qtype,
    "scene": ex.scene.to_json(),
    "solution": ex.solution,
    "labels": json.dumps([list(s) for s in ex.spans]),
  }


def make_split(
  n: int, seed: int, image_size: int = 84, stream: int = 0, describe_fraction: float = 0.0
) -> list[dict[str, Any]]:
  """`n` rows, a pure function of the arguments; row i does not depend on n.

  `describe_fraction`: each row is described (`sample_chain_example(describe=True)`) with this
  probability, by a coin of its own stream, so row i has the same scene, question and answer at
  every fraction and only its solution (and question prefix) differs.
  """
  if n < 0:
    raise ValueError(f"chain: n must be >= 0, got {n}")
  if not 0.0 <= describe_fraction <= 1.0:
    raise ValueError(f"chain: describe_fraction must be in [0, 1], got {describe_fraction}")
  rng = synthetic.split_rng(seed, stream)
  coins = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, 1))).random(n)
  return [
    example_to_row(sample_chain_example(rng, image_size, describe=bool(c < describe_fraction)))
    for c in coins
  ]


def corpus_lines(seed: int = 0, n_examples: int = 2000) -> list[str]:
  """Questions and worked solutions of seeded samples (BPE training text for the chain tokenizer)."""
  rng = synthetic.split_rng(seed, stream=1_000_001)  # A stream no data split uses.
  samples = [sample_chain_example(rng, image_size=84) for _ in range(n_examples)]
  return [f"{synthetic.IMAGE_PLACEHOLDER}{ex.question}\n{ex.solution}" for ex in samples]
