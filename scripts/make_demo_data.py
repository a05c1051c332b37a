"""Writes the CPU demo data: DIR/train.parquet, DIR/test.parquet and the tiny tokenizer+processor DIR/model/.

    .venv/bin/python scripts/make_demo_data.py --out_dir /tmp/pgpo_demo [--n_train 2000 --n_test 200 \
        --seed 0 --image_size 84]

Idempotent: every output is a pure function of the flags and is rewritten atomically, so a rerun produces
byte-identical files. Train and test use disjoint random streams of the same seed. Prints the special token
ids (and vocab size) that the model config needs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from pgpo_jax.demo_task import synthetic, tiny_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out_dir", required=True)
    p.add_argument("--n_train", type=int, default=2000)
    p.add_argument("--n_test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image_size", type=int, default=84, help="image side in px (multiples of 28 avoid resizing)")
    p.add_argument("--vocab_size", type=int, default=1024, help="tokenizer size incl. the 22 Qwen added tokens")
    p.add_argument("--min_pixels", type=int, default=56 * 56)
    p.add_argument("--max_pixels", type=int, default=112 * 112)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, int]:
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    for name, n, stream in (("train", args.n_train, 0), ("test", args.n_test, 1)):
        rows = synthetic.make_split(n, args.seed, args.image_size, stream=stream)
        synthetic.write_parquet(rows, os.path.join(args.out_dir, f"{name}.parquet"))
    ids = tiny_tokenizer.build_tiny_model_folder(
        os.path.join(args.out_dir, "model"), vocab_size=args.vocab_size, min_pixels=args.min_pixels,
        max_pixels=args.max_pixels, seed=args.seed)
    print(json.dumps(ids, sort_keys=True))
    return ids


if __name__ == "__main__":
    main(sys.argv[1:])
