"""Key paths of pytrees as readable strings, one spelling for the whole code base."""

from __future__ import annotations

from typing import Any, Sequence


def path_str(path: Sequence[Any]) -> str:
  """'/'-joined key path ('language_model/layers/wq'); a trailing Variable `.value` is dropped."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        k = getattr(k, attr)
        break
    parts.append(str(k))
  if parts and parts[-1] == "value":
    parts.pop()
  return "/".join(parts)
