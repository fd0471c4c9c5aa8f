"""Scaled dot-product attention with a boolean mask; scores and softmax in float32."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vllama_jax.layers.linear import einsum_rounded

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
  if mask is not None:
    mask = jnp.broadcast_to(mask, (b, tq, k.shape[2]))[:, None, None]
  out = _attention(q, k, v, mask, scale)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, tq, h, d)


def _scores(q, k, mask, scale):
  scores = jnp.einsum("bkgqd,bksd->bkgqs", q, k, preferred_element_type=jnp.float32) * scale
  return scores if mask is None else jnp.where(mask, scores, MASK_VALUE)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, mask, scale):
  """softmax(q kᵀ scale) v in the heads-first layout, with the backward written out (below)."""
  return _attention_fwd(q, k, v, mask, scale)[0]


def _attention_fwd(q, k, v, mask, scale):
  probs = jax.nn.softmax(_scores(q, k, mask, scale), axis=-1).astype(v.dtype)
  out = einsum_rounded("bkgqs,bksd->bkgqd", probs, v, v.dtype)
  return out, (q, k, v, mask, probs, out)


def _attention_bwd(scale, residuals, d_out):
  """The softmax's backward needs rowsum(dprobs * probs), which equals rowsum(d_out * out): a sum over
  the head dimension instead of over every key (FlashAttention's trick), and the sum over keys of the
  (queries, keys) matrix is what XLA:CPU ran slowest in autodiff's backward."""
  q, k, v, mask, probs, out = residuals
  d_out = d_out.astype(v.dtype)
  d_v = einsum_rounded("bkgqs,bkgqd->bksd", probs, d_out, v.dtype)
  d_probs = jnp.einsum("bkgqd,bksd->bkgqs", d_out, v, preferred_element_type=jnp.float32)
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  d_scores = probs.astype(jnp.float32) * (d_probs - delta) * scale
  if mask is not None:  # masked scores were constants: a row with no visible key gets no gradient
    d_scores = jnp.where(mask, d_scores, 0.0)
  d_scores = d_scores.astype(q.dtype)
  d_q = einsum_rounded("bkgqs,bksd->bkgqd", d_scores, k, q.dtype)
  d_k = einsum_rounded("bkgqs,bkgqd->bksd", d_scores, q, k.dtype)
  return d_q, d_k, d_v, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def causal_mask(query_positions: jax.Array, key_positions: jax.Array, key_valid: jax.Array) -> jax.Array:
  """(B, Tq, Tk) mask: key visible when it is valid and not after the query (by cache slot index)."""
  return (key_positions[None, None, :] <= query_positions[:, :, None]) & key_valid[:, None, :]
