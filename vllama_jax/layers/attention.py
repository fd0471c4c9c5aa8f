"""Scaled dot-product attention with a boolean mask; scores and softmax in float32."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vllama_jax.layers.linear import einsum_rounded

# A large finite negative rather than -inf: a row with no visible key (left padding) then gets a
# uniform softmax instead of NaNs, and its output is ignored downstream.
MASK_VALUE = float(jnp.finfo(jnp.float32).min)

# On XLA:CPU, attention whose scores outgrow the caches (4 MiB in fp32) runs one batch row at a time
# (`_forward_per_example`); below this size that was no faster, and its loop costs compile time.
PER_EXAMPLE_MIN_SCORES = 2 ** 20


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                          scale: float | None = None) -> jax.Array:
  """q: (B, Tq, H, D); k, v: (B, Tk, KV, D) with H a multiple of KV; mask: broadcastable to (B, Tq, Tk)."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  if mask is not None:
    mask = jnp.broadcast_to(mask, q.shape[:2] + k.shape[1:2])
  return _attention(q, k, v, mask, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, mask, scale):
  """softmax(q kᵀ scale) v, with the backward written out (below)."""
  return _forward(q, k, v, mask, scale, keep_probs=False)[1]


def _attention_fwd(q, k, v, mask, scale):
  probs, out = _forward(q, k, v, mask, scale, keep_probs=True)
  return out, (q, k, v, mask, probs, out)


def _forward(q, k, v, mask, scale, keep_probs):
  """(probs in the heads-first layout (B, KV, G, Tq, Tk), or None unless kept; out (B, Tq, H, D))."""
  b, tq, h, _ = q.shape
  if tq > 1 and b * h * tq * k.shape[1] >= PER_EXAMPLE_MIN_SCORES and jax.default_backend() == "cpu":
    return _forward_per_example(q, k, v, mask, scale, keep_probs)
  q, k, v, mask = _heads_first(q, k, v, mask)
  scores = jnp.einsum("bkgqd,bksd->bkgqs", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    scores = jnp.where(mask, scores, MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return probs, _tokens_first(einsum_rounded("bkgqs,bksd->bkgqd", probs, v, v.dtype))


def _heads_first(q, k, v, mask):
  """Each einsum is then a plain batched matmul: XLA:CPU runs the (B, T, H, D) contraction 3-4x slower."""
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, KV, Tk, D)
  return _query_heads_first(q, k.shape[1]), k, v, None if mask is None else mask[:, None, None]


def _query_heads_first(x, kv):
  b, tq, h, d = x.shape
  return x.reshape(b, tq, kv, h // kv, d).transpose(0, 2, 3, 1, 4)  # (B, KV, G, Tq, D)


def _tokens_first(x):
  b, kv, g, tq, d = x.shape
  return x.transpose(0, 3, 1, 2, 4).reshape(b, tq, kv * g, d)


def _forward_per_example(q, k, v, mask, scale, keep_probs):
  """The same products, one batch row at a time, for XLA:CPU. A row's scores stay in cache from one
  matmul through the softmax to the next, and with the query laid out (heads, head_dim, tokens) the
  matmuls go to Eigen, which runs these small per-head products faster than YNNPACK: EVA's attention
  (32 frames x 16 heads x 257 tokens) takes a third of the batched time. Eigen has no bf16 product
  with an fp32 result, so bf16 operands are widened; their products are exact in fp32 either way.
  Grouped queries are folded into the query axis: (KV, D, G·Tq)."""
  tq, h, d = q.shape[1:]
  kv = k.shape[2]
  g = h // kv
  widen = lambda a: a.astype(jnp.promote_types(a.dtype, jnp.float32))

  def row(args):
    q, k, v, mask = args  # (Tq, H, D), (Tk, KV, D), (Tk, KV, D), (Tq, Tk)
    q = widen(q).reshape(tq, kv, g, d).transpose(1, 3, 2, 0).reshape(kv, d, g * tq)
    scores = jnp.einsum("kdq,ksd->kqs", q, widen(k).transpose(1, 0, 2)).reshape(kv, g, tq, -1) * scale
    if mask is not None:
      scores = jnp.where(mask, scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("kqs,ksd->kqd", widen(probs).reshape(kv, g * tq, -1), widen(v).transpose(1, 0, 2))
    out = out.reshape(kv, g, tq, d).transpose(2, 0, 1, 3).reshape(tq, h, d).astype(v.dtype)
    return (probs if keep_probs else None), out

  return jax.lax.map(row, (q, k, v, mask))


def _attention_bwd(scale, residuals, d_out):
  """The softmax's backward needs rowsum(dprobs * probs), which equals rowsum(d_out * out): a sum over
  the head dimension instead of over every key (FlashAttention's trick), and the sum over keys of the
  (queries, keys) matrix is what XLA:CPU ran slowest in autodiff's backward."""
  q, k, v, mask, probs, out = residuals
  q, k, v, mask = _heads_first(q, k, v, mask)
  d_out, out = (_query_heads_first(a, k.shape[1]) for a in (d_out.astype(v.dtype), out))
  d_v = einsum_rounded("bkgqs,bkgqd->bksd", probs, d_out, v.dtype)
  d_probs = jnp.einsum("bkgqd,bksd->bkgqs", d_out, v, preferred_element_type=jnp.float32)
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  d_scores = probs.astype(jnp.float32) * (d_probs - delta) * scale
  if mask is not None:  # masked scores were constants: a row with no visible key gets no gradient
    d_scores = jnp.where(mask, d_scores, 0.0)
  d_scores = d_scores.astype(q.dtype)
  d_q = _tokens_first(einsum_rounded("bkgqs,bksd->bkgqd", d_scores, k, q.dtype))
  d_k = einsum_rounded("bkgqs,bkgqd->bksd", d_scores, q, k.dtype)
  return d_q, d_k.transpose(0, 2, 1, 3), d_v.transpose(0, 2, 1, 3), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def causal_mask(query_positions: jax.Array, key_positions: jax.Array, key_valid: jax.Array) -> jax.Array:
  """(B, Tq, Tk) mask: key visible when it is valid and not after the query (by cache slot index)."""
  return (key_positions[None, None, :] <= query_positions[:, :, None]) & key_valid[:, None, :]
