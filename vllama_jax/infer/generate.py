"""Batched KV-cache generation from `inputs_embeds`, as one jitted program with static shapes.

Prompts are left-aligned so that every row's last prompt token sits in the same cache slot; rotary
positions come from each row's own token count, so a row decodes exactly as it would alone.
Prompt length and batch are padded up to buckets: calls whose shapes fall into the same buckets
reuse one compiled program.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vllama_jax.infer.sampling import SamplingConfig, choose_tokens
from vllama_jax.models.llama import Llama

NO_TOKEN = -1  # fills the stop-sequence window before enough tokens exist


class GenerationOutput(NamedTuple):
  tokens: np.ndarray  # (B, max_new_tokens) int32, pad after each row's end
  lengths: np.ndarray  # (B,) tokens produced, stop sequence / EOS included

  def rows(self) -> list[list[int]]:
    return [self.tokens[i, :n].tolist() for i, n in enumerate(self.lengths)]


def left_align(embeds: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Moves each row's contiguous run of real tokens (left- or right-padded) to the right end."""
  b, p = mask.shape
  lengths = jnp.sum(mask, axis=-1)
  first = jnp.argmax(mask, axis=-1)
  slots = jnp.arange(p)
  offset = slots[None, :] - (p - lengths)[:, None]
  source = jnp.clip(first[:, None] + offset, 0, p - 1)
  aligned = jnp.take_along_axis(embeds, source[:, :, None], axis=1)
  new_mask = (offset >= 0).astype(mask.dtype)
  return jnp.where(new_mask[:, :, None] > 0, aligned, 0).astype(embeds.dtype), new_mask


def _stop_table(stop_sequences: tuple[tuple[int, ...], ...]) -> tuple[np.ndarray, int]:
  """Stop sequences right-aligned in an (S, M) table; NO_TOKEN on the left matches anything."""
  width = max((len(s) for s in stop_sequences), default=1)
  table = np.full((max(len(stop_sequences), 1), width), NO_TOKEN - 1, np.int32)  # unmatched row
  for i, seq in enumerate(stop_sequences):
    table[i, :width - len(seq)] = NO_TOKEN
    table[i, width - len(seq):] = seq
  return table, width


class _StreamDispatch:
  """Routes the tokens a compiled program reports at each step to the caller's callback, in step
  order (host callbacks are unordered effects, run on a runtime thread). One streamed generation
  at a time: `Generator.__call__` holds `lock` while streaming."""
  lock = threading.Lock()
  callback: Callable | None = None
  pending: dict
  next_step: int = 0

  def start(self, callback):
    self.callback, self.pending, self.next_step = callback, {}, 0

  def __call__(self, step, tokens, active):
    if self.callback is None or int(step) < self.next_step:  # a replica reporting the same step again
      return
    self.pending[int(step)] = (np.asarray(tokens), np.asarray(active))
    while self.next_step in self.pending:
      self.callback(self.next_step, *self.pending.pop(self.next_step))
      self.next_step += 1


_stream = _StreamDispatch()
_no_lock = contextlib.nullcontext()


def _generate(graphdef, state, embeds, mask, row_keys, knobs, *, max_new_tokens: int, greedy: bool,
              stop_sequences: tuple, eos_token_id: int | None, pad_token_id: int, stream: bool):
  model: Llama = nnx.merge(graphdef, state)
  embeds, mask = left_align(embeds, mask)
  batch, prompt_len, _ = embeds.shape
  logits, cache = model.prefill(embeds, mask, prompt_len + max_new_tokens)
  table, width = _stop_table(stop_sequences)
  has_stop = len(stop_sequences) > 0
  rows = jnp.arange(batch)

  def choose(carry):
    """Picks and records each row's token at `step`."""
    step, logits, cache, tokens, done, lengths, seen, history = carry
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)
    token = choose_tokens(logits, seen, keys, knobs, greedy)
    token = jnp.where(done, pad_token_id, token)
    if stream:
      jax.debug.callback(_stream, step, token, ~done)
    tokens = tokens.at[:, step].set(token)
    history = jax.lax.dynamic_update_slice(history, token[:, None], (0, width + step))
    stopped = jnp.zeros_like(done)
    if eos_token_id is not None:
      stopped |= token == eos_token_id
    if has_stop:
      window = jax.lax.dynamic_slice(history, (0, step + 1), (batch, width))
      matches = (window[:, None, :] == table[None]) | (table[None] == NO_TOKEN)
      stopped |= jnp.any(jnp.all(matches, axis=-1), axis=-1)
    lengths = jnp.where(done, lengths, step + 1)
    seen = seen.at[rows, token].set(seen[rows, token] | ~done)
    return step, logits, cache, tokens, done | stopped, lengths, seen, history

  def body(carry):
    step, _, cache, tokens, done, lengths, seen, history = choose(carry)
    logits, cache = model.decode_step(tokens[:, step], cache)
    return step + 1, logits, cache, tokens, done, lengths, seen, history

  def cond(carry):
    step, done = carry[0], carry[4]
    return (step < max_new_tokens - 1) & ~jnp.all(done)

  carry = (jnp.int32(0), logits, cache,
           jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32),
           jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.int32),
           jnp.zeros(logits.shape, bool),
           jnp.full((batch, width + max_new_tokens), NO_TOKEN, jnp.int32))
  # The last token needs no decode step after it: the loop stops one short and `choose` runs once
  # more (a no-op for rows already done).
  carry = choose(jax.lax.while_loop(cond, body, carry))
  _, _, _, tokens, _, lengths, _, _ = carry
  return tokens, lengths


