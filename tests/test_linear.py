"""Linear's hand-written VJP: the gradients autodiff gives, in the operands' dtype, counted as three matmuls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vllama_jax.layers.linear import Linear
from vllama_jax.train.flops import count_flops


def loss_and_grads(layer, x, cotangent):
  graphdef, params = nnx.split(layer)
  loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x).astype(jnp.float32) * cotangent)  # noqa: E731
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)


def autodiff_reference(kernel, bias, x, cotangent):
  """The same loss through a plain fp32 einsum, differentiated by JAX."""
  loss = lambda k, b, x: jnp.sum((jnp.einsum("...i,io->...o", x, k) + b) * cotangent)  # noqa: E731
  return jax.value_and_grad(loss, argnums=(0, 1, 2))(kernel, bias, x)


@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_gradients_are_autodiffs(dtype, rtol):
  rng = np.random.default_rng(0)
  layer = Linear(48, 40, names=("embed", "mlp"), use_bias=True, dtype=dtype, rngs=nnx.Rngs(0))
  layer.bias[...] = jnp.asarray(rng.normal(size=40), dtype)
  x = jnp.asarray(rng.normal(size=(3, 7, 48)), dtype)
  cotangent = jnp.asarray(rng.normal(size=(3, 7, 40)), jnp.float32)
  loss, (grads, dx) = loss_and_grads(layer, x, cotangent)
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  ref_loss, (ref_dk, ref_db, ref_dx) = autodiff_reference(f32(layer.kernel[...]), f32(layer.bias[...]), f32(x),
                                                          cotangent)
  assert grads["kernel"].dtype == dx.dtype == jnp.dtype(dtype)
  np.testing.assert_allclose(loss, ref_loss, rtol=rtol)
  for got, want in ((grads["kernel"], ref_dk), (grads["bias"], ref_db), (dx, ref_dx)):
    np.testing.assert_allclose(f32(got), want, rtol=rtol, atol=rtol * float(jnp.abs(want).max()))


@pytest.mark.parametrize("argnums, matmuls", [((0, 1), 3), (0, 2), (1, 2)])
def test_only_the_wanted_gradients_cost_a_matmul(argnums, matmuls):
  """A frozen layer (kernel not differentiated) runs no kernel-gradient product, and vice versa."""
  layer = Linear(16, 24, names=("embed", "mlp"), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(layer)
  loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x))  # noqa: E731
  x = jax.ShapeDtypeStruct((2, 5, 16), jnp.float32)
  forward = count_flops(loss, params, x)
  assert forward == 2 * 2 * 5 * 16 * 24
  assert count_flops(jax.value_and_grad(loss, argnums=argnums), params, x) == matmuls * forward
