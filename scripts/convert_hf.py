"""Convert Qwen2.5-VL checkpoints between Hugging Face safetensors and our Orbax layout.

    python scripts/convert_hf.py --hf_dir=Qwen2.5-VL-7B-Instruct --out_dir=ckpt/qwen7b [--dtype=bfloat16]
    python scripts/convert_hf.py --to_hf --ckpt=ckpt/qwen7b --out_dir=export/qwen7b

Thin wrapper of `pgpo-convert` (pgpo_jax/cli/convert.py): same flags; `--help` lists them.
"""

import sys

from pgpo_jax.cli.convert import main

if __name__ == "__main__":
  sys.exit(main())
