"""Fill a preallocated parameter tree from a stream of source tensors, accounting for every key."""

from __future__ import annotations

import re
from typing import Iterable

import jax
import numpy as np

from vllama_jax.errors import CheckpointError

MAX_LISTED = 20


def allocate(abstract_tree, dtype) -> dict:
  """Uninitialised numpy arrays shaped like `abstract_tree` (a pure dict of ShapeDtypeStructs)."""
  return jax.tree.map(lambda a: np.empty(a.shape, dtype), abstract_tree)


def fill(out: dict, tensors: Iterable[tuple[str, str, np.ndarray]],
         key_map: dict[str, tuple[tuple, int | None, bool]],
         ignored: Iterable[re.Pattern] = (), source: str = "checkpoint") -> None:
  """Copies each (file, key, tensor) into `out` as `key_map` says, casting to the output dtype.

  Raises one CheckpointError that names every unexpected, duplicated, mis-shaped or missing key.
  """
  ignored = tuple(ignored)
  seen: set[str] = set()
  unexpected, problems = [], []
  for path, key, tensor in tensors:
    if key not in key_map:
      if not any(p.fullmatch(key) for p in ignored):
        unexpected.append(f"{key} (in {path})")
      continue
    if key in seen:
      problems.append(f"{key} appears twice (again in {path})")
      continue
    seen.add(key)
    target_path, row, transpose = key_map[key]
    array = _get(out, target_path)
    target = array if row is None else array[row]
    expected = target.shape[::-1] if transpose else target.shape
    if tuple(tensor.shape) != tuple(expected):
      problems.append(f"{key} (in {path}) has shape {tuple(tensor.shape)}, expected {tuple(expected)} "
                      "from the config")
      continue
    target[...] = (tensor.T if transpose else tensor).astype(array.dtype, copy=False)
  missing = [k for k in key_map if k not in seen]
  message = []
  if unexpected:
    message.append(f"unexpected keys: {_listing(unexpected)}")
  if problems:
    message.append("; ".join(problems[:MAX_LISTED]))
  if missing:
    message.append(f"missing keys: {_listing(missing)}")
  if message:
    raise CheckpointError(f"{source}: " + " | ".join(message))


def _get(tree: dict, path: tuple):
  for part in path:
    tree = tree[part]
  return tree


def _listing(keys: list[str]) -> str:
  shown = ", ".join(keys[:MAX_LISTED])
  return shown + (f" ... and {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else "")
