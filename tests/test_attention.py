"""dot_product_attention's hand-written backward against autodiff of the textbook formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vllama_jax.layers import attention
from vllama_jax.layers.attention import causal_mask, dot_product_attention


def textbook(q, k, v, mask, scale):
  """softmax(q kᵀ scale) v per head, keys and values repeated for grouped queries; fp32 throughout."""
  groups = q.shape[2] // k.shape[2]
  k, v = (jnp.repeat(a.astype(jnp.float32), groups, axis=2) for a in (k, v))
  scores = jnp.einsum("bqhd,bshd->bhqs", q.astype(jnp.float32), k) * scale
  if mask is not None:
    scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
  return jnp.einsum("bhqs,bshd->bqhd", jax.nn.softmax(scores, axis=-1), v)


def inputs(dtype, seed=0):
  b, t, heads, kv_heads, d = 2, 9, 4, 2, 8
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (b, t, heads, d))
  k, v = (jax.random.normal(key, (b, t, kv_heads, d)) for key in keys[1:3])
  cotangent = jax.random.normal(keys[3], (b, t, heads, d))
  return [a.astype(dtype) for a in (q, k, v)], cotangent


def left_padded_causal_mask(b=2, t=9):
  slots = jnp.arange(t)
  valid = jnp.ones((b, t), bool).at[0, :2].set(False)  # row 0 is left-padded: its queries 0-1 see no key
  return causal_mask(jnp.broadcast_to(slots, (b, t)), slots, valid)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_gradients_match_autodiff_of_the_formula(forward_path, masked, dtype, rtol):
  (q, k, v), cotangent = inputs(dtype)
  mask = left_padded_causal_mask() if masked else None
  scale = 0.3

  def loss(attention):
    return lambda q, k, v: jnp.sum(attention(q, k, v, mask, scale).astype(jnp.float32) * cotangent)

  got = jax.jit(jax.grad(loss(dot_product_attention), argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(loss(textbook), argnums=(0, 1, 2))(q, k, v)
  for name, g, w in zip("qkv", got, want):
    assert g.dtype == dtype, name
    w = np.asarray(w, np.float32)
    np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=rtol, atol=rtol * np.abs(w).max(), err_msg=name)
  if masked:  # queries with no visible key are constants of the keys: nothing flows back from them
    lonely = jax.grad(lambda k: jnp.sum(dot_product_attention(q, k, v, mask, scale)[0, :2].astype(jnp.float32)))(k)
    assert not np.any(np.asarray(lonely, np.float32))



@pytest.fixture(params=["per example", "batched"])
def forward_path(request, monkeypatch):
  """XLA:CPU runs large attention (several prompt tokens, big scores) one batch row at a time; other
  backends, small attention and one-token decoding run the whole batch at once. Both are checked."""
  if request.param == "per example":
    monkeypatch.setattr(attention, "PER_EXAMPLE_MIN_SCORES", 0)
  else:
    monkeypatch.setattr(attention.jax, "default_backend", lambda: "gpu")
  return request.param


@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_forward_matches_the_formula(forward_path, dtype, rtol):
  (q, k, v), _ = inputs(dtype)
  mask = left_padded_causal_mask()
  for q_rows, mask_rows in ((q, mask), (q[:, -1:], mask[:, -1:]), (q, None)):  # prompt, decode step, unmasked
    got = jax.jit(lambda q, k, v, m: dot_product_attention(q, k, v, m, 0.3))(q_rows, k, v, mask_rows)
    want = np.asarray(textbook(q_rows, k, v, mask_rows, 0.3), np.float32)
    assert got.dtype == dtype and got.shape == q_rows.shape
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=rtol, atol=rtol * np.abs(want).max())


def test_paths_agree_in_float32(monkeypatch):
  (q, k, v), _ = inputs(jnp.float32, seed=1)
  mask = left_padded_causal_mask()
  run = lambda: np.asarray(jax.jit(lambda q, k, v, m: dot_product_attention(q, k, v, m))(q, k, v, mask))
  monkeypatch.setattr(attention, "PER_EXAMPLE_MIN_SCORES", 0)
  per_example = run()
  monkeypatch.setattr(attention, "PER_EXAMPLE_MIN_SCORES", 2 ** 62)
  np.testing.assert_allclose(per_example, run(), rtol=1e-6, atol=1e-6)


def test_per_example_path_on_a_sharded_batch(monkeypatch):
  """The row-by-row loop over a batch split across devices (data) with heads split too (tensor) gives
  what one device gives, forward and backward."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from vllama_jax.sharding import make_mesh
  monkeypatch.setattr(attention, "PER_EXAMPLE_MIN_SCORES", 0)
  keys = jax.random.split(jax.random.key(2), 3)
  q, k, v = (jax.random.normal(key, (8, 9, 4, 8)) for key in keys)
  mask = left_padded_causal_mask(b=8)
  loss = lambda q, k, v: jnp.sum(jnp.sin(dot_product_attention(q, k, v, mask)))
  value_and_grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  want = value_and_grads(q, k, v)
  mesh = make_mesh((4, 1, 2))
  spread = NamedSharding(mesh, P("data", None, "tensor", None))
  got = value_and_grads(*(jax.device_put(a, spread) for a in (q, k, v)))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
