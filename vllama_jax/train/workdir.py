"""What a workdir records about the run it holds, so that re-running a command resumes that run and
nothing else: `run.json` holds a run id and the config the run started with.

A resumed run must have the same config, up to the keys in MAY_CHANGE (run length, logging,
evaluation, checkpoint cadence, the launch). A fresh start (no checkpoint) gets a new run id, so
that its export is never taken for an earlier run's.
"""

from __future__ import annotations

import json
import os
import uuid

import ml_collections

from vllama_jax.convert.output import write_atomically
from vllama_jax.errors import ConfigError

RUN_FILE = "run.json"
MAY_CHANGE = ("steps", "log_every", "progress", "eval.", "checkpoint.", "distributed.", "mesh")
_ABSENT = "<absent>"


def flat_config(config) -> dict:
  """{dotted key: JSON value} of an ml_collections config."""
  out = {}

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, dict) and value:
        walk(value, f"{prefix}{key}.")
      else:
        out[f"{prefix}{key}"] = value

  walk(json.loads(json.dumps(config.to_dict(), default=repr)), "")
  return out


def _read(path: str) -> tuple[str, dict]:
  """(run id, flat config) of a run record."""
  try:
    with open(path) as f:
      saved = json.load(f)
    return saved["run"], dict(saved["config"])
  except FileNotFoundError:
    raise ConfigError(f"{path}: no such file; expected the run record that train.py writes in its "
                      "workdir (is this a workdir?)") from None
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ConfigError(f"{path}: unreadable ({e}); expected the run record this workdir's run wrote") from None


def recorded(workdir: str) -> tuple[str, ml_collections.ConfigDict]:
  """(run id, config) of the run `workdir` holds, as its run record has them (tuples come back as
  lists)."""
  run, flat = _read(os.path.join(workdir, RUN_FILE))
  tree: dict = {}
  for key, value in flat.items():
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return run, ml_collections.ConfigDict(tree)


def _may_change(key: str) -> bool:
  return any(key == k or (k.endswith(".") and key.startswith(k)) for k in MAY_CHANGE)


def begin(workdir: str, config, resuming: bool) -> str:
  """The run id (process 0 calls this). Resuming checks the config against the recorded one; a
  fresh start records a new id and the config."""
  path = os.path.join(workdir, RUN_FILE)
  now = flat_config(config)
  if resuming and os.path.isfile(path):
    run, before = _read(path)
    differ = [k for k in sorted(set(before) | set(now))
              if not _may_change(k) and before.get(k, _ABSENT) != now.get(k, _ABSENT)]
    if differ:
      shown = "; ".join(f"{k}: {before.get(k, _ABSENT)!r} -> {now.get(k, _ABSENT)!r}" for k in differ[:8])
      raise ConfigError(
          f"{workdir}: holds a run started with other settings ({shown}{'; ...' if len(differ) > 8 else ''}). "
          f"Resuming it would not continue that run: use a new workdir, or remove {path} to resume "
          "with the new settings anyway")
    return run
  run = uuid.uuid4().hex[:12]
  os.makedirs(workdir, exist_ok=True)
  write_atomically(path, json.dumps({"run": run, "config": now}, indent=1))
  return run
