"""LAVIS / Video-LLaMA Q-Former state dict -> our `QFormer` parameter tree.

A Video-LLaMA checkpoint holds up to three Q-Formers, each a BERT under its own prefix with its
query tokens at the top level:

  image:  `Qformer.bert.…`        + `query_tokens`        (BLIP-2, frozen)
  video:  `video_Qformer.bert.…`  + `video_query_tokens`
  audio:  `audio_Qformer.bert.…`  + `audio_query_tokens`

LAVIS strips the text parts (word/position embeddings, the text feed-forward, the LM head) before
saving, so only the query path remains; `embeddings.position_ids` is a buffer left behind and is
ignored on purpose.
"""

from __future__ import annotations

import re
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vllama_jax.convert import tree
from vllama_jax.models.qformer import QFormer, QFormerConfig
from vllama_jax.sharding import abstract_model

# (module prefix, query-token key) of each Q-Former in a Video-LLaMA / BLIP-2 checkpoint.
IMAGE_KEYS = ("Qformer.", "query_tokens")
VIDEO_KEYS = ("video_Qformer.", "video_query_tokens")
AUDIO_KEYS = ("audio_Qformer.", "audio_query_tokens")

# Source keys under `bert.` that are dropped on purpose (a derived buffer, not a weight).
_IGNORED_SUFFIXES = (r"bert\.embeddings\.position_ids",)

# LAVIS name inside one attention block (`attention.` or `crossattention.`) -> (our path, transform).
_ATTENTION = {
    "self.query.weight": (("query", "kernel"), tree.transpose),
    "self.query.bias": (("query", "bias"), None),
    "self.key.weight": (("key", "kernel"), tree.transpose),
    "self.key.bias": (("key", "bias"), None),
    "self.value.weight": (("value", "kernel"), tree.transpose),
    "self.value.bias": (("value", "bias"), None),
    "output.dense.weight": (("output", "kernel"), tree.transpose),
    "output.dense.bias": (("output", "bias"), None),
    "output.LayerNorm.weight": (("norm", "scale"), None),
    "output.LayerNorm.bias": (("norm", "bias"), None),
}
_FEED_FORWARD = {
    "intermediate_query.dense.weight": (("intermediate", "kernel"), tree.transpose),
    "intermediate_query.dense.bias": (("intermediate", "bias"), None),
    "output_query.dense.weight": (("output", "kernel"), tree.transpose),
    "output_query.dense.bias": (("output", "bias"), None),
    "output_query.LayerNorm.weight": (("output_norm", "scale"), None),
    "output_query.LayerNorm.bias": (("output_norm", "bias"), None),
}


def qformer_key_map(cfg: QFormerConfig, prefix: str = IMAGE_KEYS[0], query_key: str = IMAGE_KEYS[1],
                    target: tuple = ()) -> dict[str, tree.Rule]:
  """Every expected LAVIS key -> where it goes in our tree; `target` prefixes our paths
  (e.g. `("video_qformer",)` when the Q-Former sits inside a larger model)."""
  bert = prefix + "bert."
  mapping = {
      query_key: tree.Rule.to(target + ("query_tokens",)),
      bert + "embeddings.LayerNorm.weight": tree.Rule.to(target + ("embed_norm", "scale")),
      bert + "embeddings.LayerNorm.bias": tree.Rule.to(target + ("embed_norm", "bias")),
  }
  for i in range(cfg.num_layers):
    layer = f"{bert}encoder.layer.{i}."
    ours = target + ("layers", i)
    blocks = ["attention"] + (["crossattention"] if cfg.has_cross_attention(i) else [])
    for block in blocks:
      for suffix, (path, t) in _ATTENTION.items():
        mapping[f"{layer}{block}.{suffix}"] = tree.Rule.to(ours + (block,) + path, None, t)
    for suffix, (path, t) in _FEED_FORWARD.items():
      mapping[layer + suffix] = tree.Rule.to(ours + path, None, t)
  return mapping


def qformer_ignored(prefix: str = IMAGE_KEYS[0]) -> tuple[re.Pattern, ...]:
  """Source keys of the Q-Former under `prefix` that conversion drops on purpose."""
  return tuple(re.compile(re.escape(prefix) + s) for s in _IGNORED_SUFFIXES)


IGNORED_KEYS = sum((qformer_ignored(p) for p, _ in (IMAGE_KEYS, VIDEO_KEYS, AUDIO_KEYS)), ())


def abstract_params(cfg: QFormerConfig) -> dict:
  return nnx.to_pure_dict(abstract_model(lambda: QFormer(cfg, rngs=nnx.Rngs(0)))[1])


def convert_qformer(cfg: QFormerConfig, tensors: Iterable[tuple[str, str, np.ndarray]],
                    prefix: str = IMAGE_KEYS[0], query_key: str = IMAGE_KEYS[1],
                    source: str = "checkpoint") -> dict:
  """Our parameter tree (numpy, in `cfg.dtype`) from (file, key, tensor) triples holding exactly one
  Q-Former's keys (plus ignored buffers); raises CheckpointError on any mismatch."""
  out = tree.allocate(abstract_params(cfg), cfg.dtype)
  tree.fill(out, tensors, qformer_key_map(cfg, prefix, query_key), qformer_ignored(prefix), source)
  return out


def qformer_from_params(cfg: QFormerConfig, params: dict) -> QFormer:
  """A QFormer holding `params` (a pure dict as `convert_qformer` returns), without random init."""
  graphdef, state = abstract_model(lambda: QFormer(cfg, rngs=nnx.Rngs(0)))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)
