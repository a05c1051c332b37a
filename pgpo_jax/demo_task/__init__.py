"""The demo's synthetic visual task and its tiny Qwen-style tokenizer (no downloads, CPU-sized).

- `synthetic.py`: a seeded visual-reasoning task (coloured shapes: counts, colours, left/right) written
  as EasyR1-layout parquet.
- `tiny_tokenizer.py`: a small byte-level BPE tokenizer with every Qwen special token and the Qwen chat
  template, saved with a PIL image processor as a folder that `data.hf_processor.load_processor` reads.
"""
