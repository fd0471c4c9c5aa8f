"""Fill a preallocated parameter tree from a stream of source tensors, accounting for every key."""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable

import jax
import numpy as np

from vllama_jax.errors import CheckpointError

MAX_LISTED = 20
Transform = Callable[[np.ndarray], np.ndarray]


def transpose(t: np.ndarray) -> np.ndarray:
  """torch Linear weight (out, in) -> our kernel (in, out)."""
  return t.T


@dataclasses.dataclass(frozen=True)
class Rule:
  """Where one source tensor goes: (target path, layer row or None, transform) for each target.

  `shape` is the source shape to expect; when None, the transformed tensor must match its target.
  A fused tensor (EVA's qkv) has several targets, each taking its part through its transform.
  """
  targets: tuple[tuple[tuple, int | None, Transform | None], ...]
  shape: tuple[int, ...] | None = None

  @classmethod
  def to(cls, path: tuple, row: int | None = None, transform: Transform | None = None) -> "Rule":
    return cls(((tuple(path), row, transform),))


def allocate(abstract_tree, dtype) -> dict:
  """Uninitialised numpy arrays shaped like `abstract_tree` (a pure dict of ShapeDtypeStructs)."""
  return jax.tree.map(lambda a: np.empty(a.shape, dtype), abstract_tree)


def fill(out: dict, tensors: Iterable[tuple[str, str, np.ndarray]], rules: dict[str, Rule],
         ignored: Iterable[re.Pattern | Callable[[str], bool]] = (), source: str = "checkpoint") -> None:
  """Copies each (file, key, tensor) into `out` as `rules` say, casting to the output dtype.

  Keys matched by `ignored` (regexes or predicates) are dropped on purpose. Raises one
  CheckpointError that names every unexpected, duplicated, mis-shaped or missing key.
  """
  ignored = [p.fullmatch if isinstance(p, re.Pattern) else p for p in ignored]
  seen: set[str] = set()
  unexpected, problems = [], []
  for path, key, tensor in tensors:
    rule = rules.get(key)
    if rule is None:
      if not any(drop(key) for drop in ignored):
        unexpected.append(f"{key} (in {path})")
      continue
    if key in seen:
      problems.append(f"{key} appears twice (again in {path})")
      continue
    seen.add(key)
    if rule.shape is not None and tuple(tensor.shape) != tuple(rule.shape):
      problems.append(f"{key} (in {path}) has shape {tuple(tensor.shape)}, expected {tuple(rule.shape)} "
                      "from the config")
      continue
    for target_path, row, transform in rule.targets:
      array = get(out, target_path)
      target = array if row is None else array[row]
      value = transform(tensor) if transform is not None else tensor
      if value.shape != target.shape:
        expected = target.shape[::-1] if transform is transpose else target.shape
        problems.append(f"{key} (in {path}) has shape {tuple(tensor.shape)}, expected {tuple(expected)} "
                        "from the config")
        break
      target[...] = value.astype(array.dtype, copy=False)
  missing = [k for k in rules if k not in seen]
  message = []
  if unexpected:
    message.append(f"unexpected keys: {listing(unexpected)}")
  if problems:
    message.append("; ".join(problems[:MAX_LISTED]))
  if missing:
    message.append(f"missing keys: {listing(missing)}")
  if message:
    raise CheckpointError(f"{source}: " + " | ".join(message))


def get(tree: dict, path: tuple):
  for part in path:
    tree = tree[part]
  return tree


def listing(keys: list[str]) -> str:
  shown = ", ".join(keys[:MAX_LISTED])
  return shown + (f" ... and {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else "")
