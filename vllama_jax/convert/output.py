"""Write a converted directory so that a failure never leaves a half-written one behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from vllama_jax.errors import CheckpointError


def free_name(path: str) -> str:
  """`path`, or the first of `name.1.ext`, `name.2.ext`, ... that does not exist (nothing is overwritten)."""
  root, ext = os.path.splitext(path)
  target, n = path, 1
  while os.path.lexists(target):
    target, n = f"{root}.{n}{ext}", n + 1
  return target


def write_atomically(path: str, text: str) -> None:
  """Writes `path` whole or not at all (a reader never sees half a file)."""
  staging = path + ".tmp"
  with open(staging, "w") as f:
    f.write(text)
  os.replace(staging, path)


@contextlib.contextmanager
def staged_output(out_dir: str):
  """Yields a staging directory beside `out_dir`, renamed to `out_dir` only on success.

  An existing non-empty `out_dir` is never overwritten: converting again must not destroy what a
  user already has.
  """
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
    raise CheckpointError(f"{out_dir}: already exists and is not empty; choose a new --out or remove it")
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".converting-", dir=parent)
  try:
    yield staging
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  if os.path.isdir(out_dir):
    os.rmdir(out_dir)  # empty, checked above
  os.rename(staging, out_dir)
