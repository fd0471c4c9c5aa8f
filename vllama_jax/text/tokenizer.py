"""The LLaMA tokenizer, loaded one way for real checkpoints and for the tiny ones tests make.

BOS is never added by the tokenizer: prompt assembly adds it itself where the reference does
(only before the first text segment). This sidesteps transformers 5's habit of ignoring
`add_bos_token` when a `tokenizer.json` is present.
"""

from __future__ import annotations

import os

from vllama_jax.errors import CheckpointError


def load_tokenizer(directory: str):
  """A transformers LLaMA tokenizer from a directory with tokenizer.model and/or tokenizer.json."""
  has_model = os.path.isfile(os.path.join(directory, "tokenizer.model"))
  has_json = os.path.isfile(os.path.join(directory, "tokenizer.json"))
  if not (has_model or has_json):
    raise CheckpointError(f"{directory}: no tokenizer found; expected tokenizer.model (SentencePiece) "
                          "or tokenizer.json")
  from transformers import AutoTokenizer, LlamaTokenizer
  try:
    if has_model and not os.path.isfile(os.path.join(directory, "tokenizer_config.json")):
      tokenizer = LlamaTokenizer.from_pretrained(directory, legacy=True)
    else:
      tokenizer = AutoTokenizer.from_pretrained(directory)
  except Exception as e:
    raise CheckpointError(f"{directory}: the tokenizer cannot be loaded ({type(e).__name__}: {e})") from None
  if len(tokenizer) == 0:
    raise CheckpointError(f"{directory}: the tokenizer loaded empty")
  if tokenizer.pad_token is None:  # as the reference: pad = unk (id 0)
    tokenizer.pad_token = tokenizer.unk_token
  return tokenizer


def encode(tokenizer, text: str) -> list[int]:
  """Token ids of `text` without BOS/EOS."""
  return tokenizer(text, add_special_tokens=False)["input_ids"]
