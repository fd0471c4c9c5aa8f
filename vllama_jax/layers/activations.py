"""Activations written the way XLA:CPU runs them fastest."""

from __future__ import annotations

import math

import jax


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x / 2 * (1 + erf(x / sqrt(2))), as torch's nn.GELU() and BERT's "gelu" compute it:
  jax.nn.gelu(approximate=False) is the same function through erfc, 1.3-3x slower on XLA's CPU backend."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * math.sqrt(0.5)))
