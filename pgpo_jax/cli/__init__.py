"""Command lines: each module is one command with a `main(argv=None) -> exit code`.

| command (pyproject)   | module              | thin script                     |
|-----------------------|---------------------|---------------------------------|
| `pgpo-train`          | `train`             | `scripts/train.py`              |
| `pgpo-convert`        | `convert`           | `scripts/convert_hf.py`         |
| `pgpo-compile-check`  | `compile_check`     | `scripts/compile_check.py`      |
| `pgpo-eval`           | `evaluate`          | `scripts/eval.py`               |
| `pgpo-inspect`        | `inspect_dependency`| `scripts/inspect_dependency.py` |
| `pgpo-plot`           | `plot_metrics`      | `scripts/plot_metrics.py`       |
| `pgpo-make-demo-data` | `make_demo_data`    | `scripts/make_demo_data.py`     |

One flag style: absl flags, and `--config` is an `ml_collections` config wherever the command has one
(`--config=FILE` + `--config.key=value` for training and the compile check; the typed dataclass of
the evaluator and the inspector, overridden as `--config.field=value`). `python -m pgpo_jax.cli.NAME`
works too.
"""
