"""Host-side rewards, registered by name (docs/method.md §5): overall = 0.9 * accuracy + 0.1 * format, each 0/1.

- accuracy: the LAST complete `\\boxed{...}` (or `\\fbox{...}`) of the response, with nested braces, against
  the ground truth, both with Unicode math symbols in LaTeX spelling (`½` is `\\frac{1}{2}`, `∞` and a
  whole answer `inf` are `\\infty`: `canonical_symbols`), in this order:
  1. normalized string match (case and whitespace insensitive; strips `$`, `\\text{}`-style wrappers, LaTeX
     spacing and trailing periods);
  2. multiple choice: when the gold is a letter (`A`, `(A)`, `A.`; A to J), the prediction's leading
     letter decides. When the question's options are known (`score_batch(..., choices=)`, benchmarks
     with an options column or option lines), a prediction without a letter is compared with the
     gold option's text, and a letter against a gold option text stands for its option's text;
  3. decimal numbers, in scientific notation too, compare exactly as numbers (`0.5` == `0.50`,
     `1e300` == `1e+300`);
  4. words never reach math_verify (it reads "no" as the product n*o, so "no" would equal "on");
  5. otherwise math_verify `parse` + `verify` (fractions, LaTeX, sets, ...).
- format: the response is `<think>...</think>` (exactly one block, at the start) followed by text with a
  non-empty boxed answer.

math_verify is never run in this process. Its own timeouts use SIGALRM, which only works in the main
thread and cannot interrupt a long computation inside C code, so it runs in persistent worker processes
(`python -I -c`, no import of the caller's `__main__`, no fork of a process that may hold JAX threads). Each
answer gets a hard wall-clock budget (`timeout_s`); a worker that overruns it is killed and the answer scores
0. This makes `score` safe from any thread, and a pathological expression costs at most `timeout_s`.
What runs in this process is linear in the response: box extraction is one brace scan over at most the
last `MAX_RESPONSE_CHARS` characters, stop-token stripping and the format check are single passes, and
only boxed answers of at most `MAX_ANSWER_CHARS` are normalised (a 1 MB response scores in ~0.1 s).
Workers start lazily (only when an answer needs math_verify), one per `_ITEMS_PER_WORKER` such answers in a
batch, up to `max_workers`.
"""

from __future__ import annotations

import atexit
import decimal
import json
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
import unicodedata
from collections.abc import Callable, Sequence

ACCURACY_WEIGHT = 0.9
FORMAT_WEIGHT = 0.1
MAX_ANSWER_CHARS = (
  1000  # Longer boxed contents score 0 without parsing (no sane answer is that long).
)
# Extraction reads at most the last this-many characters of a response: a bound on its (linear) cost
# whatever the policy writes (2048 tokens are ~10k characters; a box opened before the window is unclosed).
MAX_RESPONSE_CHARS = 1 << 18
_ITEMS_PER_WORKER = 16
_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")

# ------------------------------------------------------------------------------------------- extraction

_BOX = r"\\(?:boxed|fbox)\s*\{"
# What the brace scan stops at: a box opener, an escape pair (`\{`, `\}` are not structural) or a
# brace. A backslash right before a box opener does not escape it: `\\boxed{x}` holds the box `x`.
_SCAN_RE = re.compile(rf"{_BOX}|\\(?!{_BOX}).|[{{}}]", re.DOTALL)


def extract_boxed(text: str) -> str | None:
  """Content of the last complete `\\boxed{...}` / `\\fbox{...}`; an unclosed (truncated) box is skipped.

  "Last" is by where the box opens, so in `\\boxed{a \\boxed{b}}` it is `b`. One left-to-right scan with
  a stack of open braces (linear time; the scan jumps between braces and backslashes in C), over at
  most the last `MAX_RESPONSE_CHARS` characters.
  """
  if len(text) > MAX_RESPONSE_CHARS:
    text = text[-MAX_RESPONSE_CHARS:]
  stack: list[int] = []  # content start of each open brace; -1 for a plain (non-box) brace
  best_start, best = -1, None
  for m in _SCAN_RE.finditer(text):
    tok = m.group()
    if tok == "{":
      stack.append(-1)
    elif tok == "}":
      if stack:
        start = stack.pop()
        if start > best_start:  # a box that opens later than the best so far
          best_start, best = start, (start, m.start())
    elif len(tok) > 2:  # a box opener (an escape pair is 2 characters)
      stack.append(m.end())
  return None if best is None else text[best[0] : best[1]]


