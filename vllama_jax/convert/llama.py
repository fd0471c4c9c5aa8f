"""Hugging Face LlamaForCausalLM state dict -> our `Llama` parameter tree."""

from __future__ import annotations

import re

from flax import nnx

from vllama_jax.config import LlamaConfig
from vllama_jax.convert import readers, tree
from vllama_jax.convert.output import staged_output
from vllama_jax.models.llama import Llama
from vllama_jax.sharding import abstract_model
from vllama_jax.pretrained import LLAMA, copy_tokenizer, save_params, write_config

# Buffers some conversions saved beside the weights; derived from the config, so dropped on purpose.
IGNORED_KEYS = (
    re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),
)

# HF name -> (path in our tree, transform). Layer weights land in row i of the stacked `layers`.
_TOP_LEVEL = {
    "model.embed_tokens.weight": (("embed_tokens",), None),
    "model.norm.weight": (("norm", "weight"), None),
    "lm_head.weight": (("lm_head", "kernel"), tree.transpose),
}
_PER_LAYER = {
    "self_attn.q_proj.weight": (("self_attn", "q_proj", "kernel"), tree.transpose),
    "self_attn.k_proj.weight": (("self_attn", "k_proj", "kernel"), tree.transpose),
    "self_attn.v_proj.weight": (("self_attn", "v_proj", "kernel"), tree.transpose),
    "self_attn.o_proj.weight": (("self_attn", "o_proj", "kernel"), tree.transpose),
    "mlp.gate_proj.weight": (("mlp", "gate_proj", "kernel"), tree.transpose),
    "mlp.up_proj.weight": (("mlp", "up_proj", "kernel"), tree.transpose),
    "mlp.down_proj.weight": (("mlp", "down_proj", "kernel"), tree.transpose),
    "input_layernorm.weight": (("input_layernorm", "weight"), None),
    "post_attention_layernorm.weight": (("post_attention_layernorm", "weight"), None),
}


def llama_key_map(cfg: LlamaConfig, prefix: str = "") -> dict[str, tree.Rule]:
  """Every expected source key -> where it goes in our tree."""
  mapping = {prefix + k: tree.Rule.to(path, None, t) for k, (path, t) in _TOP_LEVEL.items()}
  for i in range(cfg.num_layers):
    for suffix, (path, t) in _PER_LAYER.items():
      mapping[f"{prefix}model.layers.{i}.{suffix}"] = tree.Rule.to(("layers",) + path, i, t)
  return mapping


def convert_llama(src_dir: str, staging: str, dtype: str = "bfloat16") -> tuple[LlamaConfig, dict]:
  """Writes the LLaMA part of a converted directory into `staging`; returns its config and entry."""
  cfg = LlamaConfig.from_hf(src_dir, dtype=dtype)
  files = readers.hf_weight_files(src_dir)
  copy_tokenizer(src_dir, staging)
  out = tree.allocate(abstract_params(cfg), cfg.dtype)
  tree.fill(out, readers.iter_files(files), llama_key_map(cfg), IGNORED_KEYS, source=src_dir)
  save_params(staging, {LLAMA: out})
  return cfg, cfg.to_hf()


def convert_llama_checkpoint(src_dir: str, out_dir: str, dtype: str = "bfloat16") -> LlamaConfig:
  """Converts a Hugging Face LLaMA directory into a converted directory at `out_dir`."""
  with staged_output(out_dir) as staging:
    cfg, entry = convert_llama(src_dir, staging, dtype)
    write_config(staging, {LLAMA: entry})
  return cfg


def abstract_params(cfg: LlamaConfig) -> dict:
  return nnx.to_pure_dict(abstract_model(lambda: Llama(cfg, rngs=nnx.Rngs(0)))[1])
