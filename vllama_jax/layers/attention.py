"""Scaled dot-product attention with a boolean mask; scores and softmax in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# A large finite negative rather than -inf: a row with no visible key (left padding) then gets a
# uniform softmax instead of NaNs, and its output is ignored downstream.
MASK_VALUE = float(jnp.finfo(jnp.float32).min)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                          scale: float | None = None) -> jax.Array:
  """q: (B, Tq, H, D); k, v: (B, Tk, KV, D) with H a multiple of KV; mask: broadcastable to (B, Tq, Tk)."""
  b, tq, h, d = q.shape
  kv = k.shape[2]
  scale = d ** -0.5 if scale is None else scale
  # Heads first, so each einsum is a plain batched matmul: XLA's CPU backend handles the
  # (B, T, H, D) contraction 3-4x more slowly.
  q = q.reshape(b, tq, kv, h // kv, d).transpose(0, 2, 3, 1, 4)  # (B, KV, G, Tq, D)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, KV, Tk, D)
  scores = jnp.einsum("bkgqd,bksd->bkgqs", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgqs,bksd->bkgqd", probs, v)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, tq, h, d)


def causal_mask(query_positions: jax.Array, key_positions: jax.Array, key_valid: jax.Array) -> jax.Array:
  """(B, Tq, Tk) mask: key visible when it is valid and not after the query (by cache slot index)."""
  return (key_positions[None, None, :] <= query_positions[:, :, None]) & key_valid[:, None, :]
