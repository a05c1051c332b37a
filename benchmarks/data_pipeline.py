"""Host throughput of the prompt pipeline (rows/s) on the synthetic task with 448x448 images.

    .venv/bin/python benchmarks/data_pipeline.py            # defaults: 256 rows, B=32
    .venv/bin/python benchmarks/data_pipeline.py --rows 64 --threads 1,2

Measures, on one host process, the best of `--repeats` passes (the first pass of a process is
slower: fresh ~5 MB pixel arrays page-fault until the allocator reuses freed memory, which a long
training run always does):
- `decode`: `DatasetReader.load` alone (parquet row -> PNG decode -> RGB PIL);
- `encode`: `PromptEncoder.encode` alone (chat template, HF processor resize/normalize/patchify,
  tokenization, M-RoPE ids), single thread;
- `pipeline`: `make_prompt_iterator` end to end (grain threads, collation to `PromptBatch`), for
  each `--threads` value.
The tokenizer is the tiny demo one (no hub access); a 448x448 image gives 256 image tokens and
1024 patches, and image work dominates, so rates carry over to the real Qwen tokenizer.
Writes a table to stdout and JSON to benchmarks/results/data_pipeline.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pgpo_jax.data.hf_processor import load_processor  # noqa: E402
from pgpo_jax.data.pipeline import make_prompt_iterator  # noqa: E402
from pgpo_jax.data.prompts import PromptEncoder  # noqa: E402
from pgpo_jax.data.reader import DatasetReader, DatasetSpec  # noqa: E402
from pgpo_jax.demo_task import synthetic  # noqa: E402
from pgpo_jax.demo_task.tiny_tokenizer import build_tiny_model_folder  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "data_pipeline.json")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rows", type=int, default=256)
  ap.add_argument("--image_size", type=int, default=448)
  ap.add_argument("--batch_size", type=int, default=32)
  ap.add_argument("--threads", default="1,2,4", help="comma-separated grain thread counts")
  ap.add_argument("--max_prompt_length", type=int, default=1024)
  ap.add_argument("--repeats", type=int, default=2, help="report the best of this many passes")
  ap.add_argument("--out", default=RESULTS)
  args = ap.parse_args()

  with tempfile.TemporaryDirectory() as tmp:
    model_dir = os.path.join(tmp, "model")
    # Pixel budget wide enough that 448x448 is not resized (released checkpoints allow far more).
    build_tiny_model_folder(model_dir, min_pixels=56 * 56, max_pixels=1280 * 28 * 28)
    processor = load_processor(model_dir)
    data = os.path.join(tmp, "train.parquet")
    t = time.perf_counter()
    synthetic.write_parquet(
      synthetic.make_split(args.rows, seed=0, image_size=args.image_size), data
    )
    print(
      f"wrote {args.rows} rows of {args.image_size}px in {time.perf_counter() - t:.1f}s "
      f"({os.path.getsize(data) / 2**20:.1f} MiB)"
    )
    spec = DatasetSpec(data)
    reader = DatasetReader(spec)
    encoder = PromptEncoder(processor, max_prompt_length=args.max_prompt_length)
    rows = [reader.load(i) for i in range(len(reader))]
    first = encoder.encode(rows[0])
    tokens, patches = first.length, first.pixel_values.shape[0]

    def pipeline(threads):
      it = make_prompt_iterator(
        spec,
        processor,
        batch_size=args.batch_size,
        seed=0,
        num_epochs=1,
        max_prompt_length=args.max_prompt_length,
        shard_index=0,
        shard_count=1,
        num_threads=threads,
      )
      return sum(b.num_valid for b in it)

    # Each result is dropped at once, as the pipeline does (keeping 256 x 5 MB alive would
    # measure page faults instead).
    stages = [
      ("decode", 1, lambda: sum(1 for i in range(len(reader)) if reader.load(i))),
      ("encode", 1, lambda: sum(1 for r in rows if encoder.encode(r))),
    ]
    stages += [
      ("pipeline", t, functools.partial(pipeline, t))
      for t in (int(x) for x in args.threads.split(","))
    ]
    results = []
    for stage, threads, fn in stages:
      times = []
      for _ in range(args.repeats):
        t = time.perf_counter()
        n = fn()
        times.append(time.perf_counter() - t)
      results.append(
        {
          "stage": stage,
          "threads": threads,
          "rows": n,
          "seconds": min(times),
          "rows_per_s": n / min(times),
          "all_seconds": times,
        }
      )

  print(
    f"\nprompt: {tokens} tokens, {patches} patches/image; batch_size {args.batch_size}; "
    f"{os.cpu_count()} CPU cores; load average {os.getloadavg()[0]:.1f}"
  )
  print(f"{'stage':<10}{'threads':>8}{'rows':>7}{'seconds':>10}{'rows/s':>10}")
  for r in results:
    print(
      f"{r['stage']:<10}{r['threads']:>8}{r['rows']:>7}{r['seconds']:>10.2f}"
      f"{r['rows_per_s']:>10.1f}"
    )
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(
      {
        "config": vars(args),
        "prompt_tokens": tokens,
        "patches_per_image": patches,
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "machine": platform.machine(),
        "python": platform.python_version(),
        "results": results,
      },
      f,
      indent=2,
    )
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
