"""The column layouts of the paper's data as users download them, and the row conventions they need.

Four layouts are known by their columns (`detect_columns`); every other file names its columns itself
(`DatasetSpec` / `--question_key` ...):

| layout | columns | example |
|---|---|---|
| `easyr1` | `problem` (`<image>` placeholders), `answer`, `images` (list of {bytes, path}) | ViRL39K as VPPO trains on it (`chamber111/VPPO_ViRL39K_train`), `hiyouga/geometry3k` |
| `mmmu_pro` | `question` (`<image k>` placeholders), `options` (a list, or a string holding one), `answer` (a letter), `image_1` ... `image_7` | `MMMU/MMMU_Pro` (standard) |
| `sharegpt` | `messages` (user turn = question, assistant turn = answer), `images` (paths) | VPPO-Eval / PAPO-Eval (LLaMA-Factory `dataset_info.json` folders) |
| `generic` | a question column of `QUESTION_KEYS`, an answer column of `ANSWER_KEYS`, an image column of `IMAGE_KEYS`, optionally `options` | MathVision (`question`, `options`, `decoded_image`: its HF `eval.yaml`) |

Row conventions (pure functions, used by `reader.DatasetReader`):
- options: a list of strings, or a string holding a Python/JSON list (`"['3', '4']"`, MMMU's
  storage), are appended to the question as lines `A. 3`, `B. 4`, ... (MMMU-Pro's own prompt format);
- `<image k>` placeholders (MMMU's) refer to image number k of the row (column `image_k`, or element k
  of an image list): the images are put at their placeholders, in the text's order. A placeholder
  whose image is missing, an image no placeholder refers to, or a mix of `<image k>` and `<image>`
  refuses the row (`missing_image`, `image_placeholder_mismatch`), never a silent drop;
- a format instruction already at the end of a question (VPPO's or EasyR1's "... \\boxed{}") is
  removed, so that the prompt carries the training instruction exactly once;
- a chat-message answer cell (sharegpt) gives its last assistant turn.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from typing import Any, Mapping, Sequence

IMAGE_PLACEHOLDER = "<image>"  # EasyR1's placeholder: the row's images in order
IMAGE_REF_RE = re.compile(r"<image\s*(\d+)>")  # MMMU's numbered placeholder `<image 3>`
OPTION_LETTERS = "ABCDEFGHIJ"  # MMMU-Pro has up to 10 options

# Known format instructions a question may already end with: VPPO's `math_format_perception.jinja`
# (which PAPO-Eval's user turns seem to end with: a third-party reading, not verified) and EasyR1's
# `math.jinja` (this repository's own instruction).
_INSTRUCTION_RES = (
  re.compile(
    r"\s*You first think through the reasoning process as an internal monologue, enclosed within "
    r"<think> </think> tags\. Then, provide your final answer enclosed within \\boxed\{\}\.?\s*$"
  ),
  re.compile(
    r"\s*You FIRST think about the reasoning process as an internal monologue and then provide the "
    r"final answer\. The reasoning process MUST BE enclosed within <think> </think> tags\. The "
    r"final answer MUST BE put in \\boxed\{\}\.?\s*$"
  ),
)

# Detection, in order of preference.
QUESTION_KEYS = ("problem", "prompt", "query", "question")
ANSWER_KEYS = ("answer", "ground_truth", "gt_answer", "reward_model.ground_truth", "label")
# `decoded_image` before `image`: MathVision's `image` is a path into a folder the parquet lacks.
IMAGE_KEYS = ("images", "decoded_image", "image", "image_path", "img")
OPTIONS_KEYS = ("options",)
_NUMBERED_IMAGE_RE = re.compile(r"^image_(\d+)$")
# Column names that look like they hold images; one the layout does not read is an error.
_IMAGE_LIKE_RE = re.compile(r"^(?:images?|img|imgs|pictures?|decoded_image|image_path)(?:_\d+)?$")


class LayoutError(ValueError):
  """A row that cannot be read as its layout says; `reason` is a `reader.SKIP_REASONS` name."""

  def __init__(self, reason: str, detail: str):
    super().__init__(f"{reason}: {detail}")
    self.reason = reason
    self.detail = detail


# ------------------------------------------------------------------------------------------------
# Row conventions
# ------------------------------------------------------------------------------------------------
def parse_options(value: Any, field: str = "options") -> tuple[str, ...]:
  """An options cell as a tuple of option texts; () for none.

  Accepts a list (of strings or numbers) or a string holding one (`"['a', 'b']"`, read with
  `ast.literal_eval`, never `eval`). Raises LayoutError("malformed_row") for anything else, or for
  more options than `OPTION_LETTERS` has letters.
  """
  if value is None:
    return ()
  items = value
  if isinstance(value, str):
    text = value.strip()
    if not text:
      return ()
    try:
      items = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
      raise LayoutError(
        "malformed_row", f"column {field!r}: {text[:80]!r} is not a list literal ({e})"
      ) from None
  if not isinstance(items, (list, tuple)):
    raise LayoutError(
      "malformed_row", f"column {field!r}: expected a list of options, got {type(items).__name__}"
    )
  out = []
  for k, item in enumerate(items):
    if isinstance(item, bool) or not isinstance(item, (str, int, float)):
      raise LayoutError(
        "malformed_row",
        f"column {field!r}: option {k} is a {type(item).__name__}, not text or a number",
      )
    out.append(str(item).strip())
  if len(out) > len(OPTION_LETTERS):
    raise LayoutError(
      "malformed_row", f"column {field!r}: {len(out)} options, more than {len(OPTION_LETTERS)}"
    )
  return tuple(out)


def format_options(options: Sequence[str]) -> str:
  """`A. first\\nB. second ...` (MMMU-Pro's option lines)."""
  return "\n".join(f"{OPTION_LETTERS[k]}. {o}" for k, o in enumerate(options))


def with_options(question: str, options: Sequence[str]) -> str:
  """The question followed by its option lines (unchanged without options)."""
  return f"{question}\n{format_options(options)}" if options else question


def place_images(
  question: str, cells: Sequence[Any], names: Sequence[str]
) -> tuple[str, list[Any]]:
  """Resolves MMMU's `<image k>` placeholders: (question with `<image>` at each of them, the cells in
  the text's order). Without numbered placeholders: the question unchanged and the non-null cells in
  order (the reader's convention: at `<image>` placeholders, or first).

  cells[k-1] is image k (None: empty); names[k-1] names it in messages (`image_2`, `images[1]`).
  Raises LayoutError: `missing_image` for a placeholder whose image is empty, and
  `image_placeholder_mismatch` for an image no placeholder refers to or a mix with `<image>`.
  """
  refs = [int(m.group(1)) for m in IMAGE_REF_RE.finditer(question)]
  if not refs:
    return question, [c for c in cells if c is not None]
  if IMAGE_PLACEHOLDER in question:
    raise LayoutError(
      "image_placeholder_mismatch",
      f"the question mixes numbered '<image k>' and plain '{IMAGE_PLACEHOLDER}' placeholders",
    )
  for k in refs:
    if not 1 <= k <= len(cells) or cells[k - 1] is None:
      what = names[k - 1] if 1 <= k <= len(names) else f"image {k}"
      raise LayoutError(
        "missing_image", f"the question refers to <image {k}> but {what} holds no image"
      )
  unreferenced = [names[i] for i, c in enumerate(cells) if c is not None and i + 1 not in refs]
  if unreferenced:
    raise LayoutError(
      "image_placeholder_mismatch",
      f"{', '.join(unreferenced)} hold(s) an image that no '<image k>' placeholder refers to",
    )
  return IMAGE_REF_RE.sub(IMAGE_PLACEHOLDER, question), [cells[k - 1] for k in refs]


_OPTION_LINE_RE = re.compile(r"^\s*\(?([A-J])\)?\s*[.:)\uff1a]\s*(.*?)\s*$")


def options_from_text(question: str) -> tuple[str, ...]:
  """The option texts of a question's option lines (`A. 3`, `(B) 4`, `C: 5`; one per line, letters
  consecutive from A, at least two); () when it has none. The lines `with_options` writes parse back
  to the same options (single-line options)."""
  found: list[tuple[str, str]] = []
  for line in question.splitlines():
    m = _OPTION_LINE_RE.match(line)
    if m is None:
      continue
    letter, text = m.groups()
    if letter == "A":  # a (new) list starts; a later one replaces an earlier one
      found = []
    if len(found) < len(OPTION_LETTERS) and letter == OPTION_LETTERS[len(found)] and text:
      found.append((letter, text))
  return tuple(t for _, t in found) if len(found) >= 2 else ()


def strip_format_instruction(question: str) -> str:
  """The question without a known format instruction at its end (see the module docstring)."""
  for pattern in _INSTRUCTION_RES:
    stripped = pattern.sub("", question)
    if stripped != question:
      return stripped
  return question


def is_chat(value: Any) -> bool:
  """A verl / sharegpt chat cell: a non-empty list of {role, content} dicts."""
  return (
    isinstance(value, (list, tuple)) and bool(value) and all(isinstance(m, Mapping) for m in value)
  )


def chat_answer(messages: Sequence[Mapping[str, Any]]) -> Any:
  """The content of the last assistant turn of a chat cell (None when there is none)."""
  turns = [m.get("content") for m in messages if m.get("role") == "assistant"]
  return turns[-1] if turns else None


# ------------------------------------------------------------------------------------------------
# Layout detection
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Columns:
  """Which columns of a file hold what (the fields of `reader.DatasetSpec` of the same names)."""

  layout: str  # easyr1 | mmmu_pro | sharegpt | generic
  question_key: str
  answer_key: str
  image_key: str | tuple[str, ...] | None
  options_key: str | None = None


def _pick(columns: Sequence[str], candidates: Sequence[str]) -> str | None:
  return next((k for k in candidates if k.split(".", 1)[0] in columns), None)


def numbered_image_columns(columns: Sequence[str]) -> tuple[str, ...]:
  """`image_1`, `image_2`, ... of `columns`, by number (MMMU's layout); () when there are none."""
  found = {int(m.group(1)): c for c in columns if (m := _NUMBERED_IMAGE_RE.match(c))}
  if not found:
    return ()
  missing = [k for k in range(1, max(found) + 1) if k not in found]
  if missing:
    raise ValueError(
      f"image columns {sorted(found.values())} skip number(s) {missing}: '<image k>' placeholders "
      "could not be matched to them"
    )
  return tuple(found[k] for k in sorted(found))


def detect_columns(
  columns: Sequence[str],
  where: str = "dataset file",
  *,
  question_key: str | None = None,
  answer_key: str | None = None,
  image_key: str | tuple[str, ...] | None = None,
) -> Columns:
  """The layout of a file from its top-level column names (see the module docstring); given keys are
  kept and only the others detected.

  Raises ValueError naming the file, the columns and the flag to pass when no question or answer
  column is found, and when columns that look like images would not be read (no image column found
  although `image_like_columns` has some).
  """
  columns = list(columns)
  numbered = numbered_image_columns(columns)
  if "messages" in columns:
    found = Columns("sharegpt", "messages", "messages", "images" if "images" in columns else None)
  elif numbered and "question" in columns and "answer" in columns:
    found = Columns("mmmu_pro", "question", "answer", numbered, _pick(columns, OPTIONS_KEYS))
  else:
    q_key = question_key or _pick(columns, QUESTION_KEYS)
    a_key = answer_key or _pick(columns, ANSWER_KEYS)
    if q_key is None or a_key is None:
      missing, tried = ("question", QUESTION_KEYS) if q_key is None else ("answer", ANSWER_KEYS)
      raise ValueError(
        f"{where}: no {missing} column among {list(tried)}; columns are {sorted(columns)}. "
        f"Pass --{missing}_key."
      )
    layout = "easyr1" if (q_key, a_key) == ("problem", "answer") else "generic"
    image = numbered or _pick(columns, IMAGE_KEYS)
    found = Columns(layout, q_key, a_key, image, _pick(columns, OPTIONS_KEYS))
  found = dataclasses.replace(
    found,
    question_key=question_key or found.question_key,
    answer_key=answer_key or found.answer_key,
    image_key=image_key or found.image_key,
  )
  if found.image_key is None and image_like_columns(columns):
    raise ValueError(
      f"{where}: column(s) {image_like_columns(columns)} look like images but the "
      f"{found.layout!r} layout reads none; name the image column(s) with --image_key (a "
      "benchmark must not be scored without its images)"
    )
  return found


def image_like_columns(columns: Sequence[str]) -> list[str]:
  """Columns named like image columns (`images`, `image_3`, `decoded_image`, ...)."""
  return sorted(c for c in columns if _IMAGE_LIKE_RE.match(c))
