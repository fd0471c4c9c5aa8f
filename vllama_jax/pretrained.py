"""Converted model directories: orbax params + config.json + tokenizer files.

  config.json        {"llama": <HF-style LLaMA config>, "video_branch": {...}, ...}, one entry per part
  params/<part>.<path.to.param>/   one orbax checkpoint per parameter
  tokenizer.model    (and whichever other tokenizer files the LLaMA directory had)

A directory written on one machine loads onto any mesh: the restore target carries the shardings
that `sharding.LOGICAL_RULES` gives each parameter on the mesh at hand.
"""

from __future__ import annotations

import dataclasses
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
LLAMA = "llama"
CHAT = "chat"  # config.json entry with the chat template
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


def save_params(directory: str, tree: dict) -> None:
  """Writes a nested dict of arrays under `directory/params`, one orbax checkpoint per parameter.

  Orbax copies what it writes; saving parameter by parameter, and dropping each from `tree` once
  written, bounds that copy to one parameter instead of the whole model.

  The calling process writes alone, with no barrier across processes (a multi-host run's export
  calls this on process 0 only, with host copies of the parameters).
  """
  root = os.path.abspath(os.path.join(directory, PARAMS_DIR))
  os.makedirs(root, exist_ok=True)
  alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                             active_processes={jax.process_index()})
  checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler(multiprocessing_options=alone),
                                  multiprocessing_options=alone)
  for name, parent, key in _leaves(tree):
    checkpointer.save(os.path.join(root, name), args=ocp.args.StandardSave({"value": parent.pop(key)}))
  checkpointer.close()


def _leaves(tree: dict, prefix: str = ""):
  """(dotted name, parent dict, key) of every array in a nested dict, parents listed before popping."""
  for key in list(tree):
    value = tree[key]
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      yield from _leaves(value, name + ".")
    else:
      yield name, tree, key


def restore_state(directory: str, part: str, abstract_state: nnx.State, mesh: jax.sharding.Mesh) -> nnx.State:
  """Restores the parameters of `part` into the structure of `abstract_state`, sharded over `mesh`."""
  root = os.path.abspath(os.path.join(directory, PARAMS_DIR))
  if not os.path.isdir(root):
    raise CheckpointError(f"{root}: no such directory; expected the converted parameters written by "
                          "convert_weights.py")
  target = sharding.abstract_with_shardings(abstract_state, mesh)
  checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
  try:
    for name, parent, key in list(_leaves(target, part + ".")):
      path = os.path.join(root, name)
      if not os.path.isdir(path):
        raise CheckpointError(f"{path}: missing; the converted directory has no parameter {name!r}")
      expected = parent[key]
      try:
        array = checkpointer.restore(path, args=ocp.args.StandardRestore({"value": expected}))["value"]
      except Exception as e:
        raise CheckpointError(f"{path}: cannot restore parameter {name!r} ({type(e).__name__}: {e})") from None
      if array.shape != expected.shape:
        raise CheckpointError(f"{path}: parameter {name!r} has shape {array.shape}, the config expects "
                              f"{expected.shape}")
      parent[key] = array
  finally:
    checkpointer.close()
  nnx.replace_by_pure_dict(abstract_state, target)
  return abstract_state


def read_config(directory: str, part: str) -> dict:
  """The config entry of one part (e.g. "llama") of a converted directory."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file; expected a directory written by convert_weights.py")
  with open(path) as f:
    config = json.load(f)
  if part not in config:
    raise CheckpointError(f"{path}: has no {part!r} part (it has {sorted(config)}); convert it with "
                          "convert_weights.py")
  return config[part]


def read_chat_entry(directory: str) -> dict:
  """The "chat" entry convert_weights.py records (the template); {} when there is none."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file; expected a directory written by convert_weights.py")
  with open(path) as f:
    return json.load(f).get(CHAT, {})


def write_config(directory: str, parts: dict[str, dict]) -> None:
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(parts, f, indent=2)


