"""The LLaMA tokenizer, encoding exactly as the reference's slow `LlamaTokenizer` did.

Video-LLaMA ran transformers 4.28's slow tokenizer: SentencePiece on each chunk of text between
added tokens. transformers 5 only has the `tokenizers`-backed one, whose prefix-space handling
differs (e.g. on text that starts with a space), so when a `tokenizer.model` is present we drive
SentencePiece directly. A directory with only `tokenizer.json` is read with `tokenizers`.
BOS is never added here: prompt assembly adds it where the reference does.
"""

from __future__ import annotations

import json
import os
import re

from vllama_jax.errors import CheckpointError


class Tokenizer:
  """Text <-> LLaMA token ids. Added tokens (e.g. `<ImageHere>`) are matched before SentencePiece."""

  def __init__(self, directory: str):
    self.directory = directory
    model_path = os.path.join(directory, "tokenizer.model")
    json_path = os.path.join(directory, "tokenizer.json")
    try:
      if os.path.isfile(model_path):
        import sentencepiece as spm
        self._sp = spm.SentencePieceProcessor(model_file=model_path)
        self._hf = None
        base_size = self._sp.get_piece_size()
      elif os.path.isfile(json_path):
        from tokenizers import Tokenizer as HFTokenizer
        self._sp, self._hf = None, HFTokenizer.from_file(json_path)
        base_size = self._hf.get_vocab_size(with_added_tokens=False)
      else:
        raise CheckpointError(f"{directory}: no tokenizer found; expected tokenizer.model (SentencePiece) "
                              "or tokenizer.json")
    except CheckpointError:
      raise
    except Exception as e:
      raise CheckpointError(f"{directory}: the tokenizer cannot be loaded ({type(e).__name__}: {e})") from None
    self.unk_id, self.bos_id, self.eos_id = 0, 1, 2
    self.pad_id = self.unk_id  # as the reference: pad = unk when the tokenizer defines none
    # Special tokens written in text become their ids, whitespace around them kept.
    self.special = {"<unk>": self.unk_id, "<s>": self.bos_id, "</s>": self.eos_id}
    # Added tokens (Vicuna's [PAD], <ImageHere>, ...) strip the whitespace beside them.
    self.added: dict[str, int] = _read_added_tokens(directory)
    self.vocab_size = max([base_size - 1, *self.added.values()]) + 1
    self._compile()

  def _compile(self):
    self._by_id = {i: t for t, i in (self.special | self.added).items()}
    tokens = sorted(self.special | self.added, key=len, reverse=True)
    self._split = re.compile("(" + "|".join(map(re.escape, tokens)) + ")")

  def add_tokens(self, tokens: list[str]) -> list[int]:
    """Adds tokens after the vocabulary, as the reference's `add_tokens(..., special_tokens=True)`."""
    for token in tokens:
      if token not in self.added and token not in self.special:
        self.added[token] = self.vocab_size
        self.vocab_size += 1
    self._compile()
    return [self.added.get(t, self.special.get(t)) for t in tokens]

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without BOS/EOS: SentencePiece on each chunk between matched tokens."""
    chunks = self._split.split(text)
    ids: list[int] = []
    for i, chunk in enumerate(chunks):
      if i % 2:  # a matched token
        ids.append(self.added.get(chunk, self.special.get(chunk)))
        continue
      if i + 1 < len(chunks) and chunks[i + 1] in self.added:
        chunk = chunk.rstrip()
      if i > 0 and chunks[i - 1] in self.added:
        chunk = chunk.lstrip()
      if chunk:
        ids.extend(self._encode_plain(chunk))
    return ids

  def decode(self, ids: list[int], skip_special: bool = True) -> str:
    pieces, run = [], []
    for i in map(int, ids):
      if i in self._by_id:
        pieces += [self._decode_plain(run), "" if skip_special else self._by_id[i]]
        run = []
      else:
        run.append(i)
    return "".join(pieces + [self._decode_plain(run)])

  def _encode_plain(self, text: str) -> list[int]:
    return self._sp.encode(text) if self._sp is not None else self._hf.encode(text, add_special_tokens=False).ids

  def _decode_plain(self, ids: list[int]) -> str:
    return self._sp.decode(ids) if self._sp is not None else self._hf.decode(ids)

  def __len__(self) -> int:
    return self.vocab_size


def _read_added_tokens(directory: str) -> dict[str, int]:
  path = os.path.join(directory, "added_tokens.json")
  if not os.path.isfile(path):
    return {}
  try:
    with open(path) as f:
      return {str(k): int(v) for k, v in json.load(f).items()}
  except (json.JSONDecodeError, AttributeError, ValueError) as e:
    raise CheckpointError(f"{path}: expected a JSON object of token -> id ({e})") from None


def load_tokenizer(directory: str) -> Tokenizer:
  return Tokenizer(directory)
