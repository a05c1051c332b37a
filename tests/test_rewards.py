"""Rewards: boxed extraction, answer equivalence, format, the combined score and the math_verify timeouts."""

import decimal
import fractions
import re
import threading
import time
import unicodedata

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pgpo_jax import rewards


def _resp(boxed: str) -> str:
  return f"<think>reasoning</think> The answer is \\boxed{{{boxed}}}."


# (boxed prediction, ground truth)
EQUIVALENT = [
  ("0.5", "\\frac{1}{2}"),
  ("\\frac{1}{2}", "0.5"),
  ("1/2", "0.5"),
  ("\\dfrac{1}{2}", "1/2"),
  ("0.50", "0.5"),
  ("12.0", "12"),
  ("$3$", "3"),
  ("3.", "3"),
  ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}"),
  ("\\sqrt{12}", "2\\sqrt{3}"),
  ("90^\\circ", "90"),
  ("\\{1, 2\\}", "\\{2,1\\}"),
  ("Red", "red"),
  ("red.", "red"),
  ("\\text{blue}", "blue"),
  (" Yes ", "yes"),
  ("NO", "no"),
  ("light blue", "Light Blue"),
  ("B", "B"),
  ("(B)", "B"),
  ("B. 12", "B"),
  ("b", "(B)"),
  ("(C) 5 cm", "C."),
  ("\\text{(D)}", "D"),
  ("\\left( 1, 2 \\right)", "(1,2)"),
  ("3", "\\boxed{3}"),  # Gold stored boxed.
  ("1e300", "1e+300"),  # A float answer cell of 1e300 reads as '1e+300'; this scored 0.
  ("1E+300", "1e300"),
  ("1000000000000000000000", "1e+21"),
  ("0.0025", "2.5e-3"),
  ("½", "\\frac{1}{2}"),  # Unicode fractions scored 0.
  ("½", "0.5"),
  ("0.5", "½"),
  ("1½", "3/2"),  # a mixed number
  ("-2 ¾", "-2.75"),
  ("1⁄2", "0.5"),  # U+2044 FRACTION SLASH
  ("\\infty", "inf"),  # infinity spelled as a word scored 0 (words never reach math_verify).
  ("inf", "\\infty"),
  ("∞", "\\infty"),
  ("Infinity", "∞"),
  ("-\\infty", "-inf"),
  ("+\\infty", "infinity"),
  ("$\\infty$", "\\text{inf}"),
  ("(0, ∞)", "(0,\\infty)"),
]
NOT_EQUIVALENT = [
  ("0.5", "\\frac{1}{3}"),
  ("2", "3"),
  ("0.51", "0.5"),
  ("\\sqrt{2}", "2"),
  ("red", "blue"),
  ("on", "no"),  # math_verify alone says equal (o*n == n*o): words must never reach it.
  ("lube", "blue"),
  ("three", "3"),
  ("yes", "no"),
  ("A", "B"),
  ("(C) 5", "B"),
  ("B", "3"),
  ("", "3"),
  ("   ", "yes"),
  ("1e300", "1e+301"),
  ("1e300", "1.0000000000000001e300"),
  ("\\infty", "-\\infty"),
  ("-inf", "inf"),
  ("½", "⅓"),
  ("1½", "1/2"),  # not one times a half
  ("info", "inf"),
  ("(0, ∞)", "(0,1)"),
]


@pytest.fixture(scope="module")
def patient_pool():
  """A verifier with a generous budget: these tests check equivalence, not speed, and on a loaded CI
  machine the default 5 s budget (2 s inside math_verify) can run out on a true equivalence, which
  then scores 0. The timeout behaviour itself is tested below with its own pools."""
  pool = rewards.MathVerifyPool(max_workers=1, timeout_s=60.0, inner_timeout_s=30)
  yield pool
  pool.close()


