"""Small random checkpoints in the released formats, for the demo, tests and benchmarks.

No model hub is needed: a SentencePiece tokenizer is trained on a few sentences and LLaMA weights
are drawn at random, then written exactly as Hugging Face lays out a LLaMA directory.
"""

from __future__ import annotations

import json
import os

import numpy as np

from vllama_jax.config import LlamaConfig

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Video LLaMA answers questions about videos and their sound.",
    "###Human: What is happening in this video? ###Assistant: A cat is playing the piano.",
    "Describe this image in detail. There are two people walking on a beach at sunset.",
    "Close your eyes, open your ears and imagine only based on the sound.",
    "[INST] <<SYS>> You are a helpful assistant. <</SYS>> What do you hear? [/INST] Birds singing.",
)


def write_tokenizer(directory: str, vocab_size: int = 384, with_config: bool = True,
                    sentences: list[str] | None = None) -> str:
  """Trains a byte-fallback BPE SentencePiece model with LLaMA's special ids (unk 0, bos 1, eos 2)
  on `sentences` (default: a few built-in ones)."""
  import sentencepiece as spm
  os.makedirs(directory, exist_ok=True)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(list(sentences) if sentences else SENTENCES * 8),
      model_prefix=os.path.join(directory, "tokenizer"),
      vocab_size=vocab_size, model_type="bpe", byte_fallback=True, character_coverage=1.0,
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True, minloglevel=2,
      # the normaliser settings of LLaMA's own tokenizer.model
      normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
      allow_whitespace_only_pieces=True)
  os.remove(os.path.join(directory, "tokenizer.vocab"))
  if with_config:  # what a released LLaMA directory ships beside tokenizer.model
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
      json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                 "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
                 "legacy": True, "model_max_length": 2048}, f)
  return os.path.join(directory, "tokenizer.model")


def random_llama_state(cfg: LlamaConfig, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
  """A Hugging Face LlamaForCausalLM state dict with random weights (PyTorch (out, in) layout)."""
  rng = np.random.default_rng(seed)
  h, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim

  def normal(*shape, std=0.02):
    return (rng.standard_normal(shape, np.float32) * std).astype(dtype)

  def norm_weight():
    return (1.0 + rng.standard_normal(h, np.float32) * 0.1).astype(dtype)

  state = {"model.embed_tokens.weight": normal(cfg.vocab_size, h), "model.norm.weight": norm_weight(),
           "lm_head.weight": normal(cfg.vocab_size, h)}
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    state |= {
        p + "self_attn.q_proj.weight": normal(cfg.num_heads * d, h),
        p + "self_attn.k_proj.weight": normal(cfg.num_kv_heads * d, h),
        p + "self_attn.v_proj.weight": normal(cfg.num_kv_heads * d, h),
        p + "self_attn.o_proj.weight": normal(h, cfg.num_heads * d),
        p + "mlp.gate_proj.weight": normal(f, h),
        p + "mlp.up_proj.weight": normal(f, h),
        p + "mlp.down_proj.weight": normal(h, f),
        p + "input_layernorm.weight": norm_weight(),
        p + "post_attention_layernorm.weight": norm_weight(),
    }
  return state


def write_hf_llama(directory: str, cfg: LlamaConfig, state: dict[str, np.ndarray] | None = None,
                   num_shards: int = 1, seed: int = 0) -> str:
  """Writes config.json and safetensors weights (sharded with an index json when num_shards > 1)."""
  from safetensors.numpy import save_file
  os.makedirs(directory, exist_ok=True)
  state = random_llama_state(cfg, seed) if state is None else state
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(cfg.to_hf() | {"torch_dtype": "float32"}, f, indent=2)
  keys = list(state)
  if num_shards == 1:
    save_file(state, os.path.join(directory, "model.safetensors"))
    return directory
  weight_map = {}
  for s, chunk in enumerate(np.array_split(np.arange(len(keys)), num_shards)):
    name = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
    save_file({keys[i]: state[keys[i]] for i in chunk}, os.path.join(directory, name))
    weight_map |= {keys[i]: name for i in chunk}
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
  return directory


def write_random_video_llama(directory: str, seed: int = 0, hidden_size: int = 64) -> str:
  """A tiny Video-LLaMA with random weights (`VideoLlamaConfig.tiny`: released input sizes, small
  widths) and a freshly trained tokenizer, written as a converted directory."""
  import tempfile

  from flax import nnx

  from vllama_jax.models.video_llama import VideoLLaMA, VideoLlamaConfig
  from vllama_jax.sharding import abstract_model
  from vllama_jax.pretrained import save_video_llama
  from vllama_jax.text.tokenizer import Tokenizer
  with tempfile.TemporaryDirectory() as tokenizer_dir:
    write_tokenizer(tokenizer_dir)
    cfg = VideoLlamaConfig.tiny(vocab_size=Tokenizer(tokenizer_dir).vocab_size, hidden_size=hidden_size)
    cfg = cfg.replace(llama=cfg.llama.replace(scan_layers=True))
    graphdef, state = abstract_model(lambda: VideoLLaMA(cfg, rngs=nnx.Rngs(0)))
    nnx.replace_by_pure_dict(state, _random_leaves(nnx.to_pure_dict(state), np.random.default_rng(seed)))
    save_video_llama(nnx.merge(graphdef, state), directory, tokenizer_dir)
  return directory


def _random_leaves(tree: dict, rng: np.random.Generator, name: str = "", small_kernels: tuple = ()) -> dict:
  """NumPy draws for every leaf of an abstract parameter tree (eager JAX initialisers compile one
  program per shape, which dominates building a tiny model): norm scales near 1, biases near 0,
  Linear / Conv kernels N(0, 1/fan_in) (so a random frozen encoder's attention is not uniform),
  position tables N(0, 1), ImageBind's logit scale log(20), other tables N(0, 0.02); kernels under
  the `small_kernels` path prefixes N(0, 0.02)."""
  out = {}
  for key, value in tree.items():
    path = f"{name}.{key}"
    if isinstance(value, dict):
      out[key] = _random_leaves(value, rng, path, small_kernels)
      continue
    noise = rng.standard_normal(value.shape, np.float32)
    if key in ("scale", "weight"):  # LayerNorm / RMSNorm (Linear weights are "kernel")
      array = 1 + 0.1 * noise
    elif key == "bias":
      array = 0.02 * noise
    elif key == "kernel" and path.lstrip(".").startswith(small_kernels) and small_kernels:
      array = 0.02 * noise
    elif key == "kernel":  # (in, out), stacked (layers, in, out) or a conv (kh, kw, in, out)
      fan_in = int(np.prod(value.shape[:-1])) if len(value.shape) == 4 else value.shape[-2]
      array = noise / np.sqrt(fan_in)
    elif key == "log_logit_scale":  # ImageBind's fixed x20 after the L2 norm
      array = np.full(value.shape, np.log(20.0))
    elif "position" in path or key == "pos_embed":  # as strong as the patch embeddings they join
      array = noise
    else:
      array = 0.02 * noise
    out[key] = array.astype(value.dtype)
  return out
