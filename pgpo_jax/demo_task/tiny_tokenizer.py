"""A tiny Qwen2.5-VL-compatible tokenizer + processor folder for the CPU demo (no hub access needed).

`build_tiny_model_folder(out_dir)` trains a small byte-level BPE (Qwen's NFC normalizer, split regex and
ByteLevel pre-tokenizer, so it behaves like the real Qwen2 tokenizer, only with fewer merges), appends the
22 Qwen added tokens in Qwen's order, wraps it as a `Qwen2Tokenizer`, adds the Qwen2.5-VL ChatML template
and a PIL image processor, and saves the processor with `save_pretrained`. The folder then loads with
`pgpo_jax.data.hf_processor.load_processor` / `load_tokenizer`. It does not write a model `config.json`: build
that from the returned ids (`image_token_id`, `vision_start_token_id`, ..., `vocab_size`).

The BPE corpus covers the synthetic task (questions, answers, templated `<think>...</think> \\boxed{}`
solutions), the chat-template words, the format instruction and some generic English and LaTeX, so task
text tokenizes compactly. Output is a pure function of the arguments: the same files byte for byte.
"""

from __future__ import annotations

import json
import os

from tokenizers import (
  AddedToken,
  Regex,
  Tokenizer,
  decoders,
  models,
  normalizers,
  pre_tokenizers,
  trainers,
)
from transformers import Qwen2Tokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from pgpo_jax.data.hf_processor import (
  NONSPECIAL_ADDED_TOKENS,
  SPECIAL_TOKENS,
  Qwen25VLProcessorNoVideo,
  special_token_ids,
)
from pgpo_jax.demo_task import synthetic

# Qwen2's pre-tokenizer split pattern (tokenizer.json of every Qwen2/2.5 model): contractions, letter runs
# with one optional leading non-letter, single digits, punctuation runs, newlines, spaces.
QWEN_SPLIT_PATTERN = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
  r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
TASKS = (
  "answer",
  "chain",
)  # the demo tasks: synthetic.py (short answers), chain.py (reasoning chains)

# The Qwen2.5-VL Instruct chat template (ChatML), rewritten with whitespace control; renders the same string:
# a default system turn when the first message is not a system one; string content as is; list content item
# by item, an image item -> <|vision_start|><|image_pad|><|vision_end|> (video likewise), no newline after it.
CHAT_TEMPLATE = (
  "{%- set image_count = namespace(value=0) -%}\n"
  "{%- set video_count = namespace(value=0) -%}\n"
  "{%- for message in messages -%}\n"
  "{%- if loop.first and message['role'] != 'system' -%}\n"
  "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
  "{% endif -%}\n"
  "<|im_start|>{{ message['role'] }}\n"
  "{% if message['content'] is string -%}\n"
  "{{ message['content'] }}<|im_end|>\n"
  "{% else -%}\n"
  "{%- for content in message['content'] -%}\n"
  "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}\n"
  "{%- set image_count.value = image_count.value + 1 -%}\n"
  "{%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}\n"
  "<|vision_start|><|image_pad|><|vision_end|>\n"
  "{%- elif content['type'] == 'video' or 'video' in content -%}\n"
  "{%- set video_count.value = video_count.value + 1 -%}\n"
  "{%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}\n"
  "<|vision_start|><|video_pad|><|vision_end|>\n"
  "{%- elif 'text' in content -%}\n"
  "{{ content['text'] }}\n"
  "{%- endif -%}\n"
  "{%- endfor -%}\n"
  "<|im_end|>\n"
  "{% endif -%}\n"
  "{%- endfor -%}\n"
  "{%- if add_generation_prompt -%}\n"
  "<|im_start|>assistant\n"
  "{% endif -%}\n"
)

# The R1-style format instruction (EasyR1's math prompt) the demo appends to questions.
FORMAT_INSTRUCTION = (
  "You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
  "The reasoning process MUST BE enclosed within <think> </think> tags. "
  "The final answer MUST BE put in \\boxed{}."
)

_GENERIC_TEXT = r"""
system user assistant Picture 1: Video 1: Describe this image. What is shown in the picture?
The image shows a few simple shapes on a light background. Look at the image carefully and answer the question.
First, let us count the objects one by one. Then we compare their sizes, colors and positions.
The answer is the number of objects that satisfy the condition. Therefore the final answer is given below.
Let x be the unknown length. Then x + 3 = 7, so x = 4. The area of the triangle is \frac{1}{2} b h.
The circle has radius r and area \pi r^2. The square has side a and area a^2. Hence 2 \times 3 = 6.
We have \sqrt{2} \approx 1.414, \frac{3}{4} = 0.75 and 50\% of 8 is 4. The angle is 90^\circ.
If a = b and b = c, then a = c. Since 12 / 4 = 3 and 3 \cdot 5 = 15, the result is 15.
Choices: (A) 1 (B) 2 (C) 3 (D) 4. The correct option is B. Yes, it is. No, it is not.
left right top bottom above below larger smaller largest smallest biggest more less than equal same different
one two three four five six seven eight nine ten zero first second third last next number total
0 1 2 3 4 5 6 7 8 9 10 12 15 20 25 30 45 60 90 100 180 360 0.5 1.5 3.14
\frac \sqrt \pi \cdot \times \div \circ \angle \triangle \overline \text \mathrm \left( \right)
\leq \geq \neq \approx \infty \sin \cos \tan \log \ln \alpha \beta \theta \sum \int
"""
# Common words of visual math questions and answers (once each; they seed merges beyond the task's words).
_WORDS = """
a about above according add after again all along also an and angle angles answer any approximately arc area
are around as at axis bar base be because before below best between both but by calculate can center centimeter
chart chord circle circumference closest column compute cone consider convert coordinate correct corresponding
count cube cylinder data decimal degree degrees denote determine diagonal diagram diameter difference distance
divide divided do does each edge edges equal equals equation equilateral estimate even every exactly express
expression face faces factor figure find following for formula fraction from function given graph greater
grid half has have height hexagon hint how hypotenuse if in inch inches integer intersection into is isosceles
it its label length line lines many mean measure median meter meters middle minus minimum maximum missing mode
more most multiply must near nearest need negative not number object objects odd of on opposite or order other
our parallel parallelogram part pentagon percent perimeter perpendicular pie plane plot point points polygon
positive possible prism probability product proportion pyramid quadrilateral question radius range rate ratio
rectangle reflect region regular remaining right rotate round row ruler scale segment sequence set shaded shape
shapes shown side sides similar simplify since slope smallest so solid solve speed sphere square squares
statement sum surface table tangent than that the their them then there these they third this those time to
total trapezoid triangle triangles true two unit units use using value values vertex vertices volume was we
what when where which while whole width with would write x y z
"""


