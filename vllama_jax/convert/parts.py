"""Shared steps of converting one part (video branch, audio branch) of a Video-LLaMA model."""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import numpy as np
from flax import nnx

from vllama_jax.convert import readers, tree


def under(module: str, rules: dict[str, tree.Rule]) -> dict[str, tree.Rule]:
  """The same rules with every target path moved under `module` of the part's tree."""
  return {key: tree.Rule(tuple(((module,) + path, row, t) for path, row, t in rule.targets), rule.shape)
          for key, rule in rules.items()}


def fill_file(out: dict, path: str, entry: str | None, rules: dict[str, tree.Rule], ignored: Iterable) -> None:
  """Streams one source file (its `entry` sub-dict, for a training-run pickle) into `out`."""
  tensors = ((path, key, tensor) for key, tensor in readers.iter_file(path, entry))
  tree.fill(out, tensors, rules, ignored, source=path)


def _leaf_paths(params: dict, prefix: tuple = ()) -> Iterable[tuple]:
  for key, value in params.items():
    if isinstance(value, dict):
      yield from _leaf_paths(value, prefix + (key,))
    else:
      yield prefix + (key,)


def check_coverage(out: dict, rule_sets: Iterable[dict[str, tree.Rule]], initialised: Iterable[str]) -> None:
  """Every parameter is written by some rule or initialised: none is saved uninitialised."""
  covered = {path for rules in rule_sets for rule in rules.values() for path, _, _ in rule.targets}
  initialised = set(initialised)
  left = [p for p in _leaf_paths(out) if p not in covered and p[0] not in initialised]
  if left:
    raise RuntimeError(f"no conversion rule writes {['.'.join(map(str, p)) for p in left]}")


def initial_params(build: Callable[[nnx.Rngs], nnx.Module], names: Iterable[str], seed: int) -> dict:
  """The named top-level parts of `build(nnx.Rngs(seed))`'s parameters, as numpy.

  The whole module is built under `jax.jit`, which returns only those parts, so the frozen
  encoders' initialisation is traced but never computed.
  """
  names = tuple(names)

  def init():
    params = nnx.to_pure_dict(nnx.state(build(nnx.Rngs(seed))))
    return {name: params[name] for name in names}

  return jax.tree.map(np.array, jax.jit(init)())  # writable copies: a source file may fill some


def allocate_like(abstract: dict) -> dict:
  """Uninitialised numpy arrays for a pure dict of ShapeDtypeStructs, each in its own dtype."""
  return jax.tree.map(lambda a: np.empty(a.shape, a.dtype), abstract)