_WRAPPER_RE = re.compile(
  r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}"
)
_LATEX_SPACE_RE = re.compile(r"\\[,;:! ]|\\q?quad(?![a-zA-Z])")
_SIZING_RE = re.compile(r"\\(?:left|right)(?![a-zA-Z])")


def _unwrap(s: str) -> str:
  """Drops `\\text{..}`-style wrappers (innermost first, repeatedly) and `$`; strips."""
  prev = None
  while prev != s:
    prev, s = s, _WRAPPER_RE.sub(r"\1", s)
  return s.replace("$", "").strip()


def normalize_answer(s: str) -> str:
  """Case/space-insensitive form: `_unwrap`, then drops LaTeX spacing, `\\left` / `\\right`, all
  whitespace and trailing periods, and lower-cases."""
  s = _LATEX_SPACE_RE.sub("", _SIZING_RE.sub("", _unwrap(s)))
  s = re.sub(r"\s+", "", s).lower()
  return s.rstrip(".")


# Unicode vulgar fractions (¼ ½ ¾, ⅐ … ⅞, ↉), optionally after a whole number (`1½`, a mixed number).
_VULGAR_RE = re.compile(r"(\d+)?\s*([\u00bc-\u00be\u2150-\u215e\u2189])")
# The whole answer is infinity, however written (`inf`, `+Infinity`, `∞`, `-\infty`).
_INFINITY_RE = re.compile(r"^([+-]?)\s*(?:inf|infinity|infty|\\infty|\u221e)$", re.IGNORECASE)


def _vulgar_fraction(m: re.Match) -> str:
  # NFKC spells each as "<num>⁄<den>" (U+2044 FRACTION SLASH), e.g. "½" -> "1⁄2".
  num, den = (int(x) for x in unicodedata.normalize("NFKC", m.group(2)).split("\u2044"))
  whole = int(m.group(1)) if m.group(1) else 0
  return f"\\frac{{{whole * den + num}}}{{{den}}}"


def canonical_symbols(s: str) -> str:
  """Unicode math symbols in their LaTeX spelling, so that both ways of writing an answer compare
  (the string match, the number match and math_verify all see this form): `½` -> `\\frac{1}{2}`
  (`1½` -> `\\frac{3}{2}`), `⁄` -> `/`, `∞` -> `\\infty`; a whole answer that is infinity in
  words (`inf`, `Infinity`, `+\\infty`) -> `\\infty` (`-\\infty` with a minus). Longer than
  `MAX_ANSWER_CHARS`: unchanged (it scores 0 anyway)."""
  if len(s) > MAX_ANSWER_CHARS:
    return s
  s = _VULGAR_RE.sub(_vulgar_fraction, s).replace("\u2044", "/").replace("\u221e", "\\infty")
  s = s.replace("\u00b0", "^\\circ")  # 30° is 30^\circ (math_verify reads the LaTeX degree only)
  m = _INFINITY_RE.match(_unwrap(s))
  if m:
    return ("-" if m.group(1) == "-" else "") + "\\infty"
  return s


# Option letters A to J (MMMU-Pro has up to ten options).
_MC_GOLD_RE = re.compile(r"^\(?([A-J])\)?[.:)]?$")
_MC_PRED_RE = re.compile(r"^\(?([A-Ja-j])\)?(?:[.:)]|\s|$)")
OPTION_LETTERS = "ABCDEFGHIJ"


def choice_letter(s: str, gold: bool = False) -> str | None:
  """The option letter of `A`, `(A)`, `A.`, `A)`, `A: text`, `(A) text` (gold: the letter alone), upper-case."""
  m = (_MC_GOLD_RE if gold else _MC_PRED_RE).match(_unwrap(s))
  return m.group(1).upper() if m else None


def resolve_choice(
  pred: str | None, gold: str, choices: Sequence[str] | None
) -> tuple[str | None, str]:
  """(prediction, gold) to compare once the question's option texts are known (choices[k] is the
  text of letter k): a gold letter against a prediction without a letter becomes the gold option's
  text; a prediction's letter against a gold that is not a letter becomes that option's text.
  Anything else (no choices, a letter outside them, letters on both sides) is returned unchanged."""
  if not choices or pred is None:
    return pred, gold
  gold_letter, pred_letter = choice_letter(gold, gold=True), choice_letter(pred)
  if gold_letter is not None:
    k = OPTION_LETTERS.index(gold_letter)
    if pred_letter is None and k < len(choices):
      return pred, choices[k]
    return pred, gold
  if pred_letter is not None and OPTION_LETTERS.index(pred_letter) < len(choices):
    return choices[OPTION_LETTERS.index(pred_letter)], gold
  return pred, gold


