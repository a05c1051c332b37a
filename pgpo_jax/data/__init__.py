"""Data: rows from files, the paper's prompt, the HF processor, static-shape batches, the input pipeline.

- `reader.py`: `DatasetReader` over parquet / JSON-lines files (images, column names, bad rows skipped).
- `layouts.py`: the layouts of the paper's data (EasyR1 / ViRL39K, MMMU-Pro, sharegpt / VPPO-Eval) and their row
  conventions (`<image k>` placeholders, option lines, chat answers).
- `prompts.py`: `PromptEncoder` (chat prompt + HF processor + M-RoPE ids per row), `collate` into
  `PromptBatch`es of bucketed shapes.
- `pipeline.py`: the grain pipeline (shuffle, host sharding, epochs, checkpointable iterator state).
- `hf_processor.py`: `load_processor` / `load_tokenizer` for a real Qwen2.5-VL folder or the tiny demo folder.

The synthetic demo task and its tiny tokenizer are in `pgpo_jax.demo_task`.
"""
