"""The BLIP-2 Q-Former (query path only) in Flax NNX: one module for the image, video and audio uses.

A post-LN BERT encoder over learned query tokens, as LAVIS runs it once the text parts are stripped:
each layer is self-attention over the queries, then (in every `cross_attention_freq`-th layer)
cross-attention from the queries to the encoder states, then the query feed-forward block. Every
block ends in dropout, a residual add and LayerNorm(eps 1e-12). The input queries pass through the
BERT embeddings LayerNorm and dropout first.

Layers differ (cross-attention only in some), so they are kept as an `nnx.List`, not stacked.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vllama_jax.config import DTYPES
from vllama_jax.errors import ConfigError
from vllama_jax.layers.activations import gelu
from vllama_jax.layers.attention import MASK_VALUE
from vllama_jax.layers.linear import Linear, param
from vllama_jax.layers.norms import LayerNorm
from vllama_jax.sharding import constrain

HIDDEN = ("batch", "length", "act_embed")


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
  num_layers: int
  cross_attention_freq: int  # layer i has cross-attention iff i % cross_attention_freq == 0
  encoder_width: int  # feature size of the encoder states the queries attend to
  num_query_tokens: int
  hidden_size: int = 768
  num_heads: int = 12
  intermediate_size: int = 3072
  layer_norm_eps: float = 1e-12
  dropout: float = 0.1  # both hidden-state and attention-probability dropout, as in BERT
  # The reference keeps the Q-Former in float32 even when the rest of the model is half precision.
  dtype: str = "float32"

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
    if self.cross_attention_freq < 1:
      raise ConfigError(f"cross_attention_freq must be >= 1, got {self.cross_attention_freq}")
    if not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
    if self.dtype not in DTYPES:
      raise ConfigError(f"dtype {self.dtype!r} is not one of {DTYPES}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def has_cross_attention(self, layer: int) -> bool:
    return layer % self.cross_attention_freq == 0

  def replace(self, **changes: Any) -> "QFormerConfig":
    return dataclasses.replace(self, **changes)

  # ---- presets ---------------------------------------------------------------------------------

  @classmethod
  def image(cls, **overrides: Any) -> "QFormerConfig":
    """BLIP-2's image Q-Former over EVA ViT-g features (width 1408): 12 layers, 32 queries."""
    return cls(**(dict(num_layers=12, cross_attention_freq=2, encoder_width=1408, num_query_tokens=32)
                  | overrides))

  @classmethod
  def video(cls, **overrides: Any) -> "QFormerConfig":
    """Video-LLaMA's video Q-Former over per-frame image-query features (width 768)."""
    return cls(**(dict(num_layers=2, cross_attention_freq=1, encoder_width=768, num_query_tokens=32)
                  | overrides))

  @classmethod
  def audio(cls, **overrides: Any) -> "QFormerConfig":
    """Video-LLaMA's audio Q-Former over ImageBind audio features (width 1024), 8 queries."""
    return cls(**(dict(num_layers=2, cross_attention_freq=1, encoder_width=1024, num_query_tokens=8)
                  | overrides))

  @classmethod
  def tiny(cls, **overrides: Any) -> "QFormerConfig":
    """A small config for fast tests: 3 layers with cross-attention in layers 0 and 2."""
    return cls(**(dict(num_layers=3, cross_attention_freq=2, encoder_width=24, num_query_tokens=4,
                       hidden_size=32, num_heads=4, intermediate_size=64) | overrides))


