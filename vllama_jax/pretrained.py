"""Converted model directories: orbax params + config.json + tokenizer files.

A directory written on one machine loads onto any mesh: the restore target carries the shardings
that `sharding.LOGICAL_RULES` gives each parameter on the mesh at hand.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import orbax.checkpoint as ocp
from flax import nnx

from vllama_jax import sharding
from vllama_jax.config import LlamaConfig
from vllama_jax.errors import CheckpointError
from vllama_jax.models.llama import Llama

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")


def copy_tokenizer(src_dir: str, dst_dir: str) -> list[str]:
  present = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(src_dir, f))]
  if not {"tokenizer.model", "tokenizer.json"} & set(present):
    raise CheckpointError(f"{src_dir}: no tokenizer found; expected tokenizer.model (SentencePiece) "
                          "or tokenizer.json beside the weights")
  for name in present:
    shutil.copy2(os.path.join(src_dir, name), os.path.join(dst_dir, name))
  return present


def save_params(directory: str, tree) -> None:
  """Writes a pytree of numpy/jax arrays with orbax under `directory/params`."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(os.path.join(directory, PARAMS_DIR)), tree)
  checkpointer.wait_until_finished()
  checkpointer.close()


def restore_state(directory: str, abstract_state: nnx.State, mesh: jax.sharding.Mesh) -> nnx.State:
  """Restores `directory/params` into the structure of `abstract_state`, sharded over `mesh`."""
  path = os.path.abspath(os.path.join(directory, PARAMS_DIR))
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: no such directory; expected the converted parameters written by "
                          "convert_weights.py")
  target = sharding.abstract_with_shardings(abstract_state, mesh)
  checkpointer = ocp.StandardCheckpointer()
  try:
    restored = checkpointer.restore(path, target)
  except Exception as e:
    raise CheckpointError(f"{path}: cannot restore parameters ({type(e).__name__}: {e})") from None
  finally:
    checkpointer.close()
  nnx.replace_by_pure_dict(abstract_state, restored)
  return abstract_state


def read_config(directory: str) -> dict:
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file; expected a directory written by convert_weights.py")
  with open(path) as f:
    return json.load(f)


def load_llama(directory: str, mesh: jax.sharding.Mesh | None = None, **runtime) -> Llama:
  """Loads a converted LLaMA directory; `runtime` overrides config fields such as `remat`."""
  hf = read_config(directory)
  runtime.setdefault("dtype", hf.get("torch_dtype", "bfloat16"))
  cfg = LlamaConfig.from_hf(hf, **runtime)
  mesh = mesh if mesh is not None else sharding.make_mesh((-1, 1, 1), jax.devices()[:1])
  graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, restore_state(directory, abstract_state, mesh))
