"""LlamaForCausalLM's loss: next-token cross-entropy, averaged over every target token of the batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE = -100  # label of a position that is not a target


def token_nll(logits: jax.Array, labels: jax.Array, weight: jax.Array | None = None):
  """(sum of the next-token negative log-likelihoods, number of target tokens), both float32.

  logits (B, L, V) predict labels (B, L) shifted by one: logits[:, :-1] against labels[:, 1:].
  Positions labelled IGNORE do not count; `weight` (B,) scales each row's tokens (0: filler row).
  Returning sums lets microbatches and devices be added before the one division.
  """
  logits = logits[:, :-1].astype(jnp.float32)
  targets = labels[:, 1:]
  mask = (targets != IGNORE).astype(jnp.float32)
  if weight is not None:
    mask = mask * weight.astype(jnp.float32)[:, None]
  logp = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logp, jnp.where(targets == IGNORE, 0, targets)[..., None], axis=-1)[..., 0]
  # where(), not a product: a masked position's -inf or NaN must not leak into the sum.
  return -jnp.sum(jnp.where(mask > 0, picked * mask, 0.0)), jnp.sum(mask)


def cross_entropy(logits: jax.Array, labels: jax.Array, weight: jax.Array | None = None) -> jax.Array:
  """Token-level mean cross-entropy (0 when the batch has no target token)."""
  total, tokens = token_nll(logits, labels, weight)
  return total / jnp.maximum(tokens, 1.0)
