"""A finished run as a converted directory that `VideoLLaMA.from_pretrained` / `VideoChat` load.

The trained parameters are written anew; every frozen parameter is a symbolic link to the converted
directory the run started from (`copy_frozen=True` copies them instead, for a self-contained
directory). A later stage starts from this directory as it would from a converted one.

In a workdir, each export has its own folder `workdir/export-step<N>` and the link `workdir/export`
points at the run's latest, so that no export a later stage links into ever moves.
"""

from __future__ import annotations

import glob
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


EXPORT_LINK = "export"


def _exports_of(workdir: str, step: int, run: str) -> list[str]:
  """The folders `export-step<step>[.k]` of `workdir` that hold `run`'s model of `step` (the record
  tells `export-step6` from `export-step60`)."""
  records = {path: export_record(path) for path in glob.glob(os.path.join(workdir, f"export-step{step}*"))}
  return sorted(path for path, r in records.items() if (r.get("step"), r.get("run")) == (step, run))


def export_in_workdir(init_dir: str, params: nnx.State, workdir: str, step: int, run: str, log=print) -> str:
  """Writes `workdir/export-step<N>` (`.1`, `.2`, ... where taken) unless one already holds `run`'s
  model of `step`, and points `workdir/export` at it unless that link holds a later step of the same
  run. Returns the export's folder."""
  link = os.path.join(workdir, EXPORT_LINK)
  held = _exports_of(workdir, step, run)
  if held:
    target = held[0]
    log(f"{target} already holds the model of step {step}")
  else:
    for stale in glob.glob(os.path.join(workdir, ".converting-*")):  # an export killed while writing
      shutil.rmtree(stale, ignore_errors=True)
    target = free_name(os.path.join(workdir, f"export-step{step}"))
    export_trained(init_dir, params, target, step=step, run=run)
    log(f"exported the trained model of step {step} to {target}")
  if os.path.isdir(link) and not os.path.islink(link):  # an export from before exports had their own folders
    log(f"moved the earlier export to {set_aside(link)}")
  current = export_record(link)
  if not (current.get("run") == run and isinstance(current.get("step"), int) and current["step"] > step):
    point_link(link, target)
    log(f"{link} links to {os.path.basename(target)}")
  return target
