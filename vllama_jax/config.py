"""Model hyperparameters as frozen dataclasses, with presets for the released LLMs.

Architecture fields mirror Hugging Face's `LlamaConfig`; `from_hf` reads them from a `config.json`
so that values such as `rms_norm_eps` always come from the checkpoint, never from a default here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from vllama_jax.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  rms_norm_eps: float
  max_position_embeddings: int = 2048
  rope_theta: float = 10000.0
  bos_token_id: int = 1
  eos_token_id: int = 2
  pad_token_id: int = 0
  # Runtime choices, not architecture: weight/compute dtype, rematerialisation of each layer, and
  # whether layers are stacked and run with lax.scan (fast compiles, training) or kept as a list
  # (no per-step weight slicing in the decode loop: faster generation on CPU).
  dtype: str = "bfloat16"
  remat: bool = False
  scan_layers: bool = True

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
    if self.dtype not in DTYPES:
      raise ConfigError(f"dtype {self.dtype!r} is not one of {DTYPES}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def replace(self, **changes: Any) -> "LlamaConfig":
    return dataclasses.replace(self, **changes)

  # ---- Hugging Face config.json ----------------------------------------------------------------

  @classmethod
  def from_hf(cls, path_or_dict: str | os.PathLike | dict, **runtime: Any) -> "LlamaConfig":
    """Builds a config from an HF `config.json` (a path to the file or its directory, or a dict)."""
    source = "config dict"
    if isinstance(path_or_dict, dict):
      hf = path_or_dict
    else:
      path = os.fspath(path_or_dict)
      if os.path.isdir(path):
        path = os.path.join(path, "config.json")
      source = path
      if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such file; expected a Hugging Face LLaMA config.json")
      try:
        with open(path) as f:
          hf = json.load(f)
      except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None

    def need(key):
      if key not in hf:
        raise ConfigError(f"{source}: missing key {key!r}, which a LLaMA config must have")
      return hf[key]

    _reject_unsupported_architecture(hf, source)
    rope_theta = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    num_heads = need("num_attention_heads")
    return cls(
        vocab_size=need("vocab_size"),
        hidden_size=need("hidden_size"),
        intermediate_size=need("intermediate_size"),
        num_layers=need("num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        rms_norm_eps=need("rms_norm_eps"),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope_theta),
        bos_token_id=_first_id(hf.get("bos_token_id"), 1),
        eos_token_id=_first_id(hf.get("eos_token_id"), 2),
        pad_token_id=_first_id(hf.get("pad_token_id"), 0),
        **runtime,
    )

  def to_hf(self) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "rms_norm_eps": self.rms_norm_eps,
        "max_position_embeddings": self.max_position_embeddings,
        "rope_theta": self.rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": self.eos_token_id,
        "pad_token_id": self.pad_token_id,
        "torch_dtype": self.dtype,
    }


# Variants our decoder does not implement. Reading them would load without error and then give
# wrong logits, so each is refused by name.
_UNSUPPORTED = (
    ("hidden_act", lambda v: v not in (None, "silu"), "only 'silu'"),
    ("tie_word_embeddings", bool, "an untied lm_head"),
    ("attention_bias", bool, "no attention biases"),
    ("mlp_bias", bool, "no MLP biases"),
    ("rope_scaling", lambda v: v not in (None, {}), "no rope_scaling"),
    ("rope_parameters", lambda v: (v or {}).get("rope_type", "default") != "default",
     "rope_type 'default'"),
)


def _reject_unsupported_architecture(hf: dict, source: str) -> None:
  for key, unsupported, expected in _UNSUPPORTED:
    if unsupported(hf.get(key)):
      raise ConfigError(f"{source}: {key}={hf[key]!r} is not supported; expected {expected}")
  head_dim = hf.get("head_dim")
  if head_dim is not None and "hidden_size" in hf and "num_attention_heads" in hf:
    if head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
      raise ConfigError(f"{source}: head_dim={head_dim} is not supported; expected hidden_size / "
                        f"num_attention_heads = {hf['hidden_size'] // hf['num_attention_heads']}")


def _first_id(value, default: int) -> int:
  if value is None:
    return default
  return int(value[0] if isinstance(value, (list, tuple)) else value)


def _llama(hidden, layers, ffn, vocab, eps, max_pos=2048) -> LlamaConfig:
  heads = hidden // 128
  return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_layers=layers,
                     num_heads=heads, num_kv_heads=heads, rms_norm_eps=eps,
                     max_position_embeddings=max_pos)


# Vicuna v0 was built by FastChat's apply_delta, which added a `[PAD]` row: vocab 32001.
# LLaMA-2 chat: Meta's final config says eps 1e-5, early conversions (shipped with Video-LLaMA-2)
# say 1e-6 — always prefer `from_hf` on the actual directory.
LLAMA_PRESETS: dict[str, LlamaConfig] = {
    "llama-7b": _llama(4096, 32, 11008, 32000, 1e-6),
    "llama-13b": _llama(5120, 40, 13824, 32000, 1e-6),
    "vicuna-v0-7b": _llama(4096, 32, 11008, 32001, 1e-6),
    "vicuna-v0-13b": _llama(5120, 40, 13824, 32001, 1e-6),
    "llama-2-7b-chat": _llama(4096, 32, 11008, 32000, 1e-5, 4096),
    "llama-2-13b-chat": _llama(5120, 40, 13824, 32000, 1e-5, 4096),
    "tiny": LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=172, num_layers=2,
                        num_heads=4, num_kv_heads=4, rms_norm_eps=1e-6, max_position_embeddings=512,
                        dtype="float32"),
    "tiny-gqa": LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=172, num_layers=2,
                            num_heads=4, num_kv_heads=2, rms_norm_eps=1e-5, max_position_embeddings=512,
                            dtype="float32"),
}


def llama_preset(name: str, **changes: Any) -> LlamaConfig:
  if name not in LLAMA_PRESETS:
    raise ConfigError(f"unknown LLaMA preset {name!r}; expected one of {sorted(LLAMA_PRESETS)}")
  return LLAMA_PRESETS[name].replace(**changes)