@pytest.mark.parametrize("pred,gold", EQUIVALENT)
def test_equivalent_answers_score_one(pred, gold, patient_pool):
  assert rewards.score_batch([_resp(pred)], [gold], pool=patient_pool)[0]["accuracy"] == 1.0, (
    pred,
    gold,
  )


@pytest.mark.parametrize("pred,gold", NOT_EQUIVALENT)
def test_non_equivalent_answers_score_zero(pred, gold):
  assert rewards.score(_resp(pred), gold)["accuracy"] == 0.0, (pred, gold)


_VULGAR = [chr(c) for c in [*range(0xBC, 0xBF), *range(0x2150, 0x215F), 0x2189]]


@pytest.mark.parametrize("ch", _VULGAR)
def test_every_unicode_fraction_equals_its_value(ch, patient_pool):
  """Each of the Unicode vulgar fractions against its value as a plain fraction (from the Unicode
  database's numeric value, not from the code under test), and with a whole part before it."""
  value = fractions.Fraction(unicodedata.numeric(ch)).limit_denominator(10)
  for pred, gold in ((ch, f"{value.numerator}/{value.denominator}"), (f"3{ch}", str(3 + value))):
    got = rewards.score_batch([_resp(pred)], [gold], pool=patient_pool)[0]["accuracy"]
    assert got == 1.0, (pred, gold)


class _NoMathVerify:
  """A pool that fails the test when an answer reaches math_verify."""

  def verify_many(self, pairs):
    raise AssertionError(f"math_verify was asked about {pairs}; numbers must be decided before")


@given(st.floats(allow_nan=False, allow_infinity=False))
@settings(max_examples=200, deadline=None)
def test_a_float_answer_equals_its_number_in_any_decimal_notation(x):
  """A float answer cell reads as `str(x)` ('1e+300', '5e-324', '0.1'); the same number written
  in scientific or positional notation scores 1, decided as exact decimal numbers."""
  gold = str(x)
  d = decimal.Decimal(gold)
  for pred in (f"{d:e}", f"{d:f}", f"{d:E}", repr(x)):
    got = rewards.score_batch([_resp(pred)], [gold], pool=_NoMathVerify())[0]["accuracy"]
    assert got == 1.0, (pred, gold)


@given(
  st.floats(allow_nan=False, allow_infinity=False), st.floats(allow_nan=False, allow_infinity=False)
)
@settings(max_examples=200, deadline=None)
def test_different_float_answers_never_match(x, y):
  assume(x != y)
  for pred in (repr(x), f"{decimal.Decimal(repr(x)):e}"):
    got = rewards.score_batch([_resp(pred)], [str(y)], pool=_NoMathVerify())[0]["accuracy"]
    assert got == 0.0, (pred, y)


@pytest.mark.parametrize(
  "text,expected",
  [
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),
    ("a \\boxed{2} then \\boxed{3} end", "3"),
    ("\\boxed{2} and a truncated \\boxed{\\frac{1}{", "2"),
    ("\\boxed {x^{2}}", "x^{2}"),
    ("\\fbox{7}", "7"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
    ("\\boxed{}", ""),
    ("no box here: 42", None),
    ("\\boxed{unclosed", None),
  ],
)
def test_extract_boxed(text, expected):
  assert rewards.extract_boxed(text) == expected


@settings(max_examples=200, deadline=None)
@given(
  st.text(alphabet=st.characters(blacklist_characters="{}\\", blacklist_categories=("Cs",))),
  st.text(alphabet=st.characters(blacklist_characters="{}\\", blacklist_categories=("Cs",))),
)
def test_extract_boxed_property(inner, outer):
  """Nested braces survive and the last box wins, whatever plain text surrounds them."""
  nested = f"{{{inner}}}x{{{{{inner}}}}}"
  assert rewards.extract_boxed(f"{outer}\\boxed{{{nested}}}{outer}") == nested
  assert rewards.extract_boxed(f"\\boxed{{first}}{outer}\\boxed{{{inner}}}") == inner


