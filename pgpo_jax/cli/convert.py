"""Convert Qwen2.5-VL checkpoints between Hugging Face safetensors and our Orbax layout.

HF -> Orbax (loads with `qwen2_5_vl.from_pretrained(CKPT)`):
    pgpo-convert --hf_dir=Qwen2.5-VL-7B-Instruct --out_dir=ckpt/qwen7b [--dtype=bfloat16]

Orbax -> HF (a converted folder, or a trainer checkpoint + its config):
    pgpo-convert --to_hf --ckpt=ckpt/qwen7b --out_dir=export/qwen7b
    pgpo-convert --to_hf --ckpt=workdir/checkpoints/300/params --model_config=workdir/config.json \\
        --out_dir=export/step300 --dtype=bfloat16 [--max_shard_size=5GB]

(`python scripts/convert_hf.py ...` is the same command.) Exit status 2 on a bad checkpoint or output.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Sequence

from absl import flags

from pgpo_jax.cli import common


def parse_size(text: str) -> int:
  """'5GB' -> 5e9, '200MiB' -> 200 * 2**20, '12345' -> 12345 bytes."""
  m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
  if not m:
    raise ValueError(f"bad size {text!r}; use e.g. 5GB, 500MB, 64KiB or a byte count")
  base = 1024 if m.group(3) else 1000
  return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


def _define(fv: flags.FlagValues, argv: list[str]) -> None:
  del argv
  flags.DEFINE_bool("to_hf", False, "Export an Orbax checkpoint to HF safetensors.", flag_values=fv)
  flags.DEFINE_string("hf_dir", None, "HF folder to convert (HF -> Orbax).", flag_values=fv)
  flags.DEFINE_string(
    "ckpt", None, "Orbax checkpoint: converted folder or params item dir (--to_hf).", flag_values=fv
  )
  flags.DEFINE_string(
    "model_config",
    None,
    "config.json (or its folder) of --ckpt; default: found next to it.",
    flag_values=fv,
  )
  flags.DEFINE_string("out_dir", None, "Output folder.", flag_values=fv)
  flags.mark_flag_as_required("out_dir", flag_values=fv)
  flags.DEFINE_string(
    "dtype",
    None,
    "bfloat16 | float32 | float16 (default: bfloat16 for HF -> Orbax, the "
    "stored dtype for --to_hf).",
    flag_values=fv,
  )
  flags.DEFINE_string("max_shard_size", "5GB", "safetensors shard limit (--to_hf).", flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "Replace an existing OUT_DIR/params.", flag_values=fv)
  flags.DEFINE_bool("no_progress", False, "No progress bars.", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
  fv, _ = common.parse("pgpo-convert", __doc__, _define, argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # conversion is host work; never grab accelerators
  try:
    max_shard_bytes = parse_size(fv.max_shard_size)
  except ValueError as e:
    print(f"pgpo-convert: error: --max_shard_size: {e}", file=sys.stderr)
    return common.USAGE_ERROR
  if fv.to_hf and not fv.ckpt:
    print("pgpo-convert: error: --to_hf needs --ckpt", file=sys.stderr)
    return common.USAGE_ERROR
  if not fv.to_hf and not fv.hf_dir:
    print(
      "pgpo-convert: error: give --hf_dir (HF -> Orbax) or --to_hf --ckpt (Orbax -> HF)",
      file=sys.stderr,
    )
    return common.USAGE_ERROR

  from pgpo_jax.convert import hf

  try:
    if fv.to_hf:
      summary = hf.orbax_to_hf(
        fv.ckpt,
        fv.out_dir,
        config=fv.model_config,
        dtype=fv.dtype,
        max_shard_bytes=max_shard_bytes,
        progress=not fv.no_progress,
      )
    else:
      summary = hf.hf_to_orbax(
        fv.hf_dir,
        fv.out_dir,
        dtype=fv.dtype or "bfloat16",
        overwrite=fv.overwrite,
        progress=not fv.no_progress,
      )
  except (ValueError, KeyError, FileNotFoundError, FileExistsError, PermissionError) as e:
    print(f"pgpo-convert: error: {e}", file=sys.stderr)
    return 2
  print(summary)
  return 0


if __name__ == "__main__":
  sys.exit(main())
