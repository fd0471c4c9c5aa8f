"""Video-LLaMA's audio-language branch from its released files -> the `audio_branch` part.

  imagebind_huge.pth       flat state dict, all six modalities   -> audio_encoder, vision_encoder   frozen
  AL checkpoint ["model"]  audio_Qformer, audio_query_tokens,      -> audio_qformer,                 trainable
                           audio_position_embedding,                 audio_position_embedding,
                           audio_llama_proj                          audio_llama_proj

Each file is streamed through `tree.fill` with only its own rules; keys dropped on purpose are
listed below, anything else unknown is an error naming the file. Without an AL checkpoint the
trainable parts are initialised as `AudioBranch.__init__` initialises them and listed under
"initialised".
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from flax import nnx

from vllama_jax.convert import parts, readers, tree
from vllama_jax.convert.imagebind import ignored_patterns, modality_key_map
from vllama_jax.convert.qformer import AUDIO_KEYS, qformer_key_map
from vllama_jax.convert.qformer import IGNORED_KEYS as QFORMER_BUFFERS
from vllama_jax.errors import CheckpointError, ConfigError
from vllama_jax.models.audio_branch import AudioBranch, AudioBranchConfig
from vllama_jax.models.imagebind import ImageBindConfig
from vllama_jax.models.qformer import QFormerConfig
from vllama_jax.pretrained import save_params
from vllama_jax.sharding import abstract_model

AUDIO_BRANCH = "audio_branch"
TRAINABLE = ("audio_position_embedding", "audio_qformer", "audio_llama_proj")  # what an AL checkpoint holds
ENTRY_EXTRAS = ("initialised", "sources", "trained_from")

AL_IGNORED = (
    # Buffers the training runner saves beside the trainable weights.
    *QFORMER_BUFFERS,  # <prefix>bert.embeddings.position_ids of every Q-Former
    re.compile(r"llama_model\.model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),
    re.compile(r"audio_encoder\.modality_preprocessors\.text\.mask"),
    # ImageBind's logit scales: the one the encoder uses is read from imagebind_huge.pth itself.
    re.compile(r"audio_encoder\.modality_postprocessors\.\w+\.1\.log_logit_scale"),
)


def imagebind_rules(cfg: AudioBranchConfig) -> dict[str, tree.Rule]:
  rules = modality_key_map(cfg.audio, root=("audio_encoder",))
  if cfg.vision is not None:
    rules |= modality_key_map(cfg.vision, root=("vision_encoder",))
  return rules


def imagebind_ignored(cfg: AudioBranchConfig) -> list[re.Pattern]:
  """Modalities Video-LLaMA never runs (and vision, when the branch is built without it)."""
  return ignored_patterns(modalities=("text", "depth", "thermal", "imu") + (("vision",) if cfg.vision is None else ()))


def al_rules(cfg: AudioBranchConfig) -> dict[str, tree.Rule]:
  return qformer_key_map(cfg.qformer, *AUDIO_KEYS, target=("audio_qformer",)) | {
      "audio_position_embedding.weight": tree.Rule.to(("audio_position_embedding",)),
      "audio_llama_proj.weight": tree.Rule.to(("audio_llama_proj", "kernel"), None, tree.transpose),
      "audio_llama_proj.bias": tree.Rule.to(("audio_llama_proj", "bias")),
  }


def llm_hidden_size_of(al_ckpt_path: str) -> int:
  for key, tensor in readers.iter_file(al_ckpt_path, entry="model"):
    if key == "audio_llama_proj.weight" and tensor.ndim == 2:
      return int(tensor.shape[0])
  raise CheckpointError(f"{al_ckpt_path}: has no 2-D audio_llama_proj.weight to take the LLM width from; "
                        "pass --llama or --llm-hidden")


def conversion_config(cfg: AudioBranchConfig | None, llm_hidden_size: int | None, al_ckpt_path: str | None,
                      dtype: str) -> AudioBranchConfig:
  """`cfg` (default: the release config) with the LLM width and the dtypes conversion writes."""
  if llm_hidden_size is None and al_ckpt_path:
    llm_hidden_size = llm_hidden_size_of(al_ckpt_path)
  if llm_hidden_size is None and cfg is None:
    raise CheckpointError("the audio branch needs the LLM width for audio_llama_proj: pass --llama, "
                          "--al-ckpt or --llm-hidden")
  cfg = cfg if cfg is not None else AudioBranchConfig.release(llm_hidden_size)
  return cfg.replace(llm_hidden_size=llm_hidden_size or cfg.llm_hidden_size, audio=cfg.audio.replace(dtype=dtype),
                     vision=cfg.vision.replace(dtype=dtype) if cfg.vision is not None else None,
                     qformer=cfg.qformer.replace(dtype="float32"), dtype="float32")


def audio_branch_config_from_entry(entry: dict, **runtime: Any) -> AudioBranchConfig:
  fields = {k: v for k, v in entry.items() if k not in ENTRY_EXTRAS} | runtime
  try:
    vision = fields.pop("vision")
    return AudioBranchConfig(audio=ImageBindConfig(**fields.pop("audio")),
                             vision=ImageBindConfig(**vision) if vision is not None else None,
                             qformer=QFormerConfig(**fields.pop("qformer")), **fields)
  except (KeyError, TypeError) as e:
    raise ConfigError(f"{AUDIO_BRANCH} config entry is invalid ({type(e).__name__}: {e}); convert "
                      "again with convert_weights.py") from None


def convert_audio_branch(imagebind_path: str, al_ckpt_path: str | None, staging: str, *,
                         llm_hidden_size: int | None, dtype: str = "bfloat16", seed: int = 0,
                         cfg: AudioBranchConfig | None = None) -> dict:
  """Writes the audio-branch part of a converted directory into `staging`; returns its config entry."""
  for path in (imagebind_path,) + ((al_ckpt_path,) if al_ckpt_path else ()):
    if not os.path.isfile(path):
      raise CheckpointError(f"{path}: no such file")
  cfg = conversion_config(cfg, llm_hidden_size, al_ckpt_path, dtype)
  out = parts.allocate_like(nnx.to_pure_dict(abstract_model(lambda: AudioBranch(cfg, rngs=nnx.Rngs(0)))[1]))
  rule_sets = [imagebind_rules(cfg)]
  parts.fill_file(out, imagebind_path, None, rule_sets[0], imagebind_ignored(cfg))
  if al_ckpt_path:
    rule_sets.append(al_rules(cfg))
    parts.fill_file(out, al_ckpt_path, "model", rule_sets[1], AL_IGNORED)
    initialised = []
  else:
    out |= parts.initial_params(lambda rngs: AudioBranch(cfg, rngs=rngs), TRAINABLE, seed)
    initialised = list(TRAINABLE)
  parts.check_coverage(out, rule_sets, initialised)
  save_params(staging, {AUDIO_BRANCH: out})
  sources = {"imagebind": imagebind_path, "al_ckpt": al_ckpt_path}
  return dataclasses.asdict(cfg) | {
      "initialised": initialised,
      "sources": {name: os.path.basename(p) if p else None for name, p in sources.items()},
  }