# A decimal number, optionally in scientific notation (`1e+300`, `2.5E-3`: a float answer column
# holding a large or small number reads as such text).
_NUMBER_RE = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?$")
_WORDS_RE = re.compile(
  r"^[a-z][a-z'\-]*[a-z]$"
)  # After normalize_answer: letters only, >= 2 of them.


def _fast_accuracy(pred: str | None, gold: str) -> float | None:
  """Accuracy decided without math_verify, or None when math_verify must decide."""
  if pred is None or len(pred) > MAX_ANSWER_CHARS:
    return 0.0
  p, g = normalize_answer(pred), normalize_answer(gold)
  if not p:
    return 0.0
  if p == g:
    return 1.0
  gold_letter = choice_letter(gold, gold=True)
  if gold_letter is not None:
    return float(choice_letter(pred) == gold_letter)
  if _NUMBER_RE.match(p) and _NUMBER_RE.match(g):
    # Exact decimal arithmetic: `Decimal` holds the exponent as a number, so 1e300 costs no more
    # than 3 (a `Fraction` of `1e999999` would build a million-digit integer).
    try:
      return float(decimal.Decimal(p) == decimal.Decimal(g))
    except decimal.InvalidOperation:  # an exponent beyond Decimal's range: equal text only
      return 0.0
  if _WORDS_RE.match(p) or _WORDS_RE.match(g):
    return 0.0
  return None


# ------------------------------------------------------------------------------------------- formatting

_FORMAT_RE = re.compile(r"^\s*<think>(.*?)</think>(.*)$", re.DOTALL)


def strip_stop_tokens(response: str) -> str:
  """Drops trailing `<|im_end|>` / `<|endoftext|>` left by decoding without skip_special_tokens."""
  end = len(response)
  changed = True
  while changed:  # Moves an end index (no copies): linear however many stop tokens trail.
    changed = False
    while end and response[end - 1].isspace():
      end -= 1
    for tok in _STOP_TOKENS:
      if response.endswith(tok, 0, end):
        end, changed = end - len(tok), True
  return response[:end]


def format_reward(response: str) -> float:
  """1.0 iff the response is `<think>...</think>` then text with a non-empty boxed answer, else 0.0."""
  m = _FORMAT_RE.match(strip_stop_tokens(response))
  if m is None:
    return 0.0
  thought, rest = m.groups()
  if "<think>" in thought or "<think>" in rest or "</think>" in rest:
    return 0.0
  boxed = extract_boxed(rest)
  return float(boxed is not None and boxed.strip() != "")


# --------------------------------------------------------------------------- math_verify worker processes

# Runs as `python -I -c _WORKER_SRC <inner_timeout_s>`: one JSON request per stdin line, one reply per line.
_WORKER_SRC = r"""
import json, logging, sys
logging.disable(logging.CRITICAL)  # math_verify logs every timeout as a warning.
out, sys.stdout = sys.stdout, sys.stderr  # Replies own stdout; stray prints go to stderr.
from math_verify import parse, verify
inner = int(sys.argv[1])
out.write('{"ready": true}\n'); out.flush()
while True:
    line = sys.stdin.readline()
    if not line:
        break
    req = json.loads(line)
    try:
        gold = parse("\\boxed{" + req["gold"] + "}", parsing_timeout=inner)
        pred = parse("\\boxed{" + req["pred"] + "}", parsing_timeout=inner)
        ok = bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=inner))
    except BaseException:  # Includes math_verify's TimeoutException (a BaseException).
        ok = False
    out.write(json.dumps({"ok": ok}) + "\n"); out.flush()
"""


