"""The trainer's set-up: the demo data, the model, the WORKDIR model folder, the dataset spec.

Called once by `Trainer.__init__` (and by the tests, which make the demo data before a run).
"""

from __future__ import annotations

import json
import logging
import os

import jax
import ml_collections

from pgpo_jax import multihost
from pgpo_jax.data import hf_processor as processor_lib
from pgpo_jax.data.reader import DatasetSpec
from pgpo_jax.models import qwen2_5_vl as qwen

log = logging.getLogger(__name__)


def dataset_files(s: str) -> list[str]:
  """A comma-separated list of files (`data.train_files`, `data.eval_files`)."""
  return [p.strip() for p in s.split(",") if p.strip()]


def ensure_demo_data(c: ml_collections.ConfigDict) -> None:
  """Generates the synthetic task (train/test parquet + tiny tokenizer folder) when missing.

  Host 0 writes (the folder must be shared by the hosts of a multi-host run); the others wait."""
  if not c.data.make_demo_data:
    return
  d = c.data.demo_dir
  done = os.path.exists(os.path.join(d, "train.parquet")) and os.path.exists(
    os.path.join(d, "model", "tokenizer.json")
  )
  if not done and jax.process_index() == 0:
    from pgpo_jax.demo_task import tasks, tiny_tokenizer

    task = c.data.demo_task
    log.info("making the synthetic demo data (%s task) in %s", task, d)
    tiny_tokenizer.build_tiny_model_folder(os.path.join(d, "model"), task=task)
    tasks.write_splits(
      d,
      task,
      n_train=c.data.demo_train_rows,
      n_test=c.data.demo_eval_rows,
      seed=c.seed,
      image_size=c.data.demo_image_size,
    )
  multihost.barrier("pgpo_demo_data")


def build_model(c: ml_collections.ConfigDict, tokenizer) -> qwen.Qwen25VL:
  compute = dict(
    remat_policy=c.model.remat_policy,
    scan_layers=c.model.scan_layers,
    attention_chunk_size=c.model.attention_chunk_size,
    attention_impl=c.model.attention_impl,
  )
  if c.model.random_init:
    ids = processor_lib.special_token_ids(tokenizer)
    t = dict(c.model.tiny)
    vision_kw = {
      f"vision_{k[len('vision_') :]}": v for k, v in t.items() if k.startswith("vision_")
    }
    text_kw = {k: v for k, v in t.items() if not k.startswith("vision_")}
    if "vision_fullatt_block_indexes" in vision_kw:
      vision_kw["vision_fullatt_block_indexes"] = tuple(vision_kw["vision_fullatt_block_indexes"])
    heads = text_kw["num_attention_heads"]
    head_dim = text_kw["hidden_size"] // heads
    quarter = head_dim // 2
    section = (quarter - 2 * (quarter * 3 // 8), quarter * 3 // 8, quarter * 3 // 8)
    cfg = qwen.tiny_config(
      vocab_size=len(tokenizer),
      head_dim=head_dim,
      mrope_section=section,
      image_token_id=ids["image_token_id"],
      video_token_id=ids["video_token_id"],
      vision_start_token_id=ids["vision_start_token_id"],
      vision_end_token_id=ids["vision_end_token_id"],
      bos_token_id=ids["bos_token_id"],
      eos_token_id=ids["eos_token_id"],
      pad_token_id=ids["pad_token_id"],
      **text_kw,
      **vision_kw,
    ).replace(**compute)
    return qwen.init_model(cfg, c.model.dtype, seed=c.seed, param_dtype=c.model.param_dtype or None)
  cfg = qwen.Qwen25VLConfig.from_json(c.model.init_from).replace(**compute)
  return qwen.from_pretrained(
    c.model.init_from, c.model.dtype, param_dtype=c.model.param_dtype or None, config=cfg
  )


def write_model_folder(workdir: str, cfg: qwen.Qwen25VLConfig, processor) -> None:
  """WORKDIR/config.json + processor files, so `WORKDIR/checkpoints/<step>/params` is a complete
  model: `qwen2_5_vl.from_pretrained(that path)` and `load_processor(WORKDIR)` both work."""
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(cfg.to_hf_dict(), f, indent=2)
  processor.save_pretrained(workdir)


def dataset_spec(c: ml_collections.ConfigDict, files: str) -> DatasetSpec:
  """The `data.*` columns of the comma-separated `files`."""
  d = c.data
  return DatasetSpec(
    dataset_files(files),
    question_key=d.question_key,
    answer_key=d.answer_key,
    image_key=d.image_key,
  )
