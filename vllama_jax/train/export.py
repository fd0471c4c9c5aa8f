"""A finished run as a converted directory that `VideoLLaMA.from_pretrained` / `VideoChat` load.

The trained parameters are written anew; every frozen parameter is a symbolic link to the converted
directory the run started from (`copy_frozen=True` copies them instead, for a self-contained
directory). A later stage starts from this directory as it would from a converted one.

The training loop writes each export to its own `workdir/export-step<N>` and points the link
`workdir/export` at the newest, so that no export a later stage links into ever moves.
"""

from __future__ import annotations

import json
import os
import shutil

from flax import nnx

from vllama_jax.convert.output import free_name, staged_output
from vllama_jax.errors import CheckpointError
from vllama_jax.pretrained import CONFIG_FILE, PARAMS_DIR, TOKENIZER_FILES, save_params


def _names(tree: dict, prefix: str = "") -> list[str]:
  out = []
  for key, value in tree.items():
    name = f"{prefix}{key}"
    out += _names(value, name + ".") if isinstance(value, dict) else [name]
  return out


TRAINING_FILE = "training.json"  # {"step", "run": the run id, "init_dir": where it started}


def export_record(directory: str) -> dict:
  """The TRAINING_FILE of an export ({} where there is none, or no export)."""
  try:
    with open(os.path.join(directory, TRAINING_FILE)) as f:
      record = json.load(f)
    return record if isinstance(record, dict) else {}
  except (OSError, ValueError):
    return {}


def exported_step(directory: str) -> int | None:
  """The step an export was written at (None: no export there, or one without the record)."""
  step = export_record(directory).get("step")
  return int(step) if isinstance(step, int) else None


def set_aside(directory: str) -> str | None:
  """Renames a non-empty `directory` to `<directory>-step<N>` (`-previous` without a recorded step;
  numbered if taken), so that a new export does not overwrite it. Returns the new name."""
  if not (os.path.isdir(directory) and os.listdir(directory)):
    return None
  step = exported_step(directory)
  target = free_name(f"{directory}-step{step}" if step is not None else f"{directory}-previous")
  os.rename(directory, target)
  return target


def point_link(link: str, target: str) -> None:
  """Makes `link` a relative symbolic link to `target`, replaced atomically (never absent)."""
  staging = free_name(f"{link}.linking")
  os.symlink(os.path.relpath(target, os.path.dirname(os.path.abspath(link))), staging)
  os.replace(staging, link)


def export_trained(init_dir: str, params: nnx.State, directory: str, *, step: int | None = None,
                   run: str | None = None, copy_frozen: bool = False) -> None:
  """Writes `init_dir` with the parameters in `params` (a trainable split) replaced; `step` and
  the `run` id are recorded in TRAINING_FILE."""
  init_dir = os.path.abspath(init_dir)
  source = os.path.join(init_dir, PARAMS_DIR)
  if not os.path.isdir(source):
    raise CheckpointError(f"{source}: no such directory; the run's start directory is gone")
  tree = nnx.to_pure_dict(params)
  trained = set(_names(tree))
  missing = sorted(trained - set(os.listdir(source)))
  if missing:
    raise CheckpointError(f"{init_dir}: has no parameters {missing[:5]}...; was the run started from it?")
  with open(os.path.join(init_dir, CONFIG_FILE)) as f:
    config = json.load(f)
  parts = {name.split(".", 1)[0] for name in trained}
  for part in parts:
    if isinstance(config.get(part), dict):
      config[part]["initialised"] = []
      config[part]["trained_from"] = init_dir
  with staged_output(directory) as staging:
    for name in TOKENIZER_FILES:
      if os.path.isfile(os.path.join(init_dir, name)):
        shutil.copy2(os.path.join(init_dir, name), staging)
    with open(os.path.join(staging, CONFIG_FILE), "w") as f:
      json.dump(config, f, indent=2)
    save_params(staging, tree)
    if step is not None:
      with open(os.path.join(staging, TRAINING_FILE), "w") as f:
        json.dump({"step": int(step), "run": run, "init_dir": init_dir}, f)
    for name in sorted(set(os.listdir(source)) - trained):
      src, dst = os.path.join(source, name), os.path.join(staging, PARAMS_DIR, name)
      if copy_frozen:
        shutil.copytree(src, dst)
      else:
        os.symlink(os.path.realpath(src), dst)
