"""Checkpointer and the workdir's run record: round trips, and clear errors for what cannot be
resumed (a corrupt step, a file where the folder should be, a workdir of another config)."""

import base64
import json
import os
import pickle
import shutil

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vllama_jax.errors import CheckpointError, ConfigError
from vllama_jax.train import checkpoint, workdir

DATA_STATE = {"step": 3, "names": ["webvid"], "loaders": [{"inner": {"next_index": 12}, "counts": {"corrupt": 1}}]}


def _state(scale=1.0):
  return {"params": {"w": jnp.arange(6.0).reshape(2, 3) * scale}, "step": jnp.int32(7)}


def _saved(tmp_path, steps=(5, 10)):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep=3, every=5, asynchronous=False)
  for step in steps:
    assert ckpt.save(step, _state(step), DATA_STATE)
  ckpt.close()
  return checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep=3, every=5)


def test_round_trip_of_the_state_and_the_data_position(tmp_path):
  ckpt = _saved(tmp_path)
  assert ckpt.latest_step == 10
  state, data = ckpt.restore(checkpoint.abstract_like(_state()))
  np.testing.assert_array_equal(state["params"]["w"], np.arange(6.0).reshape(2, 3) * 10)
  assert data == DATA_STATE
  earlier, _ = ckpt.restore(checkpoint.abstract_like(_state()), step=5)
  np.testing.assert_array_equal(earlier["params"]["w"], np.arange(6.0).reshape(2, 3) * 5)
  ckpt.close()


def test_a_data_state_saved_as_a_pickle_by_earlier_versions_still_restores(tmp_path):
  ckpt = _saved(tmp_path, steps=(5,))
  ckpt.close()
  metadata = tmp_path / "checkpoints" / "5" / "data" / "metadata"
  metadata.write_text(json.dumps({"pickles": [base64.b64encode(pickle.dumps(DATA_STATE)).decode()]}))
  _, data = checkpoint.Checkpointer(str(tmp_path / "checkpoints")).restore(checkpoint.abstract_like(_state()))
  assert data == DATA_STATE


def test_a_corrupt_step_names_its_folder_and_the_steps_to_fall_back_to(tmp_path):
  ckpt = _saved(tmp_path)
  ckpt.close()
  shutil.rmtree(tmp_path / "checkpoints" / "10" / "state")
  with pytest.raises(CheckpointError, match=r"checkpoints/10: cannot restore it .*Saved steps besides it: \[5\]"):
    checkpoint.Checkpointer(str(tmp_path / "checkpoints")).restore(checkpoint.abstract_like(_state()))
  with pytest.raises(CheckpointError, match="another config"):  # a different trainable set
    checkpoint.Checkpointer(str(tmp_path / "checkpoints")).restore(
        checkpoint.abstract_like({"params": {"v": jnp.zeros(2)}, "step": jnp.int32(0)}), step=5)


def test_a_file_in_place_of_the_checkpoint_folder_is_refused_at_once(tmp_path):
  (tmp_path / "checkpoints").write_text("")
  with pytest.raises(CheckpointError, match="exists and is not a directory"):
    checkpoint.Checkpointer(str(tmp_path / "checkpoints"))


def _config(**changes):
  c = ml_collections.ConfigDict({"init_dir": "/converted/7b", "steps": 10, "seed": 0,
                                 "optimizer": {"init_lr": 1e-4, "warmup_steps": 100},
                                 "checkpoint": {"every": 5}, "eval": {"every": 0}})
  for key, value in changes.items():
    *parent, leaf = key.split(".")
    (c[parent[0]] if parent else c)[leaf] = value
  return c


def test_a_resumed_run_keeps_its_id_and_must_have_its_config(tmp_path):
  run = workdir.begin(str(tmp_path), _config(), resuming=False)
  assert workdir.begin(str(tmp_path), _config(**{"steps": 20, "checkpoint.every": 2, "eval.every": 5}),
                       resuming=True) == run
  with pytest.raises(ConfigError, match=r"other settings \(optimizer.init_lr: 0.0001 -> 0.001; seed: 0 -> 1\)"):
    workdir.begin(str(tmp_path), _config(**{"optimizer.init_lr": 1e-3, "seed": 1}), resuming=True)
  fresh = workdir.begin(str(tmp_path), _config(seed=1), resuming=False)  # no checkpoint: a new run
  assert fresh != run and workdir.begin(str(tmp_path), _config(seed=1), resuming=True) == fresh
  (tmp_path / workdir.RUN_FILE).write_text("{cut short")
  with pytest.raises(ConfigError, match="run.json: unreadable"):
    workdir.begin(str(tmp_path), _config(), resuming=True)
  os.remove(tmp_path / workdir.RUN_FILE)  # a workdir from before run records: resumes, and records now
  assert workdir.begin(str(tmp_path), _config(), resuming=True) != fresh