def load_llama(directory: str, mesh: jax.sharding.Mesh | None = None, **runtime) -> Llama:
  """Loads a converted LLaMA directory; `runtime` overrides config fields such as `remat`."""
  hf = read_config(directory, LLAMA)
  runtime.setdefault("dtype", hf.get("torch_dtype", "bfloat16"))
  cfg = LlamaConfig.from_hf(hf, **runtime)
  mesh = mesh if mesh is not None else sharding.make_mesh((-1, 1, 1), jax.devices()[:1])
  stacked_cfg = cfg.replace(scan_layers=True)  # the on-disk layout
  graphdef, abstract_state = sharding.abstract_model(lambda: Llama(stacked_cfg, rngs=nnx.Rngs(0)))
  model = nnx.merge(graphdef, restore_state(directory, LLAMA, abstract_state, mesh))
  return model if cfg.scan_layers else unstack_layers(model, mesh)


def unstack_layers(model: Llama, mesh: jax.sharding.Mesh) -> Llama:
  """The same model with its stacked layers split into a list (`scan_layers=False`)."""
  cfg = model.config.replace(scan_layers=False)
  graphdef, state = sharding.abstract_model(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  targets = nnx.to_pure_dict(sharding.state_shardings(state, mesh))
  pure = nnx.to_pure_dict(nnx.state(model))
  stacked = pure.pop("layers")
  pure["layers"] = {i: jax.tree.map(lambda x, s: jax.device_put(x[i], s), stacked, targets["layers"][i])
                    for i in range(cfg.num_layers)}
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def _load_part(directory: str, part: str, build, mesh: jax.sharding.Mesh | None):
  """The module `build()` returns, holding the parameters of `part` restored onto `mesh`."""
  mesh = mesh if mesh is not None else sharding.make_mesh((-1, 1, 1), jax.devices()[:1])
  graphdef, abstract_state = sharding.abstract_model(build)
  return nnx.merge(graphdef, restore_state(directory, part, abstract_state, mesh))


def load_video_branch(directory: str, mesh: jax.sharding.Mesh | None = None, **runtime):
  """Loads the converted video branch (a `VideoBranch`); `runtime` overrides top-level config fields
  such as `interpolate_frame_positions`."""
  from vllama_jax.convert.video_branch import VIDEO_BRANCH, video_branch_config_from_entry
  from vllama_jax.models.video_branch import VideoBranch
  cfg = video_branch_config_from_entry(read_config(directory, VIDEO_BRANCH), **runtime)
  return _load_part(directory, VIDEO_BRANCH, lambda: VideoBranch(cfg, rngs=nnx.Rngs(0)), mesh)


def load_audio_branch(directory: str, mesh: jax.sharding.Mesh | None = None, **runtime):
  """Loads the converted audio branch (an `AudioBranch`); `runtime` overrides top-level config fields
  such as `train_on`."""
  from vllama_jax.convert.audio_branch import AUDIO_BRANCH, audio_branch_config_from_entry
  from vllama_jax.models.audio_branch import AudioBranch
  cfg = audio_branch_config_from_entry(read_config(directory, AUDIO_BRANCH), **runtime)
  return _load_part(directory, AUDIO_BRANCH, lambda: AudioBranch(cfg, rngs=nnx.Rngs(0)), mesh)


def abstract_video_llama(directory: str, **options) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, state of ShapeDtypeStructs) of the `VideoLLaMA` that `load_video_llama` builds from
  the config of a converted directory (scanned LLaMA layers), reading no parameter."""
  from vllama_jax.models.video_llama import VideoLLaMA
  cfg = video_llama_config(directory, **options)
  return sharding.abstract_model(lambda: VideoLLaMA(cfg, rngs=nnx.Rngs(0)))


def video_llama_config(directory: str, *, audio: bool = True, vision_tower: bool = False,
                       video_options: dict | None = None, **llama_runtime):
  """The `VideoLlamaConfig` of a converted directory's parts (scanned LLaMA layers); see `load_video_llama`."""
  from vllama_jax.convert.audio_branch import AUDIO_BRANCH, audio_branch_config_from_entry
  from vllama_jax.convert.video_branch import VIDEO_BRANCH, video_branch_config_from_entry
  from vllama_jax.models.video_llama import VideoLlamaConfig
  hf = read_config(directory, LLAMA)
  with open(os.path.join(directory, CONFIG_FILE)) as f:
    present = set(json.load(f))
  llama_runtime.setdefault("dtype", hf.get("torch_dtype", "bfloat16"))
  llama_cfg = LlamaConfig.from_hf(hf, **llama_runtime)
  video = (video_branch_config_from_entry(read_config(directory, VIDEO_BRANCH), **(video_options or {}))
           if VIDEO_BRANCH in present else None)
  audio_cfg = None
  if audio and AUDIO_BRANCH in present:
    entry = read_config(directory, AUDIO_BRANCH)
    keep = {} if vision_tower else {"vision": None, "train_on": "audio"}
    audio_cfg = audio_branch_config_from_entry(entry, **keep)
  if video is None and audio_cfg is None:
    raise CheckpointError(f"{directory}: has neither a video nor an audio branch; convert one with "
                          "convert_weights.py (--eva --blip2 and/or --imagebind)")
  return VideoLlamaConfig(llama=llama_cfg.replace(scan_layers=True), video=video, audio=audio_cfg)


