"""RL maths for PGPO: advantages, token weights, the clipped loss, dependency scoring.

Everything here is pure `jnp` over arrays with static shapes, so it runs the same
inside and outside `jax.jit`. Shapes use suffixes: B responses, T response tokens,
D hidden size, V vocabulary. The data flow (docs/method.md):

    scoring.k3 / full_kl  ->  advantages.pgpo_token_weights  ->  advantages.pgpo
                          ->  losses.policy_loss
"""

from pgpo_jax.rl import advantages, losses, scoring
from pgpo_jax.rl.advantages import (
  ADVANTAGE_ESTIMATORS,
  get_estimator,
  grpo,
  pgpo,
  pgpo_diagnostics,
  pgpo_token_weights,
)
from pgpo_jax.rl.losses import (
  KL_ESTIMATORS,
  LOSS_AGGREGATIONS,
  aggregate,
  loss_normalizers,
  policy_loss,
)
from pgpo_jax.rl.scoring import (
  DEPENDENCY_ESTIMATORS,
  DependencyScores,
  full_kl_chunked,
  get_dependency_estimator,
  k3,
  token_logprobs_chunked,
)

__all__ = [
  "ADVANTAGE_ESTIMATORS",
  "DEPENDENCY_ESTIMATORS",
  "DependencyScores",
  "KL_ESTIMATORS",
  "LOSS_AGGREGATIONS",
  "advantages",
  "aggregate",
  "full_kl_chunked",
  "get_dependency_estimator",
  "get_estimator",
  "grpo",
  "k3",
  "loss_normalizers",
  "losses",
  "pgpo",
  "pgpo_diagnostics",
  "pgpo_token_weights",
  "policy_loss",
  "scoring",
  "token_logprobs_chunked",
]
