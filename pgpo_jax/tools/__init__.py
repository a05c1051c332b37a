"""Tools on top of the library (not imported by it): the TPU compile check, the dependency inspector and
the plots. Their command lines are in `pgpo_jax.cli`."""
