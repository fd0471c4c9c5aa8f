"""Prompt assembly as the reference's `Chat.get_context_emb`, expressed as a gather layout.

The prompt is split at each `<ImageHere>`; every text segment is tokenised on its own (so each
gets SentencePiece's dummy prefix) and only the first gets BOS. The model then builds its input as
`where(source >= 0, modality_rows[source], embed(ids))`, where `modality_rows` concatenates the
modality embeddings in placeholder order (audio before video for audio+video).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from vllama_jax.errors import PromptError

PLACEHOLDER = "<ImageHere>"
MAX_LENGTH = 2000  # the demo's prompt + new-token budget


class PromptLayout(NamedTuple):
  ids: np.ndarray  # (L,) int32 text token ids, 0 at modality slots
  source: np.ndarray  # (L,) int32 -1 for text, else the row of the concatenated modality embeddings


def layout(tokenizer, prompt: str, modality_lengths: Sequence[int]) -> PromptLayout:
  """Token ids and modality rows of `prompt`; `modality_lengths` are given in placeholder order."""
  segments = prompt.split(PLACEHOLDER)
  lengths = [int(n) for n in modality_lengths]
  if len(segments) != len(lengths) + 1:
    raise PromptError(f"the prompt has {len(segments) - 1} {PLACEHOLDER} placeholders but "
                      f"{len(lengths)} modality inputs were given")
  if any(n < 1 for n in lengths):
    raise PromptError(f"modality lengths must be >= 1, got {lengths}")
  ids, source, row = [], [], 0
  for i, segment in enumerate(segments):
    tokens = ([tokenizer.bos_id] if i == 0 else []) + tokenizer.encode(segment)
    ids += tokens
    source += [-1] * len(tokens)
    if i < len(lengths):
      ids += [0] * lengths[i]
      source += range(row, row + lengths[i])
      row += lengths[i]
  return PromptLayout(np.asarray(ids, np.int32), np.asarray(source, np.int32))


def crop_left(layout: PromptLayout, max_length: int = MAX_LENGTH, max_new_tokens: int = 0) -> PromptLayout:
  """Drops the oldest positions so that prompt + `max_new_tokens` <= `max_length` (BOS included)."""
  keep = max_length - max_new_tokens
  if keep < 1:
    raise PromptError(f"max_length {max_length} leaves no room for a prompt after {max_new_tokens} new tokens")
  begin = max(0, len(layout.ids) - keep)
  return PromptLayout(layout.ids[begin:], layout.source[begin:])