def _naive_extract_boxed(text):
  """Reference: for every box opener, scan right for its matching brace (quadratic; small inputs only)."""
  last = None
  for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
    depth, i = 0, m.end() - 1
    while i < len(text):
      if text[i] == "\\":
        i += 2
        continue
      depth += {"{": 1, "}": -1}.get(text[i], 0)
      if depth == 0:
        last = text[m.end() : i]
        break
      i += 1
  return last


_PIECES = [
  "\\",
  "{",
  "}",
  "\\boxed{",
  "\\fbox{",
  "\\boxed {",
  "boxed",
  " ",
  "x",
  "\\\\",
  "\n",
  "\\{",
  "\\}",
]


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=16).map("".join))
def test_extract_boxed_matches_naive_reference(text):
  """Escapes, nesting, unclosed and stray braces: the linear scan agrees with the per-box scan."""
  assert rewards.extract_boxed(text) == _naive_extract_boxed(text)


def test_escaped_backslash_before_a_box_and_long_responses():
  assert rewards.extract_boxed("\\\\boxed{4}") == "4"  # `\\boxed{4}`: a line break, then the box
  filler = "word " * (rewards.MAX_RESPONSE_CHARS // 5 + 10)
  assert (
    rewards.extract_boxed(filler + "\\boxed{7}") == "7"
  )  # past the window: the answer at the end counts
  assert rewards.extract_boxed("\\boxed{7}" + filler) is None  # a box before the window is not seen


# Responses a policy can write; the per-box scan took 8 s for the first, 61 s for the nested one.
PATHOLOGICAL = {
  "unclosed_x4096": ("\\boxed{" * 4096, None),
  "unclosed_100kB": ("\\boxed{" * 15000, None),
  "unclosed_1MB": ("\\boxed{" * 150000, None),
  "nested_10k": ("\\boxed{" * 10000 + "x" + "}" * 10000, "x"),
  "open_braces_1MB": ("{" * (1 << 20), None),
  "stop_tokens_1MB": ("<think>x</think> \\boxed{3}" + "<|im_end|>" * 100000, "3"),
}


@pytest.mark.serial  # a wall-clock bound
@pytest.mark.parametrize("name", list(PATHOLOGICAL))
def test_pathological_responses_are_scored_fast(name):
  text, boxed = PATHOLOGICAL[name]
  start = time.monotonic()
  assert rewards.extract_boxed(rewards.strip_stop_tokens(text)) == boxed
  out = rewards.score(text, "3")  # the whole reward: extraction, format, (no) math_verify
  assert time.monotonic() - start < 1.0, name
  assert out["accuracy"] == float(boxed == "3")


def test_no_box_and_last_box():
  assert rewards.score("<think>x</think> The answer is 3.", "3")["accuracy"] == 0.0
  multi = "<think>maybe \\boxed{2}</think> first \\boxed{2}, finally \\boxed{3}"
  assert rewards.score(multi, "3")["accuracy"] == 1.0
  assert rewards.score(multi, "2")["accuracy"] == 0.0


@pytest.mark.parametrize(
  "response,expected",
  [
    ("<think>I count.</think> \\boxed{3}", 1.0),
    ("  <think>\nmulti\nline\n</think>\nSo the answer is \\boxed{3}.", 1.0),
    ("<think></think>\\boxed{3}", 1.0),
    ("<think>x</think> \\boxed{3}<|im_end|>", 1.0),
    ("<think>x</think> \\boxed{3}<|im_end|><|endoftext|>", 1.0),
    ("\\boxed{3}", 0.0),  # no reasoning block
    ("Sure! <think>x</think> \\boxed{3}", 0.0),  # text before <think>
    ("<think>x \\boxed{3}</think> done", 0.0),  # box only inside the reasoning
    ("<think>x</think> \\boxed{}", 0.0),  # empty box
    ("<think>x</think> \\boxed{3", 0.0),  # unclosed box
    ("<think>x</think> <think>y</think> \\boxed{3}", 0.0),  # two blocks
    ("<think>x \\boxed{3}", 0.0),  # unclosed think
    ("<think>a<think>b</think> \\boxed{3}", 0.0),  # nested think
  ],
)
def test_format(response, expected):
  assert rewards.format_reward(response) == expected
  assert rewards.score(response, "3")["format"] == expected


def test_overall_combines_accuracy_and_format():
  assert rewards.score("<think>x</think> \\boxed{3}", "3") == {
    "overall": 1.0,
    "accuracy": 1.0,
    "format": 1.0,
  }
  assert rewards.score("\\boxed{3}", "3") == {"overall": 0.9, "accuracy": 1.0, "format": 0.0}
  assert rewards.score("<think>x</think> \\boxed{4}", "3") == pytest.approx(
    {"overall": 0.1, "accuracy": 0.0, "format": 1.0}
  )
  assert rewards.score("nothing", "3") == {"overall": 0.0, "accuracy": 0.0, "format": 0.0}


def test_score_batch_equals_map_score():
  pairs = [(_resp(p), g) for p, g in EQUIVALENT + NOT_EQUIVALENT]
  pairs += [
    ("<think>x</think> \\boxed{3}", "3"),
    ("no box", "3"),
    ("\\boxed{2} \\boxed{1/2}", "0.5"),
  ]
  responses, answers = zip(*pairs)
  assert rewards.score_batch(list(responses), list(answers)) == [
    rewards.score(r, a) for r, a in pairs
  ]
  assert rewards.score_batch([], []) == []
  with pytest.raises(ValueError, match="2 responses but 1 answers"):
    rewards.score_batch(["a", "b"], ["a"])


@pytest.mark.serial  # a wall-clock bound
def test_pathological_expression_returns_within_timeout():
  rewards.score(
    _resp("1/2"), "0.5"
  )  # Warm the default pool: worker start-up is not part of the budget.
  pool = rewards.default_pool()
  start = time.monotonic()
  out = rewards.score(_resp("9^{9^{9^{9}}}"), "5")
  assert time.monotonic() - start < pool.timeout_s + 1.5
  assert out["accuracy"] == 0.0 and out["format"] == 1.0


@pytest.mark.serial  # a wall-clock bound
def test_hard_timeout_kills_worker_and_pool_recovers():
  """math_verify's own alarm (5 s) is longer than the hard budget (1 s): the worker must be killed."""
  pool = rewards.MathVerifyPool(max_workers=1, timeout_s=1.0, inner_timeout_s=5)
  try:
    assert pool.verify_many([("1", "1")]) == [True]  # Start the worker outside the timed region.
    start = time.monotonic()
    assert pool.verify_many([("5", "9^{9^{9^{9}}}")]) == [False]
    assert time.monotonic() - start < 2.5
    assert pool.num_timeouts == 1
    assert pool.verify_many([("0.5", "\\frac{1}{2}"), ("2", "3")]) == [True, False]
  finally:
    pool.close()


def test_works_off_the_main_thread():
  """math_verify's SIGALRM timeouts fail outside the main thread; the worker processes avoid that."""
  out, errors = [], []

  def run():
    try:
      out.append(rewards.score(_resp("\\frac{2}{4}"), "0.5"))
    except Exception as e:  # pragma: no cover - reported below
      errors.append(e)

  t = threading.Thread(target=run)
  t.start()
  t.join(timeout=60)
  assert not errors and out == [{"overall": 1.0, "accuracy": 1.0, "format": 1.0}]


def test_registry():
  assert rewards.get_reward_fn("pgpo_math") is rewards.score
  assert rewards.get_batch_reward_fn("pgpo_math") is rewards.score_batch
  with pytest.raises(ValueError, match="pgpo_math"):
    rewards.get_reward_fn("nope")
