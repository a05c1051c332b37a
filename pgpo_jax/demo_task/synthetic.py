"""A seeded synthetic visual-reasoning task for the CPU demo: colored shapes on a plain background.

Each example is one small square RGB image (`image_size` px, default 84 = a 6x6 grid of 14-px patches, i.e.
9 `<|image_pad|>` tokens after the 2x2 merge) holding 2-5 non-overlapping shapes, and one question whose
answer needs the image:

| qtype            | question (example)                        | answer space              |
|------------------|-------------------------------------------|---------------------------|
| `count_color`    | How many red shapes are there?            | 0-5                       |
| `count_kind`     | How many circles are there?               | 0-5                       |
| `count_total`    | How many shapes are there?                | 2-5                       |
| `largest_color`  | What color is the largest shape?          | red/green/blue/yellow     |
| `kind_of_color`  | Which shape is blue?                      | circle/square/triangle    |
| `relation`       | Is the red circle left of the square?     | yes/no                    |

Questions are only asked when they are well posed: the largest shape is at least `LARGEST_MARGIN` times larger
(in area) than the runner-up, `kind_of_color` needs exactly one shape of that color, and a `relation` needs the
two centers at least `RELATION_MARGIN * image_size` apart along the asked axis. Every (color, kind) pair
occurs at most once per scene, so "the red circle" always names one shape; a bare kind ("the square") is used
when that kind is unique. Shapes are drawn without anti-aliasing, so every pixel is either background or
exactly one palette color (tests recompute the answers from the pixels).

Row layout (EasyR1 / verl multimodal parquet):
- `problem`: `"<image>" + question`. The `<image>` placeholder marks where the image goes in the user turn,
  as in EasyR1's geometry3k; the pipeline splits on it and emits the image item there.
- `answer`: the ground-truth string scored by `pgpo_jax.rewards` (a digit, a color, a kind, or yes/no).
- `images`: `[{"bytes": <PNG bytes>, "path": None}]` (the HF `datasets.Image` struct).
Extra columns, ignored by readers that select the three above:
- `qtype`: the question type (for per-type metrics).
- `scene`: the scene as JSON (`Scene.to_json`), enough to redraw the image and recompute the answer.
- `solution`: a templated correct response, `<think>...</think> \\boxed{answer}`, usable for SFT warm-up
  or as a format example.

Everything is a pure function of the seed (numpy `PCG64` through `np.random.default_rng`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
  "red": (220, 40, 40),
  "green": (40, 170, 60),
  "blue": (40, 80, 220),
  "yellow": (235, 200, 30),
}
KINDS: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUND: tuple[int, int, int] = (245, 245, 245)
QTYPES: tuple[str, ...] = (
  "count_color",
  "count_kind",
  "count_total",
  "largest_color",
  "kind_of_color",
  "relation",
)
# Relation words -> (axis, sign): "A is left of B" <=> A.cx < B.cx.
RELATIONS: dict[str, tuple[str, int]] = {
  "left of": ("x", -1),
  "right of": ("x", +1),
  "above": ("y", -1),
  "below": ("y", +1),
}
IMAGE_PLACEHOLDER = "<image>"

MIN_SHAPES, MAX_SHAPES = 2, 5
_MARGIN_PX = 2  # Free border around the image.
GAP_PX = 3  # Minimum free gap between two shapes' bounding boxes (keeps components separate).
LARGEST_MARGIN = 1.4  # Area ratio largest / runner-up required to ask `largest_color`.
RELATION_MARGIN = 0.1  # Center distance (fraction of the image side) required to ask a `relation`.
MAX_TRIES = 1000
PARQUET_SCHEMA = pa.schema(
  [
    ("problem", pa.string()),
    ("answer", pa.string()),
    ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
    ("qtype", pa.string()),
    ("scene", pa.string()),
    ("solution", pa.string()),
  ]
)


@dataclasses.dataclass(frozen=True)
class Shape:
  """One shape, drawn inside the axis-aligned box [x0, x0+size) x [y0, y0+size) (pixels)."""

  kind: str
  color: str
  x0: int
  y0: int
  size: int

  @property
  def cx(self) -> float:
    return self.x0 + (self.size - 1) / 2

  @property
  def cy(self) -> float:
    return self.y0 + (self.size - 1) / 2

  @property
  def area(self) -> float:
    """Analytic area: square s^2, circle pi s^2/4, triangle (base s, height s) s^2/2."""
    factor = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[self.kind]
    return factor * self.size**2


@dataclasses.dataclass(frozen=True)
class Scene:
  image_size: int
  shapes: tuple[Shape, ...]

  def to_json(self) -> str:
    return json.dumps(
      {"image_size": self.image_size, "shapes": [dataclasses.asdict(s) for s in self.shapes]},
      sort_keys=True,
    )

  @classmethod
  def from_json(cls, text: str) -> "Scene":
    d = json.loads(text)
    return cls(int(d["image_size"]), tuple(Shape(**s) for s in d["shapes"]))


@dataclasses.dataclass(frozen=True)
class Example:
  scene: Scene
  qtype: str
  question: str
  answer: str
  solution: str


# ----------------------------------------------------------------------------------------------- scenes


def _size_range(image_size: int) -> tuple[int, int]:
  """Inclusive range of shape sides (px) for an image side; both ends scale with the image."""
  return max(6, round(0.15 * image_size)), max(8, round(0.34 * image_size))


def _overlaps(a: Shape, b: Shape, gap: int = GAP_PX) -> bool:
  return (
    a.x0 < b.x0 + b.size + gap
    and b.x0 < a.x0 + a.size + gap
    and a.y0 < b.y0 + b.size + gap
    and b.y0 < a.y0 + a.size + gap
  )


def sample_scene(rng: np.random.Generator, image_size: int = 84) -> Scene:
  """Samples 2-5 non-overlapping shapes with distinct (color, kind) pairs."""
  if image_size < 28:
    raise ValueError(
      f"synthetic: image_size must be >= 28 px (one 28-px merge unit), got {image_size}"
    )
  lo, hi = _size_range(image_size)
  combos = [(c, k) for c in COLORS for k in KINDS]
  for _ in range(MAX_TRIES):
    n = int(rng.integers(MIN_SHAPES, MAX_SHAPES + 1))
    picks = rng.choice(len(combos), size=n, replace=False)
    shapes: list[Shape] = []
    for p in picks:
      color, kind = combos[int(p)]
      for _ in range(100):
        size = int(rng.integers(lo, hi + 1))
        room = image_size - 2 * _MARGIN_PX - size
        s = Shape(
          kind,
          color,
          _MARGIN_PX + int(rng.integers(0, room + 1)),
          _MARGIN_PX + int(rng.integers(0, room + 1)),
          size,
        )
        if not any(_overlaps(s, t) for t in shapes):
          shapes.append(s)
          break
      else:
        break  # No room left: resample the whole scene.
    if len(shapes) == n:
      return Scene(image_size, tuple(shapes))
  raise RuntimeError(f"synthetic: could not place {MIN_SHAPES}+ shapes in a {image_size}px image")


def draw_scene(scene: Scene) -> Image.Image:
  """Renders the scene as an RGB image, aliased (every pixel is background or one palette color)."""
  img = Image.new("RGB", (scene.image_size, scene.image_size), BACKGROUND)
  draw = ImageDraw.Draw(img)
  for s in scene.shapes:
    x1, y1 = s.x0 + s.size - 1, s.y0 + s.size - 1
    fill = COLORS[s.color]
    if s.kind == "square":
      draw.rectangle([s.x0, s.y0, x1, y1], fill=fill)
    elif s.kind == "circle":
      draw.ellipse([s.x0, s.y0, x1, y1], fill=fill)
    elif s.kind == "triangle":  # Pointing up, base at the bottom.
      draw.polygon([(s.x0 + (s.size - 1) / 2, s.y0), (s.x0, y1), (x1, y1)], fill=fill)
    else:
      raise ValueError(f"synthetic: unknown shape kind {s.kind!r}; expected one of {KINDS}")
  return img


def png_bytes(img: Image.Image) -> bytes:
  """Encodes losslessly; the bytes are a pure function of the pixels (fixed zlib settings)."""
  buf = io.BytesIO()
  img.save(buf, format="PNG", optimize=False, compress_level=6)
  return buf.getvalue()


# -------------------------------------------------------------------------------------------- questions


def describe(scene: Scene, shape: Shape) -> str:
  """Shortest unique description: "the circle" if the kind is unique, else "the red circle"."""
  same_kind = sum(s.kind == shape.kind for s in scene.shapes)
  return f"the {shape.kind}" if same_kind == 1 else f"the {shape.color} {shape.kind}"


def _plural(kind: str) -> str:
  return kind + "s"


def _listing(shapes: Sequence[Shape], with_color: bool = True, with_kind: bool = True) -> str:
  """ "a red circle, a blue square and a green triangle" (left to right)."""
  ordered = sorted(shapes, key=lambda s: (s.cx, s.cy))
  words = [
    " ".join(["a"] + ([s.color] if with_color else []) + ([s.kind] if with_kind else []))
    for s in ordered
  ]
  return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _respond(reasoning: str, answer: str) -> str:
  return f"<think>{reasoning}</think> \\boxed{{{answer}}}"


def _ask_count_color(scene: Scene, rng: np.random.Generator) -> tuple[str, str, str] | None:
  color = list(COLORS)[int(rng.integers(len(COLORS)))]
  hits = [s for s in scene.shapes if s.color == color]
  n = len(hits)
  seen = f"I see {_listing(hits, with_color=False)}." if hits else f"I see no {color} shapes."
  return (
    f"How many {color} shapes are there?",
    str(n),
    _respond(f"I look for {color} shapes. {seen} So there are {n}.", str(n)),
  )


def _ask_count_kind(scene: Scene, rng: np.random.Generator) -> tuple[str, str, str] | None:
  kind = KINDS[int(rng.integers(len(KINDS)))]
  hits = [s for s in scene.shapes if s.kind == kind]
  n = len(hits)
  seen = f"I see {_listing(hits)}." if hits else f"I see no {_plural(kind)}."
  return (
    f"How many {_plural(kind)} are there?",
    str(n),
    _respond(f"I look for {_plural(kind)}. {seen} So there are {n}.", str(n)),
  )


def _ask_count_total(scene: Scene, rng: np.random.Generator) -> tuple[str, str, str] | None:
  n = len(scene.shapes)
  return (
    "How many shapes are there?",
    str(n),
    _respond(f"I see {_listing(scene.shapes)}. That is {n} shapes.", str(n)),
  )


def _ask_largest_color(scene: Scene, rng: np.random.Generator) -> tuple[str, str, str] | None:
  by_area = sorted(scene.shapes, key=lambda s: s.area, reverse=True)
  if by_area[0].area < LARGEST_MARGIN * by_area[1].area:
    return None
  big = by_area[0]
  return (
    "What color is the largest shape?",
    big.color,
    _respond(f"The largest shape is the {big.color} {big.kind}.", big.color),
  )


def _ask_kind_of_color(scene: Scene, rng: np.random.Generator) -> tuple[str, str, str] | None:
  present = sorted({s.color for s in scene.shapes}, key=list(COLORS).index)
  color = present[int(rng.integers(len(present)))]
  hits = [s for s in scene.shapes if s.color == color]
  if len(hits) != 1:
    return None
  kind = hits[0].kind
  return (f"Which shape is {color}?", kind, _respond(f"The only {color} shape is a {kind}.", kind))


def _ask_relation(scene: Scene, rng: np.random.Generator) -> tuple[str, str, str] | None:
  i, j = (int(k) for k in rng.choice(len(scene.shapes), size=2, replace=False))
  a, b = scene.shapes[i], scene.shapes[j]
  rel = list(RELATIONS)[int(rng.integers(len(RELATIONS)))]
  axis, sign = RELATIONS[rel]
  delta = (a.cx - b.cx) if axis == "x" else (a.cy - b.cy)
  if abs(delta) < RELATION_MARGIN * scene.image_size:
    return None
  answer = "yes" if np.sign(delta) == sign else "no"
  da, db = describe(scene, a), describe(scene, b)
  where = {-1: "left", 1: "right"} if axis == "x" else {-1: "top", 1: "bottom"}
  side_a, side_b = where[int(np.sign(delta))], where[-int(np.sign(delta))]
  reasoning = (
    f"{da.capitalize()} is on the {side_a} and {db} is on the {side_b}, so the answer is {answer}."
  )
  return f"Is {da} {rel} {db}?", answer, _respond(reasoning, answer)


_ASK = {
  "count_color": _ask_count_color,
  "count_kind": _ask_count_kind,
  "count_total": _ask_count_total,
  "largest_color": _ask_largest_color,
  "kind_of_color": _ask_kind_of_color,
  "relation": _ask_relation,
}
assert tuple(_ASK) == QTYPES


def sample_example(
  rng: np.random.Generator, image_size: int = 84, qtype: str | None = None
) -> Example:
  """Draws a question type (uniform unless given), then scenes until that question is well posed."""
  if qtype is None:
    qtype = QTYPES[int(rng.integers(len(QTYPES)))]
  if qtype not in _ASK:
    raise ValueError(f"synthetic: unknown qtype {qtype!r}; expected one of {QTYPES}")
  for _ in range(MAX_TRIES):
    scene = sample_scene(rng, image_size)
    qa = _ASK[qtype](scene, rng)
    if qa is not None:
      return Example(scene, qtype, *qa)
  raise RuntimeError(f"synthetic: no well-posed {qtype!r} question after {MAX_TRIES} scenes")


def render_example(rng: np.random.Generator, image_size: int = 84) -> tuple[Image.Image, str, str]:
  """Returns (RGB image [image_size, image_size], question, answer) for one random example."""
  ex = sample_example(rng, image_size)
  return draw_scene(ex.scene), ex.question, ex.answer


# ------------------------------------------------------------------------------------------------ splits


def split_rng(seed: int, stream: int = 0) -> np.random.Generator:
  """Independent generator per (seed, stream); streams keep train/test disjoint for one seed."""
  return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream,)))


def example_to_row(ex: Example) -> dict[str, Any]:
  """One EasyR1-layout row (see the module docstring)."""
  return {
    "problem": IMAGE_PLACEHOLDER + ex.question,
    "answer": ex.answer,
    "images": [{"bytes": png_bytes(draw_scene(ex.scene)), "path": None}],
    "qtype": ex.qtype,
    "scene": ex.scene.to_json(),
    "solution": ex.solution,
  }


def make_split(n: int, seed: int, image_size: int = 84, stream: int = 0) -> list[dict[str, Any]]:
  """`n` rows, a pure function of (n, seed, image_size, stream); row i does not depend on n."""
  if n < 0:
    raise ValueError(f"synthetic: n must be >= 0, got {n}")
  rng = split_rng(seed, stream)
  return [example_to_row(sample_example(rng, image_size)) for _ in range(n)]


def write_parquet(
  rows: Sequence[dict[str, Any]], path: str | os.PathLike, schema: pa.Schema = PARQUET_SCHEMA
) -> None:
  """Writes rows with `schema` (default `PARQUET_SCHEMA`), atomically (a temp file renamed into place)."""
  missing = [
    (i, k) for i, r in enumerate(rows) for k in ("problem", "answer", "images") if k not in r
  ]
  if missing:
    i, k = missing[0]
    raise KeyError(f"write_parquet({path}): row {i} lacks field {k!r}")
  columns = {name: [r.get(name) for r in rows] for name in schema.names}
  table = pa.Table.from_pydict(columns, schema=schema)
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  pq.write_table(table, tmp)
  os.replace(tmp, path)


# ------------------------------------------------------------------------------------ tokenizer corpus


def corpus_lines() -> list[str]:
  """Every question form, answer and templated solution phrase of the task (for BPE training)."""
  lines = [f"How many {c} shapes are there?" for c in COLORS]
  lines += [f"How many {_plural(k)} are there?" for k in KINDS]
  lines += ["How many shapes are there?", "What color is the largest shape?"]
  lines += [f"Which shape is {c}?" for c in COLORS]
  descs = [f"the {k}" for k in KINDS] + [f"the {c} {k}" for c in COLORS for k in KINDS]
  lines += [f"Is {a} {rel} {b}?" for rel in RELATIONS for a in descs[:3] for b in descs[3:]]
  lines += [str(i) for i in range(10)] + list(COLORS) + list(KINDS) + ["yes", "no"]
  for c in COLORS:
    for k in KINDS:
      lines.append(_respond(f"The largest shape is the {c} {k}.", c))
      lines.append(_respond(f"The only {c} shape is a {k}.", k))
      lines.append(_respond(f"I look for {c} shapes. I see a {k} and a {k}. So there are 2.", "2"))
      lines.append(_respond(f"I look for {_plural(k)}. I see a {c} {k}. So there are 1.", "1"))
  lines += [
    _respond(f"I see no {x}. So there are 0.", "0") for x in [*COLORS, *map(_plural, KINDS)]
  ]
  lines += [
    _respond(f"The {k} is on the {s} and the {c} {k} is on the {t}, so the answer is {a}.", a)
    for k in KINDS
    for c in COLORS
    for (s, t) in (("left", "right"), ("top", "bottom"))
    for a in ("yes", "no")
  ]
  lines += [
    _respond(f"I see a red circle, a blue square and a green triangle. That is {n} shapes.", str(n))
    for n in range(MIN_SHAPES, MAX_SHAPES + 1)
  ]
  return lines
