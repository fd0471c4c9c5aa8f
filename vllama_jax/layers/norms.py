"""Normalisation layers; statistics always in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vllama_jax.layers.linear import param


class RMSNorm(nnx.Module):
  """LLaMA RMSNorm: x / sqrt(mean(x²) + eps) in fp32, cast back to the input dtype, times weight."""

  def __init__(self, dim: int, *, eps: float, dtype="float32", rngs: nnx.Rngs):
    self.eps = eps
    self.weight = param(rngs, nnx.initializers.ones, (dim,), dtype, ("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (self.weight[...] * normed.astype(x.dtype)).astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm with statistics in fp32 and an explicit epsilon (the reference uses 1e-12 to 1e-5)."""

  def __init__(self, dim: int, *, eps: float, dtype="float32", rngs: nnx.Rngs):
    self.eps = eps
    self.scale = param(rngs, nnx.initializers.ones, (dim,), dtype, ("norm",))
    self.bias = param(rngs, nnx.initializers.zeros, (dim,), dtype, ("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (normed * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)
