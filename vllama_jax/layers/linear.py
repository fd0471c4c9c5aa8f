"""Parameters with logical axis names, and the Linear layer built from them."""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], dtype, names: Sequence[str | None]) -> nnx.Param:
  """An nnx.Param whose `out_sharding` holds logical names, resolved later by `sharding.py`.

  Eager sharding is off: placement is decided once, by `jax.jit(out_shardings=...)` or an orbax
  restore target, never as a side effect of construction.
  """
  if len(names) != len(shape):
    raise ValueError(f"logical names {tuple(names)} do not match shape {tuple(shape)}")
  return nnx.Param(init(rngs.params(), tuple(shape), jnp.dtype(dtype)),
                   out_sharding=tuple(names), eager_sharding=False)


class Linear(nnx.Module):
  """y = x @ kernel (+ bias); kernel is (in, out), i.e. the transpose of torch's nn.Linear weight."""

  def __init__(self, in_features: int, out_features: int, *, names: tuple[str | None, str | None],
               use_bias: bool = False, dtype="float32", rngs: nnx.Rngs,
               kernel_init: Initializer = nnx.initializers.normal(0.02),
               bias_init: Initializer = nnx.initializers.zeros):
    self.kernel = param(rngs, kernel_init, (in_features, out_features), dtype, names)
    self.bias = param(rngs, bias_init, (out_features,), dtype, names[1:]) if use_bias else None

  def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:
    """`out_dtype` (default: the kernel's) is the output's dtype; float32 keeps bf16 logits unrounded."""
    kernel = self.kernel[...]
    x = x.astype(kernel.dtype)
    y = matmul(x, kernel, out_dtype)
    if self.bias is not None:
      y = y + self.bias[...]
    return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x: jax.Array, kernel: jax.Array, out_dtype=None) -> jax.Array:
  """x @ kernel accumulated in fp32 and rounded once to `out_dtype` (default: the operands' dtype); the
  backward's products take the cotangent in the operands' dtype and round to it too.

  Written out for XLA:CPU, on two counts. Its AMX / bf16 kernels only take a bf16 dot that returns fp32
  (one returning bf16 runs about 3x slower), and the custom VJP keeps the cotangents in the operands'
  dtype, so that the backward dots are bf16 ones too, as autodiff of a bf16 dot gives. And autodiff's
  kernel gradient is a (out, in) product transposed afterwards, for which XLA:CPU first transposes the
  whole (tokens, out) cotangent: computing it as (in, out) directly halves its time in fp32 too.

  With bf16 operands and a float32 output (the LM head's logits), the cotangent is rounded to bf16 before
  the backward's products, as a bf16 / fp16 PyTorch LM head computes them; autodiff of the fp32-output
  dot would instead copy the whole (hidden, vocab) kernel to fp32 and run an fp32 product."""
  return einsum_rounded("...i,io->...o", x, kernel, out_dtype or x.dtype)


def einsum_rounded(spec: str, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
  """jnp.einsum accumulated in fp32 and rounded once to `dtype` (see `matmul`)."""
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(dtype)


def _matmul_fwd(x, kernel, out_dtype):
  # Called with symbolic zeros: `perturbed` says which operand is differentiated. Only what a wanted
  # gradient needs is saved (x for the kernel's, the kernel for x's), and the None left in the other
  # place tells the backward to skip that product: a frozen layer costs no kernel-gradient matmul.
  out = matmul(x.value, kernel.value, out_dtype)
  return out, (x.value if kernel.perturbed else None, kernel.value if x.perturbed else None)


def _matmul_bwd(out_dtype, residuals, g):
  x, kernel = residuals
  if isinstance(g, jax.custom_derivatives.SymbolicZero):
    return None, None
  g = g.astype(x.dtype if x is not None else kernel.dtype)
  dx = None if kernel is None else einsum_rounded("...o,io->...i", g, kernel, g.dtype)
  dkernel = None if x is None else einsum_rounded("ni,no->io", x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]),
                                                  g.dtype)
  return dx, dkernel


matmul.defvjp(_matmul_fwd, _matmul_bwd, symbolic_zeros=True)