class _Worker:
  """One math_verify subprocess and its partial stdout line buffer."""

  def __init__(self, inner_timeout_s: int, startup_timeout_s: float):
    self.proc = subprocess.Popen(
      [sys.executable, "-I", "-c", _WORKER_SRC, str(inner_timeout_s)],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      bufsize=0,
      start_new_session=True,
    )  # Ctrl-C in the terminal goes to the trainer only.
    self.fd = self.proc.stdout.fileno()
    self.buf = b""
    line = self.read_line(time.monotonic() + startup_timeout_s)
    if line is None or not json.loads(line).get("ready"):
      self.kill()
      raise RuntimeError(
        f"rewards: math_verify worker ({sys.executable}) did not start within "
        f"{startup_timeout_s:.0f}s; is math-verify installed in this environment?"
      )

  def send(self, gold: str, pred: str) -> None:
    self.proc.stdin.write((json.dumps({"gold": gold, "pred": pred}) + "\n").encode())
    self.proc.stdin.flush()

  def read_available(self) -> bool:
    """Reads what the pipe holds (call when select says readable); False on EOF (worker died)."""
    chunk = os.read(self.fd, 1 << 16)
    self.buf += chunk
    return bool(chunk)

  def pop_line(self) -> bytes | None:
    if b"\n" not in self.buf:
      return None
    line, self.buf = self.buf.split(b"\n", 1)
    return line

  def read_line(self, deadline: float) -> bytes | None:
    """Blocks until one full line or the deadline; None on timeout or EOF."""
    while (line := self.pop_line()) is None:
      remaining = deadline - time.monotonic()
      if remaining <= 0 or not select.select([self.fd], [], [], remaining)[0]:
        return None
      if not self.read_available():
        return None
    return line

  def kill(self) -> None:
    if self.proc.poll() is None:
      self.proc.kill()
    self.proc.wait()
    for f in (self.proc.stdin, self.proc.stdout):
      try:
        f.close()
      except OSError:
        pass

  def close(self) -> None:
    """Asks the worker to exit (EOF on stdin); kills it if it does not within a second."""
    try:
      self.proc.stdin.close()
      self.proc.wait(timeout=1.0)
    except (OSError, subprocess.TimeoutExpired):
      pass
    self.kill()


