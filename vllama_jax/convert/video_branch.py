"""Video-LLaMA's vision-language branch from its released files -> the `video_branch` part.

  eva_vit_g.pth            flat state dict (fp16, 40 blocks)       -> visual_encoder        frozen
  blip2_*.pth   ["model"]  ln_vision, Q-Former, query_tokens       -> visual_encoder.ln_vision, qformer
  VL checkpoint ["model"]  video_Qformer, video_query_tokens,      -> video_qformer,        trainable
                           video_frame_position_embedding,            frame_position_embedding,
                           llama_proj                                 llama_proj
  MiniGPT-4 (VL stage 1)   llama_proj                              -> llama_proj            (instead)

Each file is streamed through `tree.fill` with only its own rules, so an error names the file and
every key of it that is unexpected, mis-shaped or missing. Keys dropped on purpose are listed
explicitly below; anything else unknown is an error. Frozen parts are stored in the chosen dtype,
trainable parts in float32. Without a VL checkpoint the trainable parts are initialised exactly as
`VideoBranch.__init__` initialises them, and the config entry lists them under "initialised".
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from flax import nnx

from vllama_jax.convert import parts, readers, tree
from vllama_jax.convert.eva import dropped_blocks, eva_key_map
from vllama_jax.convert.qformer import IGNORED_KEYS as QFORMER_BUFFERS
from vllama_jax.convert.qformer import IMAGE_KEYS, VIDEO_KEYS, qformer_ignored, qformer_key_map
from vllama_jax.errors import CheckpointError, ConfigError
from vllama_jax.models.eva_vit import EvaVitConfig
from vllama_jax.models.qformer import QFormerConfig
from vllama_jax.models.video_branch import VideoBranch, VideoBranchConfig
from vllama_jax.pretrained import save_params
from vllama_jax.sharding import abstract_model

VIDEO_BRANCH = "video_branch"
TRAINABLE = ("video_qformer", "frame_position_embedding", "llama_proj")  # what a VL checkpoint holds
ENTRY_EXTRAS = ("initialised", "sources", "trained_from")  # entry keys beside the VideoBranchConfig fields

# Keys each file may hold that conversion drops on purpose.
EVA_IGNORED = (
    # EVA-CLIP's final norm and classification head: BLIP-2 takes the features before them.
    re.compile(r"norm\.(weight|bias)"),
    re.compile(r"head\.(weight|bias)"),
)
BLIP2_IGNORED = (
    re.compile(r"t5_proj\.(weight|bias)"),  # BLIP-2's projection into FlanT5; Video-LLaMA has llama_proj
    *qformer_ignored(IMAGE_KEYS[0]),  # Qformer.bert.embeddings.position_ids, a buffer
    # The Q-Former's text side, in case a checkpoint still has it: the query path never uses it.
    re.compile(r"Qformer\.cls\..+"),
    re.compile(r"Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\..+"),
    re.compile(r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\..+"),  # text FFN, not *_query
)
VL_IGNORED = (
    # Buffers the training runner saves beside the trainable weights (it drops frozen parameters only).
    *QFORMER_BUFFERS,  # <prefix>bert.embeddings.position_ids of every Q-Former
    re.compile(r"llama_model\.model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),
    re.compile(r"audio_encoder\.modality_preprocessors\.text\.mask"),  # ImageBind
    re.compile(r"audio_encoder\.modality_postprocessors\.\w+\.1\.log_logit_scale"),  # ImageBind
)


# ---- rules per source file ------------------------------------------------------------------------

def _split_ln_vision(cfg: VideoBranchConfig) -> tuple[dict[str, tree.Rule], dict[str, tree.Rule]]:
  """(ViT rules, ln_vision rules), both targeting `visual_encoder`."""
  rules = parts.under("visual_encoder", eva_key_map(cfg.vit))
  ln_vision = {k: r for k, r in rules.items() if k.startswith("ln_vision.")}
  return {k: r for k, r in rules.items() if k not in ln_vision}, ln_vision


def eva_rules(cfg: VideoBranchConfig) -> dict[str, tree.Rule]:
  return _split_ln_vision(cfg)[0]


def blip2_rules(cfg: VideoBranchConfig) -> dict[str, tree.Rule]:
  return _split_ln_vision(cfg)[1] | qformer_key_map(cfg.image_qformer, *IMAGE_KEYS, target=("qformer",))


def llama_proj_rules() -> dict[str, tree.Rule]:
  return {"llama_proj.weight": tree.Rule.to(("llama_proj", "kernel"), None, tree.transpose),
          "llama_proj.bias": tree.Rule.to(("llama_proj", "bias"))}


def vl_rules(cfg: VideoBranchConfig) -> dict[str, tree.Rule]:
  return qformer_key_map(cfg.video_qformer, *VIDEO_KEYS, target=("video_qformer",)) | {
      "video_frame_position_embedding.weight": tree.Rule.to(("frame_position_embedding",)),
  } | llama_proj_rules()


# ---- config ---------------------------------------------------------------------------------------

def llm_hidden_size_of(vl_ckpt_path: str) -> int:
  """The LLM width of a VL checkpoint: the rows of its `llama_proj.weight`."""
  for key, tensor in readers.iter_file(vl_ckpt_path, entry="model"):
    if key == "llama_proj.weight":
      if tensor.ndim != 2:
        raise CheckpointError(f"{vl_ckpt_path}: llama_proj.weight has shape {tuple(tensor.shape)}, "
                              "expected (llm_hidden_size, width)")
      return int(tensor.shape[0])
  raise CheckpointError(f"{vl_ckpt_path}: has no llama_proj.weight to take the LLM width from; "
                        "pass --llama or --llm-hidden")


def conversion_config(cfg: VideoBranchConfig | None, llm_hidden_size: int | None,
                      vl_ckpt_path: str | None, dtype: str) -> VideoBranchConfig:
  """`cfg` (default: the release config) with the LLM width and the dtypes conversion writes."""
  if llm_hidden_size is None and vl_ckpt_path:
    llm_hidden_size = llm_hidden_size_of(vl_ckpt_path)
  if llm_hidden_size is None and cfg is None:
    raise CheckpointError("the video branch needs the LLM width for llama_proj: pass --llama (the LLM "
                          "it feeds), --vl-ckpt (whose llama_proj has it) or --llm-hidden")
  cfg = cfg if cfg is not None else VideoBranchConfig.release(llm_hidden_size)
  return cfg.replace(llm_hidden_size=llm_hidden_size or cfg.llm_hidden_size,
                     vit=cfg.vit.replace(dtype=dtype), image_qformer=cfg.image_qformer.replace(dtype=dtype),
                     video_qformer=cfg.video_qformer.replace(dtype="float32"), dtype="float32")


def video_branch_config_from_entry(entry: dict, **runtime: Any) -> VideoBranchConfig:
  """The VideoBranchConfig a converted directory's `video_branch` entry describes; `runtime`
  overrides top-level fields such as `interpolate_frame_positions`."""
  fields = {k: v for k, v in entry.items() if k not in ENTRY_EXTRAS} | runtime
  try:
    return VideoBranchConfig(vit=EvaVitConfig(**fields.pop("vit")),
                             image_qformer=QFormerConfig(**fields.pop("image_qformer")),
                             video_qformer=QFormerConfig(**fields.pop("video_qformer")), **fields)
  except (KeyError, TypeError) as e:
    raise ConfigError(f"{VIDEO_BRANCH} config entry is invalid ({type(e).__name__}: {e}); convert "
                      "again with convert_weights.py") from None


# ---- conversion -----------------------------------------------------------------------------------

def initial_trainables(cfg: VideoBranchConfig, seed: int) -> dict:
  """The trainable parts of `VideoBranch(cfg, rngs=nnx.Rngs(seed))`, as numpy."""
  return parts.initial_params(lambda rngs: VideoBranch(cfg, rngs=rngs), TRAINABLE, seed)


def convert_video_branch(eva_path: str, blip2_path: str, vl_ckpt_path: str | None, staging: str, *,
                         llm_hidden_size: int | None, dtype: str = "bfloat16", seed: int = 0,
                         cfg: VideoBranchConfig | None = None, minigpt4_path: str | None = None) -> dict:
  """Writes the video-branch part of a converted directory into `staging`; returns its config entry.

  `cfg` replaces the release config (tests use `VideoBranchConfig.tiny()`); its dtypes are set as
  conversion writes them: `dtype` for the frozen ViT and image Q-Former, float32 for the rest.
  `minigpt4_path` (without a VL checkpoint): MiniGPT-4's `llama_proj` as the start of VL stage 1,
  as the reference's `llama_proj_model` option; the other trainables are initialised.
  """
  if vl_ckpt_path and minigpt4_path:
    raise ConfigError("give a VL checkpoint or MiniGPT-4's llama_proj, not both: the VL checkpoint has its own")
  for path in (eva_path, blip2_path) + tuple(p for p in (vl_ckpt_path, minigpt4_path) if p):
    if not os.path.isfile(path):
      raise CheckpointError(f"{path}: no such file")
  cfg = conversion_config(cfg, llm_hidden_size, vl_ckpt_path or minigpt4_path, dtype)
  abstract = nnx.to_pure_dict(abstract_model(lambda: VideoBranch(cfg, rngs=nnx.Rngs(0)))[1])
  out = parts.allocate_like(abstract)  # each parameter in its own dtype
  rule_sets = [eva_rules(cfg), blip2_rules(cfg)]
  parts.fill_file(out, eva_path, None, rule_sets[0], [dropped_blocks(cfg.vit), *EVA_IGNORED])
  parts.fill_file(out, blip2_path, "model", rule_sets[1], BLIP2_IGNORED)
  if vl_ckpt_path:
    rule_sets.append(vl_rules(cfg))
    parts.fill_file(out, vl_ckpt_path, "model", rule_sets[2], VL_IGNORED)
    initialised = []
  else:
    out |= initial_trainables(cfg, seed)
    initialised = list(TRAINABLE)
    if minigpt4_path:
      rule_sets.append(llama_proj_rules())
      parts.fill_file(out, minigpt4_path, "model", rule_sets[-1], ())
      initialised.remove("llama_proj")
  parts.check_coverage(out, rule_sets, initialised)
  save_params(staging, {VIDEO_BRANCH: out})
  sources = {"eva": eva_path, "blip2": blip2_path, "vl_ckpt": vl_ckpt_path}
  if minigpt4_path:
    sources["minigpt4"] = minigpt4_path
  return dataclasses.asdict(cfg) | {
      "initialised": initialised,
      "sources": {name: os.path.basename(p) if p else None for name, p in sources.items()},
  }
