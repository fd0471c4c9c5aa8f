"""Next-token choice: repetition penalty, temperature, top-k, top-p, in Hugging Face's order.

Knob values are traced arrays, so changing them never recompiles; only greedy-vs-sampling is static.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from vllama_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Decoding settings. The defaults are the Video-LLaMA demo's (top_p 0.9, temperature 1, 300 tokens)."""
  max_new_tokens: int = 300
  greedy: bool = False
  temperature: float = 1.0
  top_p: float = 0.9
  top_k: int = 0  # 0 = off
  repetition_penalty: float = 1.0
  stop_sequences: tuple[tuple[int, ...], ...] = ()
  eos_token_id: int | None = 2
  pad_token_id: int = 0
  seed: int = 0

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if not self.greedy and self.temperature <= 0:
      raise ConfigError(f"temperature must be > 0 when sampling, got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise ConfigError(f"top_k must be >= 0 (0: off), got {self.top_k}")
    if self.repetition_penalty <= 0:
      raise ConfigError(f"repetition_penalty must be > 0 (1: off), got {self.repetition_penalty}")
    if any(len(s) == 0 for s in self.stop_sequences):
      raise ConfigError("stop sequences must not be empty")
    object.__setattr__(self, "stop_sequences", tuple(tuple(int(t) for t in s) for s in self.stop_sequences))

  def knobs(self) -> dict:
    """The traced part of the config."""
    return dict(temperature=jnp.float32(self.temperature), top_p=jnp.float32(self.top_p),
                top_k=jnp.int32(self.top_k), repetition_penalty=jnp.float32(self.repetition_penalty))


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
  """HF rule on tokens already generated: negative scores are multiplied, positive ones divided."""
  penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
  return jnp.where(seen, penalised, logits)


def filter_top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Masks (to -inf) tokens outside the top-k and outside the smallest set with mass >= top_p.

  The most likely token always survives. Ties at the threshold are kept, as in HF.
  """
  sorted_desc = jnp.sort(logits, axis=-1)[..., ::-1]
  vocab = logits.shape[-1]
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  kth = jnp.take_along_axis(sorted_desc, jnp.broadcast_to(k - 1, logits.shape[:-1])[..., None], axis=-1)
  in_top_k = sorted_desc >= kth  # ties with the k-th value stay, as in HF
  # top-p acts on the top-k distribution, renormalised, as HF chains the two warpers
  probs = jax.nn.softmax(jnp.where(in_top_k, sorted_desc, -jnp.inf), axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of strictly better tokens
  keep_sorted = ((mass_before < top_p) | (top_p >= 1.0)) & in_top_k
  # threshold = smallest kept logit; everything >= it survives
  threshold = jnp.min(jnp.where(keep_sorted, sorted_desc, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits >= threshold, logits, -jnp.inf)


def choose_tokens(logits: jax.Array, seen: jax.Array, keys: jax.Array, knobs: dict, greedy: bool) -> jax.Array:
  """logits (B, V) float32, seen (B, V) bool, keys (B,) per-row PRNG keys -> tokens (B,) int32."""
  logits = apply_repetition_penalty(logits, seen, knobs["repetition_penalty"])
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_top_k_top_p(logits / knobs["temperature"], knobs["top_k"], knobs["top_p"])
  return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)
