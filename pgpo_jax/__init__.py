"""PGPO (Perception-Grounded Policy Optimization) for Qwen2.5-VL in JAX / Flax NNX.

Layout and dependency rules: docs/design.md; the method as implemented: docs/method.md.
"""
