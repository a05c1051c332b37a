"""Convert Qwen2.5-VL checkpoints between Hugging Face safetensors and our Orbax layout.

HF -> Orbax (loads with `qwen2_5_vl.from_pretrained(CKPT)`):
    python scripts/convert_hf.py --hf_dir Qwen2.5-VL-7B-Instruct --out_dir ckpt/qwen7b [--dtype bfloat16]

Orbax -> HF (a converted folder, or a trainer checkpoint + its config):
    python scripts/convert_hf.py --to_hf --ckpt ckpt/qwen7b --out_dir export/qwen7b
    python scripts/convert_hf.py --to_hf --ckpt workdir/checkpoints/300/params \
        --config workdir/config.json --out_dir export/step300 --dtype bfloat16 [--max_shard_size 5GB]
"""
from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # conversion is host work; never grab accelerators


def parse_size(text: str) -> int:
  """'5GB' -> 5e9, '200MiB' -> 200 * 2**20, '12345' -> 12345 bytes."""
  m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
  if not m:
    raise argparse.ArgumentTypeError(f"bad size {text!r}; use e.g. 5GB, 500MB, 64KiB or a byte count")
  base = 1024 if m.group(3) else 1000
  return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--to_hf", action="store_true", help="export an Orbax checkpoint to HF safetensors")
  p.add_argument("--hf_dir", help="HF folder to convert (HF -> Orbax)")
  p.add_argument("--ckpt", help="Orbax checkpoint: converted folder or params item dir (--to_hf)")
  p.add_argument("--config", help="config.json (or its folder) for --ckpt; default: found next to it")
  p.add_argument("--out_dir", required=True)
  p.add_argument("--dtype", default=None, help="bfloat16 | float32 | float16 (default: bfloat16 for "
                 "HF -> Orbax, the stored dtype for --to_hf)")
  p.add_argument("--max_shard_size", type=parse_size, default="5GB", help="safetensors shard limit (--to_hf)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR/params")
  p.add_argument("--no_progress", action="store_true")
  a = p.parse_args(argv)

  from pgpo_jax.convert import hf
  try:
    if a.to_hf:
      if not a.ckpt:
        p.error("--to_hf needs --ckpt")
      summary = hf.orbax_to_hf(a.ckpt, a.out_dir, config=a.config, dtype=a.dtype,
                               max_shard_bytes=a.max_shard_size, progress=not a.no_progress)
    else:
      if not a.hf_dir:
        p.error("give --hf_dir (HF -> Orbax) or --to_hf --ckpt (Orbax -> HF)")
      summary = hf.hf_to_orbax(a.hf_dir, a.out_dir, dtype=a.dtype or "bfloat16", overwrite=a.overwrite,
                               progress=not a.no_progress)
  except (ValueError, KeyError, FileNotFoundError, FileExistsError, PermissionError) as e:
    print(f"convert_hf: error: {e}", file=sys.stderr)
    return 2
  print(summary)
  return 0


if __name__ == "__main__":
  sys.exit(main())
