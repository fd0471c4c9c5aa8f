"""Matmul FLOPs of a function, counted on its jaxpr, for the MFU estimate.

XLA's `cost_analysis()` counts the body of a while loop once, and `lax.scan` lowers to one, so a
scanned layer stack (the LLaMA decoder, EVA and ImageBind blocks) would count as a single layer.
Walking the jaxpr instead keeps every scan's `length`.

Counted: 2·M·N·K for every `dot_general` (batch dimensions multiply in) and the same for every
`conv_general_dilated` (2 per multiply-add of an input element with a kernel tap; taps on padding or
on the holes of a dilated input, as in a strided conv's gradient, do not count): the matmul FLOPs
MFU conventionally counts. Element-wise ops, reductions, gathers etc. are not counted. What the
jaxpr runs is what counts: under `jax.checkpoint` / `remat` the forward recomputed for the backward
counts again.

Higher-order primitives are found through the Jaxpr / ClosedJaxpr objects in their params, so
jit, custom_jvp_call, custom_vjp_call, remat, closed_call and the like count their sub-jaxprs once;
a `scan` body counts `length` times; a `shard_map` body (per-shard shapes) once per device of its
manual mesh axes; a `cond` its most expensive branch, an upper bound (which branch runs is not known
when tracing). A `while` loop's trip count is not known either: its body and condition count once.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import jax
from jax.extend.core import ClosedJaxpr, Jaxpr


def count_flops(fn: Callable, *args: Any) -> int:
  """Matmul FLOPs of `fn(*args)`; `args` may be arrays or `jax.ShapeDtypeStruct`s."""
  return jaxpr_flops(jax.make_jaxpr(fn)(*args))


def jaxpr_flops(jaxpr: Jaxpr | ClosedJaxpr) -> int:
  """Matmul FLOPs of one run of `jaxpr`, sub-jaxprs included."""
  if isinstance(jaxpr, ClosedJaxpr):
    jaxpr = jaxpr.jaxpr
  total = 0
  for eqn in jaxpr.eqns:
    name, params = eqn.primitive.name, eqn.params
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "cond":
      total += max(jaxpr_flops(branch) for branch in params["branches"])
    else:
      times = 1
      if name == "scan":
        times = params["length"]
      elif name == "shard_map":
        times = math.prod(params["mesh"].shape[a] for a in params.get("newly_manual_axes", ()))
      total += times * sum(jaxpr_flops(sub) for sub in sub_jaxprs(params.values()))
  return total


def sub_jaxprs(values) -> Iterator[Jaxpr | ClosedJaxpr]:
  """The jaxprs among an equation's parameter values (nested in tuples and lists too)."""
  for value in values:
    if isinstance(value, (Jaxpr, ClosedJaxpr)):
      yield value
    elif isinstance(value, (tuple, list)):
      yield from sub_jaxprs(value)


def _dot_flops(eqn) -> int:
  lhs, rhs = (v.aval.shape for v in eqn.invars)
  (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
  rhs_free = [n for i, n in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
  return 2 * math.prod(lhs) * math.prod(rhs_free)  # lhs holds batch x M x K


def _conv_flops(eqn) -> int:
  p, spec = eqn.params, eqn.params["dimension_numbers"]
  lhs, kernel, out = (v.aval.shape for v in (*eqn.invars, *eqn.outvars))
  taps = 1
  for i, (l, k, o) in enumerate(zip(spec.lhs_spec[2:], spec.rhs_spec[2:], spec.out_spec[2:])):
    taps *= _valid_taps(lhs[l], kernel[k], out[o], p["window_strides"][i], p["padding"][i][0],
                        p["lhs_dilation"][i], p["rhs_dilation"][i])
  # Every output element takes the kernel's input features (per group) at each valid tap.
  return 2 * out[spec.out_spec[0]] * out[spec.out_spec[1]] * kernel[spec.rhs_spec[1]] * taps


def _valid_taps(size, kernel, out, stride, pad, lhs_dilation, rhs_dilation) -> int:
  """(output position, kernel tap) pairs along one spatial axis that meet an input element rather
  than padding or a hole of the input's dilation (as in a strided conv's gradient)."""
  extent = (size - 1) * lhs_dilation + 1
  at = ((o * stride + k * rhs_dilation - pad) for o in range(out) for k in range(kernel))
  return sum(0 <= x < extent and x % lhs_dilation == 0 for x in at)
