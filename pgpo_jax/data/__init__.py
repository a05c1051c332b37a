"""Data: the processor wrapper, the synthetic demo task and its tiny tokenizer, and the input pipeline.

- `processor.py`: `load_processor` / `load_tokenizer` for a real Qwen2.5-VL folder or the tiny demo folder.
- `synthetic.py`: a seeded visual-reasoning task (colored shapes) written as EasyR1-layout parquet.
- `tiny_tokenizer.py`: builds a small byte-level BPE Qwen-style tokenizer + processor folder for the demo.
"""