def load_video_llama(directory: str, mesh: jax.sharding.Mesh | None = None, *, audio: bool = True,
                     vision_tower: bool = False, scan_layers: bool = False, video_options: dict | None = None,
                     **llama_runtime):
  """Loads every part a converted directory has into one `VideoLLaMA` on `mesh`.

  The audio branch is loaded for inference unless `vision_tower`: ImageBind's vision tower, which only
  the paper's training recipe uses, stays on disk. `audio=False` skips the audio branch altogether.
  `scan_layers=False` (the default) gives the per-layer LLaMA that decodes fastest; `video_options`
  overrides VideoBranchConfig fields (e.g. `use_frame_positions`), `llama_runtime` LLaMA config fields
  such as `dtype` or `remat`.
  """
  from vllama_jax.convert.audio_branch import AUDIO_BRANCH
  from vllama_jax.convert.video_branch import VIDEO_BRANCH
  graphdef, state = abstract_video_llama(directory, audio=audio, vision_tower=vision_tower,
                                         video_options=video_options, **llama_runtime)
  mesh = mesh if mesh is not None else sharding.make_mesh((-1, 1, 1), jax.devices()[:1])
  for part in (LLAMA, VIDEO_BRANCH, AUDIO_BRANCH):
    if part in state:
      restore_state(directory, part, state[part], mesh)
  model = nnx.merge(graphdef, state)
  if not scan_layers:
    model.llama = unstack_layers(model.llama, mesh)
    model.config = model.config.replace(llama=model.llama.config)
  return model


def save_video_llama(model, directory: str, tokenizer_dir: str, template: str = "vicuna") -> None:
  """Writes `model` (a `VideoLLaMA`) as a converted directory that `load_video_llama` reads back,
  with the tokenizer files of `tokenizer_dir` and its chat template. `directory` must not exist or
  be empty."""
  from vllama_jax.convert.audio_branch import AUDIO_BRANCH
  from vllama_jax.convert.output import staged_output
  from vllama_jax.convert.video_branch import VIDEO_BRANCH
  cfg = model.config
  llama_params = nnx.to_pure_dict(nnx.state(model.llama))
  if not cfg.llama.scan_layers:  # the on-disk layout stacks the layers
    layers = [llama_params["layers"][i] for i in range(cfg.llama.num_layers)]
    llama_params["layers"] = jax.tree.map(lambda *xs: jax.numpy.stack(xs), *layers)
  entries = {LLAMA: cfg.llama.replace(scan_layers=True).to_hf()}
  tree = {LLAMA: llama_params}
  for part, branch, branch_cfg in ((VIDEO_BRANCH, model.video_branch, cfg.video),
                                   (AUDIO_BRANCH, model.audio_branch, cfg.audio)):
    if branch is not None:
      entries[part] = dataclasses.asdict(branch_cfg) | {"initialised": [], "sources": {}}
      tree[part] = nnx.to_pure_dict(nnx.state(branch))
  with staged_output(directory) as staging:
    copy_tokenizer(tokenizer_dir, staging)
    save_params(staging, tree)
    write_config(staging, entries | {CHAT: {"template": template}})
