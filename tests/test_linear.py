"""Linear's hand-written VJP: the gradients autodiff gives, in the operands' dtype, counted as three matmuls;
with a float32 output (the LM head's logits) from bf16 operands, the backward's products stay bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vllama_jax.layers.linear import Linear
from vllama_jax.train.flops import sub_jaxprs, count_flops


def loss_and_grads(layer, x, cotangent, out_dtype=None):
  graphdef, params = nnx.split(layer)
  loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x, out_dtype).astype(jnp.float32) * cotangent)  # noqa: E731
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)


def autodiff_reference(kernel, bias, x, cotangent):
  """The same loss through a plain fp32 einsum, differentiated by JAX."""
  loss = lambda k, b, x: jnp.sum((jnp.einsum("...i,io->...o", x, k) + b) * cotangent)  # noqa: E731
  return jax.value_and_grad(loss, argnums=(0, 1, 2))(kernel, bias, x)


@pytest.mark.parametrize("out_dtype", [None, "float32"])
@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_gradients_are_autodiffs(dtype, rtol, out_dtype):
  rng = np.random.default_rng(0)
  layer = Linear(48, 40, names=("embed", "mlp"), use_bias=True, dtype=dtype, rngs=nnx.Rngs(0))
  layer.bias[...] = jnp.asarray(rng.normal(size=40), dtype)
  x = jnp.asarray(rng.normal(size=(3, 7, 48)), dtype)
  cotangent = jnp.asarray(rng.normal(size=(3, 7, 40)), jnp.float32)
  loss, (grads, dx) = loss_and_grads(layer, x, cotangent, out_dtype)
  assert layer(x, out_dtype).dtype == jnp.dtype(out_dtype or dtype)
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


def test_float32_output_from_bf16_runs_only_bf16_products():
  """The LM head's backward: no fp32 copy of the (hidden, vocab) kernel, as autodiff of the fp32-output dot
  makes, and the input's gradient is one bf16 product."""
  layer = Linear(16, 24, names=("embed", "vocab"), dtype="bfloat16", rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(layer)
  loss = lambda x, p: jnp.sum(nnx.merge(graphdef, p)(x, jnp.float32))  # noqa: E731
  eqns = list(all_eqns(jax.make_jaxpr(jax.grad(loss))(jnp.ones((2, 5, 16), jnp.bfloat16), params).jaxpr))
  dots = [e for e in eqns if e.primitive.name == "dot_general"]
  assert len(dots) == 2  # forward, input gradient
  assert all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars), dots
  assert not any(e.primitive.name == "convert_element_type" and e.invars[0].aval.shape == (16, 24) for e in eqns)


def all_eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in sub_jaxprs(eqn.params.values()):
      yield from all_eqns(getattr(sub, "jaxpr", sub))
