"""The embedded default job: build a small random LLaMA, convert it, load it, chat-generate.

  python -m vllama_jax.demo --config configs/demo.py:tiny --config.sampling.greedy=true
"""

import ml_collections

from vllama_jax.errors import ConfigError

SIZES = {
    # hidden, layers, heads, ffn
    "tiny": (64, 2, 4, 172),
    "small": (512, 4, 8, 1376),
}


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  if variant not in SIZES:
    raise ConfigError(f"unknown variant {variant!r}; expected one of {sorted(SIZES)}")
  hidden, layers, heads, ffn = SIZES[variant]
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.workdir = ""  # empty: a temporary directory, removed at the end
  c.llama = ml_collections.ConfigDict(dict(
      vocab_size=384, hidden_size=hidden, intermediate_size=ffn, num_layers=layers, num_heads=heads,
      num_kv_heads=heads, rms_norm_eps=1e-6, max_position_embeddings=2048))
  c.dtype = "float32"
  c.mesh = (-1, 1, 1)
  c.questions = (
      "What is happening in this video?",
      "Describe this image in detail.",
      "What do you hear?",
  )
  c.sampling = ml_collections.ConfigDict(dict(
      max_new_tokens=32, greedy=False, temperature=1.0, top_p=0.9, top_k=0, repetition_penalty=1.0))
  return c