def _attention(q, k, v, mask, scale, dropout: nnx.Dropout, deterministic: bool, rngs):
  """q: (B, Tq, H, D); k, v: (B, Tk, H, D); mask: (B, Tk) bool or None. Scores/softmax in fp32."""
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    scores = jnp.where(mask[:, None, None, :], scores, MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1)
  probs = dropout(probs, deterministic=deterministic, rngs=rngs).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class QFormerAttention(nnx.Module):
  """BERT attention block: multi-head attention, output dense, dropout, residual, LayerNorm.

  Self-attention when called without `context`; cross-attention over `context` (width `kv_width`)
  otherwise.
  """

  def __init__(self, cfg: QFormerConfig, kv_width: int, *, rngs: nnx.Rngs):
    dense = lambda i, o, names: Linear(i, o, names=names, use_bias=True, dtype=cfg.dtype, rngs=rngs)
    self.query = dense(cfg.hidden_size, cfg.hidden_size, ("embed", "heads"))
    self.key = dense(kv_width, cfg.hidden_size, ("embed", "heads"))
    self.value = dense(kv_width, cfg.hidden_size, ("embed", "heads"))
    self.output = dense(cfg.hidden_size, cfg.hidden_size, ("heads", "embed"))
    self.norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=cfg.dtype, rngs=rngs)
    self.attention_dropout = nnx.Dropout(cfg.dropout)
    self.dropout = nnx.Dropout(cfg.dropout)
    self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim

  def __call__(self, x, context=None, mask=None, *, deterministic: bool = True, rngs=None):
    context = x if context is None else context
    heads = lambda y: y.reshape(*y.shape[:-1], self.num_heads, self.head_dim)
    q = constrain(heads(self.query(x)), ("batch", "length", "act_heads", None))
    k, v = heads(self.key(context)), heads(self.value(context))
    out = _attention(q, k, v, mask, self.head_dim ** -0.5, self.attention_dropout, deterministic, rngs)
    out = self.output(out.reshape(*x.shape[:-1], -1))
    out = self.dropout(out, deterministic=deterministic, rngs=rngs)
    return self.norm(out + x)


class QFormerLayer(nnx.Module):
  """Self-attention, optional cross-attention, then the query feed-forward block (post-LN)."""

  def __init__(self, cfg: QFormerConfig, index: int, *, rngs: nnx.Rngs):
    dense = lambda i, o, names: Linear(i, o, names=names, use_bias=True, dtype=cfg.dtype, rngs=rngs)
    self.attention = QFormerAttention(cfg, cfg.hidden_size, rngs=rngs)
    self.crossattention = (QFormerAttention(cfg, cfg.encoder_width, rngs=rngs)
                           if cfg.has_cross_attention(index) else None)
    self.intermediate = dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"))
    self.output = dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"))
    self.output_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=cfg.dtype, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout)

  def __call__(self, x, encoder_states, encoder_mask, *, deterministic: bool = True, rngs=None):
    kw = dict(deterministic=deterministic, rngs=rngs)
    x = self.attention(x, **kw)
    if self.crossattention is not None:
      x = self.crossattention(x, encoder_states, encoder_mask, **kw)
    hidden = gelu(self.intermediate(x))
    hidden = constrain(hidden, ("batch", "length", "act_mlp"))
    out = self.dropout(self.output(hidden), **kw)
    return constrain(self.output_norm(out + x), HIDDEN)


class QFormer(nnx.Module):
  """Learned queries attending to encoder states: (B, S, encoder_width) -> (B, Nq, hidden_size)."""

  def __init__(self, cfg: QFormerConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.query_tokens = param(rngs, nnx.initializers.normal(0.02),
                              (1, cfg.num_query_tokens, cfg.hidden_size), cfg.dtype,
                              (None, "queries", "embed"))
    # BERT's embeddings LayerNorm: applied to the query tokens before the first layer.
    self.embed_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=cfg.dtype, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout)
    self.layers = nnx.List([QFormerLayer(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])

  @property
  def dtype(self):
    return jnp.dtype(self.config.dtype)

  def __call__(self, encoder_hidden_states: jax.Array, encoder_mask: jax.Array | None = None, *,
               query_embeds: jax.Array | None = None, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """encoder_hidden_states: (B, S, encoder_width); encoder_mask: (B, S), nonzero = attend.

    `query_embeds` ((B or 1, N, hidden_size)) replaces the learned query tokens when given.
    Dropout is applied only with `deterministic=False`, drawing from `rngs` (a 'dropout' stream).
    """
    b = encoder_hidden_states.shape[0]
    queries = self.query_tokens[...] if query_embeds is None else query_embeds
    queries = jnp.broadcast_to(queries.astype(self.dtype), (b, *queries.shape[1:]))
    context = encoder_hidden_states.astype(self.dtype)
    mask = None if encoder_mask is None else encoder_mask.astype(bool)
    kw = dict(deterministic=deterministic, rngs=rngs)
    x = constrain(self.dropout(self.embed_norm(queries), **kw), HIDDEN)
    for layer in self.layers:
      x = layer(x, context, mask, **kw)
    return x