class MathVerifyPool:
  """Persistent math_verify workers with a hard per-answer timeout. Thread-safe (calls are serialized).

  Args:
    max_workers: at most this many processes (default: cpu_count - 1, clipped to [1, 4]).
    timeout_s: wall-clock budget per answer, from dispatch; an overrunning worker is killed, answer -> False.
    inner_timeout_s: math_verify's own (SIGALRM) timeout per parse / comparison, whole seconds; the first
      line of defense, so a killed worker (and its restart, ~1 s) stays rare.
    startup_timeout_s: budget for a worker to import math_verify (not counted in `timeout_s`).
  """

  def __init__(
    self,
    max_workers: int | None = None,
    timeout_s: float = 5.0,
    inner_timeout_s: int | None = None,
    startup_timeout_s: float = 120.0,
  ):
    if timeout_s <= 0:
      raise ValueError(f"MathVerifyPool: timeout_s must be > 0, got {timeout_s}")
    self.max_workers = max_workers or max(1, min(4, (os.cpu_count() or 2) - 1))
    self.timeout_s = float(timeout_s)
    self.inner_timeout_s = inner_timeout_s or max(1, int(timeout_s) // 2)
    self.startup_timeout_s = startup_timeout_s
    self._workers: list[_Worker] = []
    self._lock = threading.Lock()
    self._pid = os.getpid()
    self.num_timeouts = 0  # Answers cut off by the hard timeout (for logging).

  def _ensure_workers(self, n: int) -> None:
    if os.getpid() != self._pid:  # Forked child: the parent owns those pipes; start our own.
      self._workers, self._pid = [], os.getpid()
    while len(self._workers) < n:
      self._workers.append(_Worker(self.inner_timeout_s, self.startup_timeout_s))

  def _drop(self, worker: _Worker) -> None:
    worker.kill()
    self._workers.remove(worker)

  def verify_many(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
    """[(gold, pred)] -> [math_verify says equal]; False for timeouts and crashes."""
    if not pairs:
      return []
    with self._lock:
      self._ensure_workers(min(self.max_workers, math.ceil(len(pairs) / _ITEMS_PER_WORKER)))
      results = [False] * len(pairs)
      todo = list(range(len(pairs)))[::-1]
      busy: dict[int, tuple[_Worker, int, float]] = {}  # fd -> (worker, item, deadline)
      idle = list(self._workers)
      while todo or busy:
        while todo and idle:
          w, i = idle.pop(), todo.pop()
          try:
            w.send(*pairs[i])
          except OSError:  # Worker died between calls: replace it and retry the item.
            self._drop(w)
            self._ensure_workers(len(self._workers) + 1)
            idle.append(self._workers[-1])
            todo.append(i)
            continue
          busy[w.fd] = (w, i, time.monotonic() + self.timeout_s)
        if not busy:
          continue
        wait = max(0.0, min(d for _, _, d in busy.values()) - time.monotonic())
        readable, _, _ = select.select(list(busy), [], [], wait)
        for fd in readable:
          w, i, _ = busy[fd]
          alive = w.read_available()
          line = w.pop_line()
          if line is not None:
            results[i] = bool(json.loads(line)["ok"])
            del busy[fd]
            idle.append(w)
          elif not alive:
            del busy[fd]
            self._drop(w)
        now = time.monotonic()
        for fd, (w, i, deadline) in list(busy.items()):
          if now >= deadline:  # Hard timeout: the only way to stop sympy stuck in C code.
            del busy[fd]
            self._drop(w)
            self.num_timeouts += 1
        if not self._workers and (todo or busy):
          self._ensure_workers(1)
          idle = list(self._workers)
      return results

  def close(self) -> None:
    with self._lock:
      for w in self._workers:
        w.close()
      self._workers = []


_DEFAULT_POOL: MathVerifyPool | None = None
_DEFAULT_POOL_LOCK = threading.Lock()


def default_pool() -> MathVerifyPool:
  """The process-wide pool used by `score` / `score_batch` (created on first use, closed at exit)."""
  global _DEFAULT_POOL
  with _DEFAULT_POOL_LOCK:
    if _DEFAULT_POOL is None:
      _DEFAULT_POOL = MathVerifyPool()
      atexit.register(_DEFAULT_POOL.close)
    return _DEFAULT_POOL


# ----------------------------------------------------------------------------------------------- scoring


def _combine(acc: float, fmt: float) -> dict[str, float]:
  return {"overall": ACCURACY_WEIGHT * acc + FORMAT_WEIGHT * fmt, "accuracy": acc, "format": fmt}


def score_batch(
  responses: Sequence[str],
  answers: Sequence[str],
  pool: MathVerifyPool | None = None,
  choices: Sequence[Sequence[str] | None] | None = None,
) -> list[dict[str, float]]:
  """[score(r, a) for r, a in zip(responses, answers)], sending only the math cases to the workers.

  choices[i]: the option texts of item i's question (A, B, ...), or None / () when it has none
  (`resolve_choice`); None: no item has options (training)."""
  if len(responses) != len(answers):
    raise ValueError(f"score_batch: {len(responses)} responses but {len(answers)} answers")
  if choices is not None and len(choices) != len(answers):
    raise ValueError(f"score_batch: {len(choices)} choice lists for {len(answers)} answers")
  accs: list[float | None] = []
  math_items: list[int] = []
  preds: list[str | None] = []
  golds: list[str] = []
  for i, (resp, gold) in enumerate(zip(responses, answers)):
    if not isinstance(resp, str) or not isinstance(gold, str):
      raise TypeError(
        f"score_batch: item {i}: response and answer must be str, got "
        f"{type(resp).__name__} and {type(gold).__name__}"
      )
    pred = extract_boxed(strip_stop_tokens(resp))
    gold = extract_boxed(gold) or gold  # Tolerates golds stored as "\\boxed{..}".
    if choices is not None:
      pred, gold = resolve_choice(pred, gold, choices[i])
    pred = None if pred is None else canonical_symbols(pred)
    gold = canonical_symbols(gold)
    preds.append(pred)
    golds.append(gold)
    accs.append(_fast_accuracy(pred, gold))
    if accs[-1] is None:
      math_items.append(i)
  if math_items:
    pairs = [(_unwrap(golds[i]), _unwrap(preds[i])) for i in math_items]
    for i, ok in zip(math_items, (pool or default_pool()).verify_many(pairs)):
      accs[i] = float(ok)
  return [_combine(acc, format_reward(resp)) for acc, resp in zip(accs, responses)]


def score(response: str, answer: str) -> dict[str, float]:
  """{"overall", "accuracy", "format"} in [0, 1] for one response against its ground-truth answer."""
  return score_batch([response], [answer])[0]


# ---------------------------------------------------------------------------------------------- registry

RewardFn = Callable[[str, str], dict[str, float]]
BatchRewardFn = Callable[[Sequence[str], Sequence[str]], list[dict[str, float]]]
REWARD_FNS: dict[str, RewardFn] = {"pgpo_math": score}
BATCH_REWARD_FNS: dict[str, BatchRewardFn] = {"pgpo_math": score_batch}


def get_reward_fn(name: str) -> RewardFn:
  """The per-example reward registered as `name`."""
  if name not in REWARD_FNS:
    raise ValueError(f"unknown reward function {name!r}; valid names: {sorted(REWARD_FNS)}")
  return REWARD_FNS[name]


def get_batch_reward_fn(name: str) -> BatchRewardFn:
  """The batched reward registered as `name` (same values as mapping `get_reward_fn(name)`)."""
  if name not in BATCH_REWARD_FNS:
    raise ValueError(f"unknown reward function {name!r}; valid names: {sorted(BATCH_REWARD_FNS)}")
  return BATCH_REWARD_FNS[name]