def corpus_lines(seed: int = 0, n_examples: int = 3000, task: str = "answer") -> list[str]:
  """The BPE training text: task templates, `n_examples` seeded task samples, chat words, generic text;
  `task="chain"` adds questions and worked solutions of the reasoning-chain task (`chain.py`)."""
  rng = synthetic.split_rng(seed, stream=1_000_000)  # A stream no data split uses.
  samples = [synthetic.sample_example(rng, image_size=56) for _ in range(n_examples)]
  lines = synthetic.corpus_lines()
  lines += [f"{ex.question} {FORMAT_INSTRUCTION}" for ex in samples[: n_examples // 10]]
  lines += [
    f"{synthetic.IMAGE_PLACEHOLDER}{ex.question}\n{ex.solution}\n{ex.answer}" for ex in samples
  ]
  lines += [DEFAULT_SYSTEM_PROMPT, FORMAT_INSTRUCTION]
  lines += _GENERIC_TEXT.strip().splitlines() + _WORDS.strip().splitlines()
  if task == "chain":
    from pgpo_jax.demo_task import chain

    lines += chain.corpus_lines(seed)
  elif task != "answer":
    raise ValueError(f"tiny_tokenizer: unknown task {task!r}; expected one of {TASKS}")
  return lines


def train_bpe(lines: list[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """Trains a byte-level BPE with Qwen's pre-tokenization; returns (vocab, merges) without added tokens."""
  tok = Tokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
  )
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    min_frequency=1,
    show_progress=False,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(lines, trainer=trainer)
  model = json.loads(tok.to_str())["model"]
  return dict(model["vocab"]), [tuple(m) for m in model["merges"]]


def build_tokenizer(vocab_size: int = 1024, seed: int = 0, task: str = "answer") -> Qwen2Tokenizer:
  """A `Qwen2Tokenizer` of at most `vocab_size` ids: BPE ids first, then the 22 Qwen added tokens in order."""
  n_added = len(SPECIAL_TOKENS) + len(NONSPECIAL_ADDED_TOKENS)
  if vocab_size < 256 + n_added:
    raise ValueError(
      f"build_tokenizer: vocab_size must be >= {256 + n_added} (256 bytes + {n_added} "
      f"added tokens), got {vocab_size}"
    )
  vocab, merges = train_bpe(corpus_lines(seed, task=task), vocab_size - n_added)
  # Qwen2Tokenizer registers eos/pad first unless the ids are already in the vocab: pin them in Qwen order.
  for token in SPECIAL_TOKENS + NONSPECIAL_ADDED_TOKENS:
    vocab[token] = len(vocab)
  tok = Qwen2Tokenizer(
    vocab=vocab,
    merges=merges,
    unk_token=None,
    bos_token=None,
    eos_token="<|im_end|>",
    pad_token="<|endoftext|>",
    additional_special_tokens=list(SPECIAL_TOKENS[1:]),
    errors="replace",
    clean_up_tokenization_spaces=False,
    model_max_length=32768,
  )
  tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in NONSPECIAL_ADDED_TOKENS])
  tok.chat_template = CHAT_TEMPLATE
  return tok


def build_tiny_model_folder(
  out_dir: str | os.PathLike,
  vocab_size: int = 1024,
  min_pixels: int = 56 * 56,
  max_pixels: int = 112 * 112,
  seed: int = 0,
  task: str = "answer",
) -> dict[str, int]:
  """Writes tokenizer + image processor + processor files into `out_dir` (other files are kept).

  task: the demo task whose text the BPE is trained on ("answer" or "chain", `TASKS`).
  Defaults give 4..16 image tokens per image (56x56 .. 112x112 px after `smart_resize`).
  Returns `hf_processor.special_token_ids` of the result: `image_token_id`, `video_token_id`,
  `vision_start_token_id`, `vision_end_token_id`, `vision_token_id`, `im_start_token_id`,
  `im_end_token_id` (= `eos_token_id`), `endoftext_token_id` (= `pad_token_id` = `bos_token_id`) and
  `vocab_size` (all ids, added tokens included; at most the requested `vocab_size`).
  """
  if not 0 < min_pixels <= max_pixels:
    raise ValueError(
      f"build_tiny_model_folder: need 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}"
    )
  tok = build_tokenizer(vocab_size, seed, task)
  image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
  proc = Qwen25VLProcessorNoVideo(
    image_processor=image_processor, tokenizer=tok, chat_template=CHAT_TEMPLATE
  )
  out_dir = os.fspath(out_dir)
  # Files of other writers (e.g. the model's config.json) are left alone; ours are overwritten in place.
  os.makedirs(out_dir, exist_ok=True)
  proc.save_pretrained(out_dir)
  return special_token_ids(tok, source=out_dir)
