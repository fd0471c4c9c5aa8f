"""Layer stacks: one module whose parameters carry a leading `layers` axis, run with `lax.scan`."""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx


def stacked(build: Callable[[nnx.Rngs], nnx.Module], count: int, rngs: nnx.Rngs) -> nnx.Module:
  """`count` independently initialised copies of `build(rngs)`, stacked along a `layers` axis."""

  @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make(key):
    return build(nnx.Rngs(params=key))

  return make(jax.random.split(rngs.params(), count))