_generate_jit = jax.jit(_generate, static_argnums=(0,), static_argnames=(
    "max_new_tokens", "greedy", "stop_sequences", "eos_token_id", "pad_token_id", "stream"))


def bucket(n: int, multiple: int) -> int:
  return max(multiple, -(-n // multiple) * multiple)


def batch_bucket(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


@dataclasses.dataclass
class Generator:
  """Generates from lists of prompt embeddings of any lengths; compiled once per shape bucket."""
  model: Llama
  length_multiple: int = 64

  def __post_init__(self):
    self._graphdef, self._state = nnx.split(self.model)

  def __call__(self, prompts: Sequence[jax.Array], config: SamplingConfig = SamplingConfig(),
               seeds: Sequence[int] | None = None,
               on_step: Callable[[int, np.ndarray, np.ndarray], None] | None = None) -> GenerationOutput:
    """prompts: (P_i, H) embeddings per row. Row i samples with `seeds[i]` (default `config.seed + i`),
    so any row can be reproduced alone by passing its seed.

    `on_step(step, tokens, active)`, if given, is called as decoding runs with the token each row
    chose at `step` ((B,) int32) and whether that row was still generating ((B,) bool).
    """
    n = len(prompts)
    if n == 0:
      raise ValueError("no prompts given")
    hidden = self.model.config.hidden_size
    for i, p in enumerate(prompts):
      if p.ndim != 2 or p.shape[1] != hidden or p.shape[0] == 0:
        raise ValueError(f"prompt {i} has shape {tuple(p.shape)}; expected (length > 0, {hidden})")
    seeds = list(seeds) if seeds is not None else [config.seed + i for i in range(n)]
    if len(seeds) != n:
      raise ValueError(f"{len(seeds)} seeds given for {n} prompts")
    batch = batch_bucket(n)
    length = bucket(max(p.shape[0] for p in prompts), self.length_multiple)
    embeds = jnp.zeros((batch, length, hidden), self.model.dtype)
    mask = np.zeros((batch, length), np.int32)
    for i, p in enumerate(prompts):
      embeds = embeds.at[i, length - p.shape[0]:].set(p.astype(self.model.dtype))
      mask[i, length - p.shape[0]:] = 1
    mask[n:, -1] = 1  # filler rows: one dummy token, results discarded
    seeds = seeds + [0] * (batch - n)
    row_keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    with _stream.lock if on_step is not None else _no_lock:
      return self._run(embeds, mask, row_keys, config, n, on_step)

  def _run(self, embeds, mask, row_keys, config, n, on_step):
    _stream.start(None if on_step is None else lambda step, t, a: on_step(step, t[:n], a[:n]))
    try:
      tokens, lengths = _generate_jit(
          self._graphdef, self._state, embeds, jnp.asarray(mask), row_keys, config.knobs(),
          max_new_tokens=config.max_new_tokens, greedy=config.greedy,
          stop_sequences=config.stop_sequences, eos_token_id=config.eos_token_id,
          pad_token_id=config.pad_token_id, stream=on_step is not None)
      tokens, lengths = np.asarray(tokens), np.asarray(lengths)
      jax.effects_barrier()
    finally:
      _stream.start(None)
    return GenerationOutput(tokens[:n], lengths[:n])

  @staticmethod
  def compiled_programs() -> int:
    """How many generation programs have been compiled so far (to check bucketing)."""
    return _generate_jit._cache_size()
