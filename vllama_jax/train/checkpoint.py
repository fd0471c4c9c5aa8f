"""Resumable training checkpoints with orbax: the train state (trainable params, optimizer state,
step, rng) and the data iterators' state, saved together every N steps, on request (SIGTERM) and at
the end; the last K kept; written asynchronously, from every process of a multi-host run.

Frozen weights are not saved: they come from the converted directory the run started from.
"""

from __future__ import annotations

import base64
import json
import os
import pickle

import jax
import numpy as np
import orbax.checkpoint as ocp

from vllama_jax.errors import CheckpointError


def all_processes(blob: bytes) -> list[bytes]:
  """Every process's `blob`, in process order (a collective: all processes must call it)."""
  if jax.process_count() == 1:
    return [blob]
  from jax.experimental import multihost_utils
  lengths = np.asarray(multihost_utils.process_allgather(np.int32(len(blob)))).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:len(blob)] = np.frombuffer(blob, np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(padded))
  return [bytes(row[:n]) for row, n in zip(rows, lengths)]


def _encode_data_state(state) -> dict:
  """Each process's iterator state (its own data shard) as JSON text: orbax's JSON item is written
  by process 0 alone, so it carries all of them. Grain's iterator states are JSON by design."""
  return {"states": [b.decode() for b in all_processes(json.dumps(state).encode())]}


def _decode_data_state(saved: dict, where: str):
  if "pickles" in saved:  # written before 2026-12-03; a checkpoint of one's own, so unpickling is safe
    states = [pickle.loads(base64.b64decode(b)) for b in saved["pickles"]]
  else:
    states = [json.loads(s) for s in saved.get("states", [])]
  if len(states) != jax.process_count():
    raise CheckpointError(f"{where}: holds the data state of {len(states)} processes; this run has "
                          f"{jax.process_count()} (resume with the same number of processes)")
  return states[jax.process_index()]


class Checkpointer:
  """`save(step, state, data_state)`, `restore(abstract_state)` -> (state, data_state) of the latest."""

  def __init__(self, directory: str, *, keep: int = 3, every: int = 1000, asynchronous: bool = True):
    self.directory = os.path.abspath(directory)
    if os.path.exists(self.directory) and not os.path.isdir(self.directory):
      raise CheckpointError(f"{self.directory}: exists and is not a directory; expected orbax checkpoints "
                            "(one folder per saved step)")
    self.every = every
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=asynchronous)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  @property
  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def due(self, step: int) -> bool:
    return bool(self.every) and step % self.every == 0

  def save(self, step: int, state, data_state, *, force: bool = False) -> bool:
    """Saves when `step` is due (or `force`) and not saved yet; returns whether it did."""
    if step == self.latest_step or not (force or self.due(step)):
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(_encode_data_state(data_state)))
    return self.manager.save(step, args=args, force=True)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore(self, abstract_state, step: int | None = None, *, with_data: bool = True):
    """(state, data_state) at `step` (default: the latest); `abstract_state` gives structure,
    dtypes and shardings (jax.ShapeDtypeStruct leaves with concrete shardings). `with_data=False`
    leaves the data iterators' state on disk (data_state None): any number of processes can then
    restore it, e.g. one host a checkpoint that a pod wrote."""
    step = self.latest_step if step is None else step
    if step is None:
      raise CheckpointError(f"{self.directory}: no checkpoint to restore")
    where = os.path.join(self.directory, str(step))
    if step not in self.steps():
      raise CheckpointError(f"{where}: no such checkpoint; saved steps: {self.steps() or 'none'}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if with_data:
      items["data"] = ocp.args.JsonRestore()
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
      return restored["state"], _decode_data_state(restored["data"], where) if with_data else None
    except CheckpointError:
      raise
    except Exception as e:
      others = [s for s in self.steps() if s != step]
      raise CheckpointError(
          f"{where}: cannot restore it ({type(e).__name__}: {str(e)[:300]}). It is incomplete or corrupt, "
          f"or was written by another config (different trainable set or shapes). Saved steps besides it: "
          f"{others or 'none'}; move this step's folder out of {self.directory} to resume from the one "
          "before, or start a new workdir") from None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree):
  """ShapeDtypeStructs with the shardings of the arrays of `tree` (a restore target)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
