"""Character-span labels → per-token labels, through a tokenizer's offsets.

A token takes the highest-priority label among the characters it covers: perception over format over
reasoning (`chain.LABELS` order: 0 perception, 1 reasoning, 2 format). A byte-level BPE token may
join a space or punctuation to a labelled word (` red`, `>I`, `.</`); the priority rule then gives it
the rarer label, so a perception value is never lost to its neighbour. Tokens with no characters
(the stop token appended after the text) are format.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pgpo_jax.demo_task.chain import FORMAT, PERCEPTION, REASONING, Span

_PRIORITY = (PERCEPTION, FORMAT, REASONING)  # first wins


def char_labels(n_chars: int, spans: Sequence[Span]) -> np.ndarray:
  """[n_chars] int8 label of every character (reasoning where no span covers it)."""
  rank = np.full(n_chars, _PRIORITY.index(REASONING), np.int8)  # lower = higher priority
  for start, end, label in spans:
    if not 0 <= start <= end <= n_chars:
      raise ValueError(f"labels: span [{start}, {end}) outside the text of {n_chars} characters")
    if label not in _PRIORITY:
      raise ValueError(f"labels: unknown label id {label} in span [{start}, {end})")
    rank[start:end] = np.minimum(rank[start:end], _PRIORITY.index(label))
  out = np.asarray(_PRIORITY, np.int8)[rank]
  return out


def token_labels(offsets_Lx2: np.ndarray, chars: np.ndarray) -> np.ndarray:
  """[L] int8 label of each token from its character range [start, end) (`chars`: `char_labels`)."""
  out = np.full(len(offsets_Lx2), FORMAT, np.int8)
  for t, (s, e) in enumerate(np.asarray(offsets_Lx2, np.int64).reshape(-1, 2)):
    present = set(int(x) for x in chars[s:e])
    if present:
      out[t] = next(lab for lab in _PRIORITY if lab in present)
  return out


def offsets_from_pieces(pieces: Sequence[str]) -> np.ndarray:
  """[L, 2] character ranges of tokens whose decoded pieces concatenate to the text."""
  ends = np.cumsum([len(p) for p in pieces], dtype=np.int64)
  return np.stack([ends - np.array([len(p) for p in pieces], np.int64), ends], -1).reshape(-1, 2)


def tokenize_with_labels(
  tokenizer, text: str, spans: Sequence[Span]
) -> tuple[list[int], np.ndarray]:
  """(token ids of `text`, [L] int8 labels) with the tokenizer's own offsets (a fast tokenizer)."""
  enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
  ids = list(enc["input_ids"])
  offsets = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
  return ids, token_labels(offsets, char_labels(len(text), spans))
