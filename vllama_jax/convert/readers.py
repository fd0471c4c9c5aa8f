"""Streaming readers for PyTorch / Hugging Face checkpoint files.

Each reader yields `(key, numpy array)` one tensor at a time, so a converter holds at most one
source tensor beside its output. Torch pickles are loaded with `weights_only=True`, memory-mapped
where they are in torch's zip format (every `torch.save` since 1.6; an older file is read whole);
torch is imported only when a pickle is read.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Iterator

import numpy as np

from vllama_jax.errors import CheckpointError

PICKLE_SUFFIXES = (".bin", ".pth", ".pt")


def _torch():
  try:
    import torch
  except ImportError:
    raise CheckpointError("reading PyTorch pickles needs torch: pip install 'vllama_jax[convert]'") from None
  return torch


def torch_to_numpy(tensor) -> np.ndarray:
  """A CPU torch tensor as numpy; bfloat16 goes through ml_dtypes without a float32 round trip."""
  torch = _torch()
  tensor = tensor.detach().cpu()
  if tensor.dtype == torch.bfloat16:
    import ml_dtypes
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


def load_torch_pickle(path: str) -> dict:
  """The object in a torch pickle, tensors only (`weights_only=True`), memory-mapped where it can be."""
  torch = _torch()
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file")
  with open(path, "rb") as f:
    zip_format = f.read(4) == b"PK\x03\x04"  # torch's own test; the legacy format cannot be mapped
  try:
    return torch.load(path, map_location="cpu", mmap=zip_format, weights_only=True)
  except Exception as e:  # torch raises many types for truncated / corrupt zips
    raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint "
                          f"(truncated or corrupt?): {type(e).__name__}: {_gist(e)}") from None


def _gist(error: Exception) -> str:
  """The line of a torch.load error that says what failed: its weights-only unpickler's finding (the
  message around it advises weights_only=False, wrong for a corrupt file), else its first line."""
  text = str(error).strip()
  marker = "WeightsUnpickler error:"
  if marker in text:
    text = text.split(marker, 1)[1].strip()
  return (text.splitlines() or [""])[0][:300]


def iter_file(path: str, entry: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
  """Tensors of one .safetensors file or one torch state-dict pickle.

  `entry` selects a sub-dict of a pickle, e.g. "model" in a LAVIS training-run checkpoint
  ({"model", "optimizer", "config", "scaler", "epoch"}); everything beside it is never read.
  """
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file")
  if path.endswith(".safetensors"):
    yield from _iter_safetensors(path)
  elif path.endswith(PICKLE_SUFFIXES):
    state = load_torch_pickle(path)
    if entry is not None:
      if not isinstance(state, dict) or not isinstance(state.get(entry), dict):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: expected a training-run checkpoint with a {entry!r} state dict, "
                              f"found {found}")
      state = state[entry]
    if not isinstance(state, dict):
      raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
    for key in list(state):
      value = state.pop(key)  # drop our reference as we go: pages are released once written
      if hasattr(value, "shape"):
        yield key, torch_to_numpy(value)
  else:
    raise CheckpointError(f"{path}: unknown checkpoint format; expected .safetensors or one of {PICKLE_SUFFIXES}")


def _iter_safetensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
  from safetensors import safe_open
  try:
    handle = safe_open(path, framework="np")
  except Exception as e:
    raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
  with handle as f:
    for key in f.keys():
      try:
        tensor = f.get_tensor(key)
      except Exception as e:
        raise CheckpointError(f"{path}: tensor {key!r} cannot be read (truncated or corrupt?): {e}") from None
      yield key, tensor


def hf_weight_files(directory: str) -> list[str]:
  """The weight shards of a Hugging Face model directory, preferring safetensors.

  With an index json, every shard it names must exist; without one, a single
  `model.safetensors` / `pytorch_model.bin`, or the set of matching shard files, is used.
  """
  if not os.path.isdir(directory):
    raise CheckpointError(f"{directory}: no such directory; expected a Hugging Face model directory")
  for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
    index_path = os.path.join(directory, index_name)
    if os.path.isfile(index_path):
      try:
        with open(index_path) as f:
          weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a valid index (expected a 'weight_map' object): {e}") from None
      shards = sorted(set(weight_map.values()))
      missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
      if missing:
        raise CheckpointError(f"{index_path} names shards that are missing from {directory}: {missing}")
      return [os.path.join(directory, s) for s in shards]
  for pattern in ("model*.safetensors", "pytorch_model*.bin"):
    files = sorted(glob.glob(os.path.join(directory, pattern)))
    if files:
      return files
  raise CheckpointError(f"{directory}: no weights found; expected model*.safetensors or pytorch_model*.bin "
                        "(with their index json when sharded)")


def iter_files(paths: list[str]) -> Iterator[tuple[str, str, np.ndarray]]:
  """(file, key, tensor) over several shards, one tensor at a time."""
  for path in paths:
    for key, tensor in iter_file(path):
      yield path, key, tensor
